"""Route frames to the worker that owns their scan position.

The ingest knows a frame's position from, in this order of precedence:

1. the frame header's ``position_A``;
2. the series' explicit ``positions_A[frame_index]``;
3. the raster of the series start (below).

Raster and rotation convention
------------------------------
Frame ``k`` of a ``scan_shape = (rows, cols)`` raster sits at ``row = k // cols``, ``col = k % cols``,
i.e. at ``(r, c) = (row · step_row, col · step_col)`` before rotation. The scan is then rotated by
``scan_rotation_deg`` about the scan origin (frame 0 stays at ``(0, 0)``)::

    row_A =  cos θ · r + sin θ · c            +row ▲   ↗ +col after rotation
    col_A = −sin θ · r + cos θ · c                 │  ╱
                                                   │ ╱ θ
                                                   └──────► +col

A positive angle turns the ``+col`` axis towards ``+row`` (counter-clockwise in the ``(x, y) = (col, row)``
plane; on an image drawn with rows going down it looks clockwise). At θ = 90° a step along ``+col``
lands on ``+row`` and a step along ``+row`` lands on ``−col``. Multiples of 90° are computed exactly.

Which worker owns a frame is decided by an :class:`OwnerRule`, injected by the caller. The daemon, which
knows the decomposition, passes the series' :class:`~ptylive.streaming.ownership.OwnerTable`: a frame goes
to the worker of its index's probe group, and a header position only moves its window
(:func:`~ptylive.streaming.ownership.owner_for`, the rule every worker's frame store applies too). Callers
without a decomposition (benchmarks, tests) pass a bare ``owner_of``, which maps ``(n, 2)`` float64
positions in Å to ``(n,)`` worker indices in ``[0, n_workers)`` (:class:`ByPosition`: a header position
decides the owner). The daemon maps a worker index to an MPI rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ptylive.streaming.protocol import Frame, SeriesStart

logger = logging.getLogger(__name__)

OwnerOf = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.integer[Any]]]


def _cos_sin(scan_rotation_deg: float) -> tuple[float, float]:
    """``(cos θ, sin θ)``, exact for multiples of 90° so a rotated raster keeps exact coordinates."""
    if not math.isfinite(scan_rotation_deg):
        raise ValueError(f"scan_rotation_deg must be finite, got {scan_rotation_deg!r}")
    quarter, remainder = divmod(scan_rotation_deg, 90.0)
    if remainder == 0.0:
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(quarter) % 4]
    theta = math.radians(scan_rotation_deg)
    return math.cos(theta), math.sin(theta)


def raster_positions_A(start: SeriesStart) -> npt.NDArray[np.float64]:
    """Rotated raster positions of every frame, ignoring any explicit ``positions_A``.

    Returns
    -------
    (rows · cols, 2) float64
        ``(row, col)`` in Å, frame ``k`` in row ``k``.
    """
    rows, cols = start.scan_shape
    cos, sin = _cos_sin(start.scan_rotation_deg)
    index = np.arange(rows * cols, dtype=np.int64)
    r = (index // cols) * start.scan_step_A[0]
    c = (index % cols) * start.scan_step_A[1]
    return np.stack([cos * r + sin * c, -sin * r + cos * c], axis=1)


def scan_positions_A(start: SeriesStart) -> npt.NDArray[np.float64]:
    """Nominal positions of every frame: the explicit ``positions_A`` if given, else the raster.

    Returns
    -------
    (n_positions, 2) float64
    """
    if start.positions_A is not None:
        return np.asarray(start.positions_A, dtype=np.float64).reshape(-1, 2)
    return raster_positions_A(start)


def position_A_of(start: SeriesStart, frame_index: int,
                  position_A: tuple[float, float] | None) -> tuple[float, float]:
    """Position ``(row, col)`` in Å of one frame: header, else explicit, else raster (see the module doc).

    Raises
    ------
    ValueError
        When ``frame_index`` is outside ``[0, start.n_positions)`` and the header gives no position.
    """
    if position_A is not None:
        return float(position_A[0]), float(position_A[1])
    n = start.n_positions
    if not 0 <= frame_index < n:
        raise ValueError(f"frame_index {frame_index} outside [0, {n}) of series {start.series_id!r}")
    if start.positions_A is not None:
        row_A, col_A = start.positions_A[frame_index]
        return float(row_A), float(col_A)
    cols = start.scan_shape[1]
    cos, sin = _cos_sin(start.scan_rotation_deg)
    r = (frame_index // cols) * start.scan_step_A[0]
    c = (frame_index % cols) * start.scan_step_A[1]
    return cos * r + sin * c, -sin * r + cos * c


@runtime_checkable
class OwnerRule(Protocol):
    """Who owns the frames of a series (see the module doc)."""

    def owners(self, start: SeriesStart) -> npt.NDArray[np.integer[Any]]:
        """``(n_positions,)`` worker of every frame of ``start`` at its nominal position."""
        ...

    def owner_of_frame(self, start: SeriesStart, frame_index: int, position_A: tuple[float, float]) -> int:
        """Worker of a frame whose header gives ``position_A``; ``NotPlaceable`` if none can use it there."""
        ...


@dataclass(frozen=True)
class ByPosition:
    """The rule of a bare ``owner_of``: the owner of a frame's position (header, explicit or raster)."""

    owner_of: OwnerOf

    def owners(self, start: SeriesStart) -> npt.NDArray[np.integer[Any]]:
        return self.owner_of(scan_positions_A(start))

    def owner_of_frame(self, start: SeriesStart, frame_index: int, position_A: tuple[float, float]) -> int:
        owners = np.asarray(self.owner_of(np.array([position_A], dtype=np.float64)))
        if owners.shape != (1,) or owners.dtype.kind not in "iu":
            raise ValueError(f"owner_of must return (1,) integers, got {owners.dtype} {owners.shape}")
        return int(owners[0])


