"""The missing-cone correction of a rank's tile, once per iteration (the filter: :mod:`ptylive.gpu.missing_cone`).

Each rank corrects the voxels it owns (its tile) from its extended tile cropped to the tile plus the
filter's radius ``R``, writes the correction into the run's zeroed gradient array (no tile-sized
allocation) with zero everywhere else, and shares it like a gradient:

* ``sync`` (and async mode's exact first iteration): :meth:`SyncExchange.reduce_correction` sums it over
  the overlaps, so every copy of a voxel receives its owner's value; every copy then holds the same
  object, and the result does not depend on the number of ranks wherever each tile's halo is at least
  ``R`` wide (to floating point: the tile's transforms have other sizes than the object's);
* ``async`` (offline and streaming): :meth:`AsyncExchange.push_correction` accumulates it like an update,
  and the neighbours add it when it lands.

Then ``O += correction`` and the amplitude constraint, over the whole extended tile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.sweep import WHOLE, GradientWorkspace
from ptylive.gpu.missing_cone import ConeFilter, cone_correction
from ptylive.gpu.update import constrain

logger = logging.getLogger(__name__)


def cone_crop(domain: RankDomain, radius_px: int) -> tuple[slice, slice]:
    """The rank's tile grown by ``radius_px`` on every side, clipped to its extended tile (relative to it)."""
    crop = domain.tile.grown(radius_px).intersect(domain.extended)
    assert crop is not None  # the tile lies inside its extended tile
    return crop.relative_to(domain.extended)


def short_halo_px(domain: RankDomain, radius_px: int) -> int:
    """The narrowest halo of ``domain`` thinner than ``radius_px`` (0 where none is).

    A side whose extended edge is its tile's has no windows beyond: the object's edge, where one rank
    pads by the edge values too. A halo between 0 and ``R`` wide leaves the correction near that tile
    edge computed from padding instead of the neighbour's voxels.
    """
    tile, ext = domain.tile, domain.extended
    widths = (tile.row0 - ext.row0, ext.row1 - tile.row1, tile.col0 - ext.col0, ext.col1 - tile.col1)
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
    rows, cols = cone_crop(domain, cone.radius_px)
    own_rows, own_cols = domain.tile.relative_to(domain.extended)
    correction, _ = workspace.begin()
    crop = correction[:, rows, cols]
    cone_correction(volume[:, rows, cols], cone, out=crop)
    # keep the owner's voxels only: the margin was there for the kernels' reach
    inner_rows = slice(own_rows.start - rows.start, own_rows.stop - rows.start)
    inner_cols = slice(own_cols.start - cols.start, own_cols.stop - cols.start)
    crop[:, :inner_rows.start] = 0
    crop[:, inner_rows.stop:] = 0
    crop[:, :, :inner_cols.start] = 0
    crop[:, :, inner_cols.stop:] = 0
    share(correction)
    volume += correction
    constrain(volume, max_amplitude)
    workspace.end(WHOLE)
