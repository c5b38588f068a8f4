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

Which worker owns a position is decided by ``owner_of``, injected by the daemon (which knows the
decomposition): it maps ``(n, 2)`` float64 positions in Å to ``(n,)`` worker indices in
``[0, n_workers)``, the decomposition's tile index; the daemon maps an index to an MPI rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

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


class Router:
    """Map frames to worker indices and count what each worker was sent.

    Parameters
    ----------
    owner_of : callable
        ``(n, 2) float64`` positions in Å → ``(n,)`` integer worker indices in ``[0, n_workers)``.
    n_workers : int

    Attributes
    ----------
    frames_routed, bytes_routed : (n_workers,) int64
        Per worker, counted by :meth:`route` (not by :meth:`route_all`).
    queue_depth : dict[int, int]
        Hook the caller keeps up to date (worker index → messages waiting); reported by :meth:`snapshot`.
    """

    def __init__(self, owner_of: OwnerOf, n_workers: int) -> None:
        if not 1 <= n_workers < 2**31:
            raise ValueError(f"n_workers must be in [1, 2**31), got {n_workers!r}")
        self.owner_of = owner_of
        self.n_workers = n_workers
        self.frames_routed = np.zeros(n_workers, dtype=np.int64)
        self.bytes_routed = np.zeros(n_workers, dtype=np.int64)
        self.queue_depth: dict[int, int] = {}
        self._table_start: SeriesStart | None = None
        self._table: npt.NDArray[np.int32] | None = None

    def _owners(self, positions_A: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
        owners = np.asarray(self.owner_of(positions_A))
        if owners.shape != (len(positions_A),) or (owners.size and owners.dtype.kind not in "iu"):
            raise ValueError(f"owner_of must return ({len(positions_A)},) integers, "
                             f"got {owners.dtype} {owners.shape}")
        if owners.size and (owners.min() < 0 or owners.max() >= self.n_workers):
            bad = int(np.flatnonzero((owners < 0) | (owners >= self.n_workers))[0])
            raise ValueError(f"owner_of gave worker {owners[bad]} for position {positions_A[bad]}; "
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
            self._table = self._owners(scan_positions_A(start))
            self._table_start = start
        return self._table.copy()

    def route(self, start: SeriesStart, frame: Frame) -> int:
        """Worker index for ``frame`` of series ``start``; counts the frame and its bytes for that worker.

        Raises
        ------
        ValueError
            If the frame index is outside the scan (and the header gives no position), or ``owner_of``
            answers something other than one worker index in ``[0, n_workers)``.
        """
        table = self._table if self._table_start is start else None
        if frame.position_A is None and table is not None:
            if not 0 <= frame.frame_index < len(table):
                raise ValueError(f"frame_index {frame.frame_index} outside [0, {len(table)}) "
                                 f"of series {start.series_id!r}")
            worker = int(table[frame.frame_index])
        else:
            position = position_A_of(start, frame.frame_index, frame.position_A)
            worker = int(self._owners(np.array([position], dtype=np.float64))[0])
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
