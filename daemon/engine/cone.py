"""The missing-cone correction of a rank's tile, once per iteration (the filter: :mod:`ptylive.gpu.missing_cone`).

The filter works inside the scan's field of view (:attr:`RankDomain.field`: the bounding box of every
window, the same on every rank; nothing outside it is ever updated, so ``ln O`` is 0 there), padded by edge
values at the field's edges, which one rank and many do alike. Each rank corrects the voxels it owns (its
tile, within the field) from its extended tile cropped to those voxels plus the filter's radius ``R``,
writes the correction into the run's zeroed gradient array (no tile-sized allocation) with zero everywhere
else, and shares it like a gradient:

* ``sync`` (and async mode's exact first iteration): :meth:`SyncExchange.reduce_correction` sums it over
  the overlaps, so every copy of a voxel receives its owner's value; every copy then holds the same
  object, and the result does not depend on the number of ranks wherever each tile's halo is at least
  ``R`` wide (to floating point: the tile's transforms have other sizes than the object's);
* ``async`` (offline and streaming): :meth:`AsyncExchange.push_correction` accumulates it like an update,
  and the neighbours add it when it lands.

Then ``O += correction`` and the amplitude constraint, over the field of view within the extended tile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ptylive.daemon.engine.decomposition import Box, RankDomain
from ptylive.daemon.engine.sweep import GradientWorkspace
from ptylive.gpu.missing_cone import ConeFilter, cone_correction
from ptylive.gpu.update import constrain

logger = logging.getLogger(__name__)


def field_in_tile(domain: RankDomain) -> Box | None:
    """The part of the extended tile inside the scan's field of view (None: none of it)."""
    return domain.extended if domain.field is None else domain.extended.intersect(domain.field)


def cone_regions(domain: RankDomain, radius_px: int) -> tuple[Box, Box, Box] | None:
    """``(field, own, crop)`` of the filter on this rank, in object pixels; None where it corrects nothing.

    ``field`` is the part of the extended tile inside the scan's field of view (:attr:`RankDomain.field`),
    the one place the object changes; ``own`` the voxels this rank corrects (its tile there); ``crop`` what
    their correction needs (``own`` grown by ``radius_px``, within ``field``). Outside the field of view
    ``ln O`` stays 0 and the filter is not run, so its cost follows the scan, not the object's area.
    """
    field = field_in_tile(domain)
    own = None if field is None else domain.tile.intersect(field)
    if field is None or own is None:
        return None
    crop = own.grown(radius_px).intersect(field)
    assert crop is not None  # own lies inside field
    return field, own, crop


def short_halo_px(domain: RankDomain, radius_px: int) -> int:
    """The narrowest halo of ``domain`` thinner than ``radius_px`` (0 where none is).

    Measured between the voxels the rank corrects and the edge of its extended tile within the field of
    view (:func:`cone_regions`). A side where the two coincide has no windows beyond: the field's edge,
    where one rank pads by the edge values too. A halo between 0 and ``R`` wide leaves the correction near
    that tile edge computed from padding instead of the neighbour's voxels.
    """
    regions = cone_regions(domain, radius_px)
    if regions is None:
        return 0
    field, own, _ = regions
    widths = (own.row0 - field.row0, field.row1 - own.row1, own.col0 - field.col0, field.col1 - own.col1)
    short = [w for w in widths if 0 < w < radius_px]
    return min(short, default=0)


def remove_missing_cone(volume: Any, domain: RankDomain, cone: ConeFilter | None, workspace: GradientWorkspace,
                        share: Callable[[Any], Any], max_amplitude: float | None) -> None:
    """Apply one missing-cone correction to ``volume`` (S, He, We) and pass it on with ``share``.

    ``share`` is :meth:`SyncExchange.reduce_correction` (blocking, collective: every rank calls it) or
    :meth:`AsyncExchange.push_correction`. ``workspace`` must be between updates (its arrays zero); it
    is zero again afterwards. Nothing happens without a filter (one slice, or switched off).
    """
    if cone is None:
        return
    regions = cone_regions(domain, cone.radius_px)
    correction, _ = workspace.begin()
    if regions is not None:
        _, own, crop_box = regions
        rows, cols = crop_box.relative_to(domain.extended)
        crop = correction[:, rows, cols]
        cone_correction(volume[:, rows, cols], cone, out=crop)
        # keep the owner's voxels only: the margin was there for the kernels' reach
        own_rows, own_cols = own.relative_to(crop_box)
        crop[:, :own_rows.start] = 0
        crop[:, own_rows.stop:] = 0
        crop[:, :, :own_cols.start] = 0
        crop[:, :, own_cols.stop:] = 0
    share(correction)  # collective in sync mode: a rank with nothing to correct shares zeros
    # every copy's correction (own or a neighbour's) lies in the field of view: add and constrain there only
    field = field_in_tile(domain)
    swept = [] if field is None else [field.relative_to(domain.extended)]
    for rows, cols in swept:
        target = volume[:, rows, cols]
        target += correction[:, rows, cols]
        constrain(target, max_amplitude)
    workspace.end(swept)