class Router:
    """Map frames to worker indices and count what each worker was sent.

    Parameters
    ----------
    rule : OwnerRule or callable
        Who owns each frame; a bare ``(n, 2) float64`` positions in Å → ``(n,)`` workers callable is used
        as :class:`ByPosition`.
    n_workers : int

    Attributes
    ----------
    frames_routed, bytes_routed : (n_workers,) int64
        Per worker, counted by :meth:`route` (not by :meth:`route_all` or :meth:`owner`).
    queue_depth : dict[int, int]
        Hook the caller keeps up to date (worker index → messages waiting); reported by :meth:`snapshot`.
    """

    def __init__(self, rule: OwnerRule | OwnerOf, n_workers: int) -> None:
        if not 1 <= n_workers < 2**31:
            raise ValueError(f"n_workers must be in [1, 2**31), got {n_workers!r}")
        self.rule: OwnerRule = rule if isinstance(rule, OwnerRule) else ByPosition(rule)
        self.n_workers = n_workers
        self.frames_routed = np.zeros(n_workers, dtype=np.int64)
        self.bytes_routed = np.zeros(n_workers, dtype=np.int64)
        self.queue_depth: dict[int, int] = {}
        self._table_start: SeriesStart | None = None
        self._table: npt.NDArray[np.int32] | None = None

    def _checked(self, owners: npt.ArrayLike, n: int) -> npt.NDArray[np.int32]:
        """``owners`` as int32 if it holds ``n`` worker indices in ``[0, n_workers)``; ValueError otherwise."""
        owners = np.asarray(owners)
        if owners.shape != (n,) or (owners.size and owners.dtype.kind not in "iu"):
            raise ValueError(f"the owner rule must return ({n},) integers, got {owners.dtype} {owners.shape}")
        if owners.size and (owners.min() < 0 or owners.max() >= self.n_workers):
            bad = int(np.flatnonzero((owners < 0) | (owners >= self.n_workers))[0])
            raise ValueError(f"the owner rule gave worker {owners[bad]} for frame {bad}; "
                             f"expected [0, {self.n_workers})")
        return owners.astype(np.int32, copy=False)

    def route_all(self, start: SeriesStart) -> npt.NDArray[np.int32]:
        """Worker index of every frame of ``start`` at its nominal position (explicit or raster).

        The table is kept for ``start`` (the same object), so later :meth:`route` calls for frames without a
        header position become a lookup. Counters are not touched.

        Returns
        -------
        (n_positions,) int32
        """
        if self._table_start is not start or self._table is None:
            self._table = self._checked(self.rule.owners(start), start.n_positions)
            self._table_start = start
        return self._table.copy()

    def owner(self, start: SeriesStart, frame: Frame) -> int:
        """Worker index for ``frame`` of series ``start``, counting nothing.

        Raises
        ------
        ValueError
            If the frame index is outside the scan (and the rule needs it), or the rule answers something other
            than one worker index in ``[0, n_workers)``.
        NotPlaceable
            (a ValueError) If the rule finds no worker that can use the frame at its header position.
        """
        if frame.position_A is not None:
            worker = self.rule.owner_of_frame(start, frame.frame_index, frame.position_A)
            if not 0 <= worker < self.n_workers:
                raise ValueError(f"the owner rule gave worker {worker} for frame {frame.frame_index} at "
                                 f"{frame.position_A} Å; expected [0, {self.n_workers})")
            return worker
        table = self._table if self._table_start is start and self._table is not None else self.route_all(start)
        if not 0 <= frame.frame_index < len(table):
            raise ValueError(f"frame_index {frame.frame_index} outside [0, {len(table)}) "
                             f"of series {start.series_id!r}")
        return int(table[frame.frame_index])

    def route(self, start: SeriesStart, frame: Frame) -> int:
        """:meth:`owner` of ``frame``, counting the frame and its bytes for that worker."""
        worker = self.owner(start, frame)
        self.frames_routed[worker] += 1
        self.bytes_routed[worker] += frame.pixels.nbytes
        return worker

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable counters: totals and, per worker, frames, bytes and queue depth."""
        return {
            "n_workers": self.n_workers,
            "frames_routed": int(self.frames_routed.sum()),
            "bytes_routed": int(self.bytes_routed.sum()),
            "workers": [{"worker": w, "frames_routed": int(self.frames_routed[w]),
                         "bytes_routed": int(self.bytes_routed[w]),
                         "queue_depth": int(self.queue_depth.get(w, 0))} for w in range(self.n_workers)],
        }
