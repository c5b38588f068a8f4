"""Where one update can change the tile: the rectangles its update, constraint and clearing sweep.

An update's gradient is the scatter-add of its positions' windows, plus (``sync``) what the neighbours
sent over the exchange regions. Everywhere else it is exactly zero, so the preconditioned step there is
zero and the object does not change; once the constraint has been applied to every voxel (the first
update of a run sweeps the whole tile, as every update used to), it has nothing left to do there either.
So the passes over the tile that follow the gradient (the step, its finiteness check and scaling, the
addition, the constraint, and zeroing the gradient for the next update) run over::

    extended tile ┌──────────────────────────────────────────┐
                  │░░░░░░░ exchange region (neighbour above) ░│   sync only: what reduce_gradients
                  │                                          │   may add
                  │     ┌──── bounding box of the ────┐      │
                  │     │     update's own windows    │      │
                  │     │                             │      │
                  │     └─────────────────────────────┘      │
                  └──────────────────────────────────────────┘

cut into disjoint rectangles (:func:`disjoint_cover`), so each voxel is visited once, and the cost
follows the scanned area, not the object's. Voxel for voxel the arithmetic is the one of a whole-tile
pass, so results do not depend on the rectangles (nor on the number of ranks). The depth penalty
(:mod:`ptylive.gpu.depth`) acts on every voxel: with it, the whole tile is swept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptylive.daemon.engine.decomposition import Box, RankDomain
from ptylive.gpu.backend import get_array_module

Region = tuple[slice, slice]
WHOLE: list[Region] = [(slice(None), slice(None))]


def exchange_boxes(domain: RankDomain) -> list[Box]:
    """The exchange regions of ``domain``, relative to its extended tile."""
    boxes = []
    for _, region in domain.neighbours:
        rows, cols = region.relative_to(domain.extended)
        boxes.append(Box(rows.start, rows.stop, cols.start, cols.stop))
    return boxes


def disjoint_cover(boxes: Sequence[Box | None]) -> list[Region]:
    """Disjoint rectangles whose union is the union of ``boxes``, as (rows, cols) slices.

    Row bands between consecutive box edges, each cut into the merged column spans of the boxes that
    cross it; vertically adjacent bands with the same spans are joined.
    """
    kept = [b for b in boxes if b is not None and b.size > 0]
    edges = sorted({v for b in kept for v in (b.row0, b.row1)})
    bands: list[tuple[int, int, list[tuple[int, int]]]] = []
    for top, bottom in zip(edges, edges[1:], strict=False):
        spans: list[tuple[int, int]] = []
        for c0, c1 in sorted((b.col0, b.col1) for b in kept if b.row0 <= top and b.row1 >= bottom):
            if spans and c0 <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], c1))
            else:
                spans.append((c0, c1))
        if bands and bands[-1][1] == top and bands[-1][2] == spans:
            bands[-1] = (bands[-1][0], bottom, spans)
        elif spans:
            bands.append((top, bottom, spans))
    return [(slice(top, bottom), slice(c0, c1)) for top, bottom, spans in bands for c0, c1 in spans]


def regions_max(array: Any, regions: Sequence[Region]) -> float:
    """Largest value of ``array`` (S, H, W) over ``regions`` (0.0 where there are none)."""
    return max((float(array[:, rows, cols].max()) for rows, cols in regions if array[:, rows, cols].size),
               default=0.0)


class GradientWorkspace:
    """The tile-sized gradient and illumination that every update of a run fills, zero between updates.

    :meth:`begin` hands them out (zero everywhere); :meth:`end` zeroes what the update swept, so no
    update pays for zeroing the whole tile. An update that never reached :meth:`end` (an exception) is
    cleared whole at the next :meth:`begin`. ``constrained`` tells whether a whole-tile sweep has been
    done in this run (until then an update sweeps the whole tile, as every update used to).

    Parameters
    ----------
    volume : (S, He, We) complex
        The tile: shape, dtypes and array module.
    """

    def __init__(self, volume: Any) -> None:
        xp = get_array_module(volume)
        self.gradient = xp.zeros(volume.shape, volume.dtype)
        self.illumination = xp.zeros(volume.shape, volume.real.dtype)
        self.constrained = False
        self._in_use = False

    def begin(self) -> tuple[Any, Any]:
        """(gradient, illumination), both zero."""
        if self._in_use:
            self.gradient[...] = 0
            self.illumination[...] = 0
        self._in_use = True
        return self.gradient, self.illumination

    def end(self, regions: Sequence[Region]) -> None:
        """Zero ``regions`` of both arrays: everything the update wrote must lie inside them."""
        for rows, cols in regions:
            self.gradient[:, rows, cols] = 0
            self.illumination[:, rows, cols] = 0
        self._in_use = False
        self.constrained = self.constrained or list(regions) == WHOLE
