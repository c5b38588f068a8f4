"""Who owns a frame: one rule, :func:`owner_for`, for the ingest's router and every worker's frame store.

A frame belongs to the probe group its *index* was given at series start: the decomposition puts each
nominal position in the tile holding its window centre, and that worker reserves the frame's row (rows
are preallocated, so no other worker could hold it). A header ``position_A`` wins over the nominal
position for *where* the frame is reconstructed: its owner places the window there. It does not move
the frame to another worker. The owner's extended tile carries a margin for this (one scan step on a
streamed series, :func:`ptylive.daemon.engine.geometry.series_geometry`), so a frame whose header position
crossed into a neighbour's tile is still reconstructed by its owner::

                    tile 0              │ tile 1
      ┌─ extended tile 0 ───────────────┼───────╥─ margin ─┐
      │   ○    ○    ○    ○    ○    ●  ──┼──► ★  ║          │   ● nominal position of frame k (group 0)
      │                                 │       ║          │   ★ its header position, in tile 1
      └─────────────────────────────────┼───────╨──────────┘   → routed to worker 0, placed at ★

Both the router (:class:`~ptylive.streaming.router.Router`, given the series' :class:`OwnerTable`) and the
worker's frame store call :func:`owner_for` with the same table, so they cannot disagree: a frame the
ingest counts as received is a frame its worker stores. A frame whose window at its header position
leaves its owner's extended tile is :class:`NotPlaceable`: the ingest rejects it as ``position_outside``
before it counts as received.

Windows follow the grid convention of :func:`ptylive.gpu.patches.window_starts`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ptylive.gpu.patches import window_starts
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

SNAP_PX = 1e-9  # Å → px rounding within this of an integer must not move a window by a pixel


class NotPlaceable(ValueError):
    """A frame's window, at its header position, lies outside its owner's extended tile (nobody can use it)."""


def snap_px(px: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Coordinates within :data:`SNAP_PX` of an integer become that integer."""
    nearest = np.round(px)
    return np.where(np.abs(px - nearest) < SNAP_PX, nearest, px)


@dataclass(frozen=True)
class Placement:
    """Where a frame is reconstructed: its worker, its window start (object px) and sub-pixel shift."""

    worker: int
    start_px: tuple[int, int]
    shift_px: tuple[float, float]


@dataclass(frozen=True, eq=False)
class OwnerTable:
    """What the router and every worker need to agree on a series' frames, computed from its start alone.

    Attributes
    ----------
    owner : (n,) int64
        Worker of each frame index (its probe group).
    extended : (R, 4) int64
        Extended tile of each worker, ``[row0, row1) × [col0, col1)`` in object px.
    positions_px : (n, 2) float64
        Nominal probe centres in object px.
    pixel_size_A : float
    offset_px : (2,) float64
        ``px = A / pixel_size_A + offset_px``.
    window_px : int
    """

    owner: npt.NDArray[np.int64]
    extended: npt.NDArray[np.int64]
    positions_px: npt.NDArray[np.float64]
    pixel_size_A: float
    offset_px: npt.NDArray[np.float64]
    window_px: int

    def __post_init__(self) -> None:
        n = len(self.owner)
        if self.extended.ndim != 2 or self.extended.shape[1] != 4 or self.positions_px.shape != (n, 2):
            raise ValueError(f"owner table needs extended (R, 4) and positions_px ({n}, 2); got "
                             f"{self.extended.shape} and {self.positions_px.shape}")
        if n and (self.owner.min() < 0 or self.owner.max() >= len(self.extended)):
            raise ValueError(f"owners must lie in [0, {len(self.extended)}), got [{self.owner.min()}, "
                             f"{self.owner.max()}]")

    @property
    def n_workers(self) -> int:
        return len(self.extended)

    def to_px(self, positions_A: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``(n, 2)`` positions in Å → object pixels (snapped, see :func:`snap_px`)."""
        return snap_px(np.asarray(positions_A, dtype=np.float64).reshape(-1, 2) / self.pixel_size_A
                       + self.offset_px)

    # The router's OwnerRule (streaming.router) ---------------------------------------------------------
    def owners(self, start: SeriesStart) -> npt.NDArray[np.int64]:
        """Worker of every frame of ``start`` (the table is the series'; ValueError for another scan size)."""
        if start.n_positions != len(self.owner):
            raise ValueError(f"series {start.series_id!r} has {start.n_positions} frames, the owner table "
                             f"{len(self.owner)}")
        return self.owner

    def owner_of_frame(self, start: SeriesStart, frame_index: int, position_A: tuple[float, float]) -> int:
        """Worker of a frame with a header position: :func:`owner_for`'s worker."""
        return owner_for(self, frame_index, position_A).worker


def owner_for(table: OwnerTable, frame_index: int, position_A: Sequence[float] | None = None) -> Placement:
    """The worker that reconstructs frame ``frame_index`` and where: at ``position_A`` (Å) if the header gives one,
    else at its nominal position.

    Raises
    ------
    ValueError
        If ``frame_index`` is outside ``[0, n)``.
    NotPlaceable
        If the window at ``position_A`` leaves the owner's extended tile.
    """
    n = len(table.owner)
    if not 0 <= frame_index < n:
        raise ValueError(f"frame_index {frame_index} outside [0, {n})")
    worker = int(table.owner[frame_index])
    px = table.positions_px[frame_index] if position_A is None else table.to_px([tuple(position_A)])[0]
    starts, shifts = window_starts(px[None], table.window_px)
    start, shift = starts[0], shifts[0]
    row0, row1, col0, col1 = (int(v) for v in table.extended[worker])
    end = start + table.window_px
    if start[0] < row0 or start[1] < col0 or end[0] > row1 or end[1] > col1:
        where = "its nominal position" if position_A is None else f"{tuple(position_A)} Å"
        raise NotPlaceable(f"frame {frame_index} at {where}: its window rows "
                           f"[{start[0]}, {end[0]}) cols [{start[1]}, {end[1]}) leaves worker {worker}'s extended "
                           f"tile rows [{row0}, {row1}) cols [{col0}, {col1})")
    return Placement(worker, (int(start[0]), int(start[1])), (float(shift[0]), float(shift[1])))
