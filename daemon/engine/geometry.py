"""From a ``series_start`` to the reconstruction grid: pixel size, object extent, tiles and probe groups.

The detector sends positions in ångström (ARCHITECTURE §5); the engine works in object pixels.
The object pixel is ``λ / (u·D·Δθ)`` for a ``D``-px detector of angular pixel ``Δθ`` and
upsampling ``u`` (window ``N = u·D``). Positions are placed so that the smallest row and column
sit at ``N//2 + 0.5`` pixels, which makes the first window start at pixel 0 with a half-pixel
sub-pixel shift — the same grid ``ptylive simulate`` writes, so a streamed series and the
offline reconstruction of its file share one grid::

    px = A / pixel_size_A − min(A / pixel_size_A) + N//2 + 0.5

The object is the smallest one holding every window (:func:`object_shape_for`). Rank 0 (for
routing) and every worker (for its tile) compute the same :class:`SeriesGeometry` from the same
start, so they agree on who owns which frame without talking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.decomposition import RankDomain, decompose, probe_owner
from ptylive.gpu.patches import check_windows, window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.router import scan_positions_A
from ptylive.streaming.scanfile import object_shape_for

logger = logging.getLogger(__name__)

MAX_OBJECT_PX = 1 << 16


class SeriesRefused(ValueError):
    """A series the daemon cannot reconstruct; the message says why (reported to operators)."""


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """The reconstruction grid of one series.

    Attributes
    ----------
    series_id : str
    pixel_size_A : float
    window_px, detector_px : int
    offset_px : (2,) float64
        ``px = A / pixel_size_A + offset_px``.
    positions_px : (n, 2) float64
        Nominal probe centres of every frame, in object pixels.
    object_shape : (int, int)
    domains : list of RankDomain
        One per worker; ``domains[w].positions`` are the frame indices routed to worker ``w``.
    owner : (n,) int64
        Worker of each frame at its nominal position.
    """

    series_id: str
    pixel_size_A: float
    window_px: int
    detector_px: int
    offset_px: npt.NDArray[np.float64]
    positions_px: npt.NDArray[np.float64]
    object_shape: tuple[int, int]
    domains: list[RankDomain]
    owner: npt.NDArray[np.int64]

    def to_px(self, positions_A: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``(n, 2)`` positions in Å → object pixels (snapped to integers within 1e-9 px)."""
        return _snapped(np.asarray(positions_A, dtype=np.float64).reshape(-1, 2) / self.pixel_size_A
                        + self.offset_px)

    def owner_of(self, positions_A: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Worker of arbitrary positions (header positions); ValueError if a window leaves the object."""
        px = self.to_px(positions_A)
        check_windows(self.object_shape, window_starts(px, self.window_px)[0], self.window_px)
        return probe_owner(self.object_shape, px, self.window_px, len(self.domains))


def _snapped(px: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Coordinates within 1e-9 px of an integer become that integer (Å → px rounding must not move a window)."""
    nearest = np.round(px)
    return np.where(np.abs(px - nearest) < 1e-9, nearest, px)


def series_geometry(start: SeriesStart, n_workers: int, upsampling: int) -> SeriesGeometry:
    """Grid, tiles and probe groups of ``start`` on ``n_workers`` workers.

    Raises
    ------
    SeriesRefused
        Non-square detector, non-finite positions, an object too large, or a grid that cannot be split.
    """
    rows, cols = start.detector_shape
    if rows != cols:
        raise SeriesRefused(f"series {start.series_id!r}: detector {rows}×{cols} is not square")
    if upsampling < 1:
        raise SeriesRefused(f"series {start.series_id!r}: upsampling must be >= 1, got {upsampling}")
    window = rows * upsampling
    pixel_A = wavelength_A(start.energy_eV) / (window * start.detector_pixel_mrad * 1e-3)
    positions_A = scan_positions_A(start)
    if not np.isfinite(positions_A).all():
        raise SeriesRefused(f"series {start.series_id!r}: scan positions are not all finite")
    offset = window // 2 + 0.5 - (positions_A / pixel_A).min(axis=0)
    positions_px = _snapped(positions_A / pixel_A + offset)
    shape = object_shape_for(positions_px, window)
    if max(shape) > MAX_OBJECT_PX:
        raise SeriesRefused(f"series {start.series_id!r}: object {shape} px exceeds {MAX_OBJECT_PX} px per side "
                            f"(scan extent / pixel {pixel_A:.4g} Å)")
    try:
        domains = decompose(shape, positions_px, window, n_workers)
    except ValueError as exc:
        raise SeriesRefused(f"series {start.series_id!r}: {exc}") from None
    owner = np.empty(len(positions_px), dtype=np.int64)
    for domain in domains:
        owner[domain.positions] = domain.rank
    logger.info("series %r: %d positions, pixel %.4f Å, window %d px, object %s px, %d tiles",
                start.series_id, len(positions_px), pixel_A, window, shape, n_workers)
    return SeriesGeometry(start.series_id, pixel_A, window, rows, offset, positions_px, shape, domains, owner)
