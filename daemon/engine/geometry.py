"""From a ``series_start`` to the reconstruction grid: pixel size, object extent, tiles and probe groups.

The detector sends positions in ångström (``docs/protocol.md``); the engine works in object pixels.
The object pixel is ``λ / (u·D·Δθ)`` for a ``D``-px detector of angular pixel ``Δθ`` and
upsampling ``u`` (window ``N = u·D``). A detector that is not square, or one cropped or binned, is
reconstructed on the ``D × D`` frames its series' crop makes (:attr:`SeriesGeometry.detector`,
:mod:`ptylive.streaming.detector_frames`): ``D`` the crop's side over the bin factor ``b``, ``Δθ`` the
detector pixel's angle times ``b``. Positions are placed so that the smallest row and column
sit at ``N//2 + 0.5`` pixels, which makes the first window start at pixel 0 with a half-pixel
sub-pixel shift — the same grid ``ptylive simulate`` writes, so a streamed series and the
offline reconstruction of its file share one grid::

    px = A / pixel_size_A − min(A / pixel_size_A) + N//2 + 0.5

The object is the smallest one holding every window (:func:`object_shape_for`). Each extended tile
carries a margin of one scan step (:func:`header_margin_px`), so a frame whose header position moved it
by up to a step is still placed by its owner (:mod:`ptylive.streaming.ownership`). Rank 0 (for routing)
and every worker (for its tile) compute the same :class:`SeriesGeometry` from the same start, and both
ask its :attr:`SeriesGeometry.owners` table who owns a frame, so they agree without talking.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.decomposition import RankDomain, decompose
from ptylive.gpu.physics import wavelength_A
from ptylive.streaming.detector_frames import DetectorPreprocessing
from ptylive.streaming.ownership import SNAP_PX, OwnerTable, snap_px
from ptylive.streaming.protocol import MAX_START_BYTES, SeriesStart, encode_series_start
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
    owners : OwnerTable
        What the router and the workers' frame stores ask who owns a frame and where its window goes
        (:func:`~ptylive.streaming.ownership.owner_for`).
    detector : DetectorPreprocessing
        How the series' raw frames become ``detector_px``-square ones (crop, flatfield, mask, bin);
        ``detector.identity`` for a square detector used as it is.
    detector_pixel_mrad : float
        The angle one of those pixels spans (the detector's times the bin factor).
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
    owners: OwnerTable
    detector: DetectorPreprocessing
    detector_pixel_mrad: float

    def to_px(self, positions_A: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``(n, 2)`` positions in Å → object pixels (snapped to integers within 1e-9 px)."""
        return self.owners.to_px(positions_A)


def header_margin_px(start: SeriesStart, pixel_size_A: float) -> int:
    """Margin of every extended tile of a streamed series: one scan step, in whole object pixels."""
    return math.ceil(max(abs(step) for step in start.scan_step_A) / pixel_size_A - SNAP_PX)


def series_geometry(start: SeriesStart, n_workers: int, upsampling: int) -> SeriesGeometry:
    """Grid, tiles and probe groups of ``start`` on ``n_workers`` workers.

    Raises
    ------
    SeriesRefused
        A non-square detector without a crop, a crop or bin that does not fit the detector, a pixel mask or
        flatfield of another shape (or too large to travel in the series_start), non-finite positions, an object
        too large, or a grid that cannot be split.
    """
    detector = series_detector(start)
    if upsampling < 1:
        raise SeriesRefused(f"series {start.series_id!r}: upsampling must be >= 1, got {upsampling}")
    side = detector.output_px
    pixel_mrad = detector.pixel_mrad(start.detector_pixel_mrad)
    window = side * upsampling
    pixel_A = wavelength_A(start.energy_eV) / (window * pixel_mrad * 1e-3)
    positions_A = scan_positions_A(start)
    if not np.isfinite(positions_A).all():
        raise SeriesRefused(f"series {start.series_id!r}: scan positions are not all finite")
    offset = window // 2 + 0.5 - (positions_A / pixel_A).min(axis=0)
    positions_px = snap_px(positions_A / pixel_A + offset)
    shape = object_shape_for(positions_px, window)
    if max(shape) > MAX_OBJECT_PX:
        raise SeriesRefused(f"series {start.series_id!r}: object {shape} px exceeds {MAX_OBJECT_PX} px per side "
                            f"(scan extent / pixel {pixel_A:.4g} Å)")
    try:
        domains = decompose(shape, positions_px, window, n_workers, header_margin_px(start, pixel_A))
    except ValueError as exc:
        raise SeriesRefused(f"series {start.series_id!r}: {exc}") from None
    owner = np.empty(len(positions_px), dtype=np.int64)
    for domain in domains:
        owner[domain.positions] = domain.rank
    extended = np.array([[d.extended.row0, d.extended.row1, d.extended.col0, d.extended.col1] for d in domains],
                        dtype=np.int64)
    owners = OwnerTable(owner, extended, positions_px, pixel_A, offset, window)
    logger.info("series %r: %d positions, pixel %.4f Å, window %d px, object %s px, %d tiles",
                start.series_id, len(positions_px), pixel_A, window, shape, n_workers)
    return SeriesGeometry(start.series_id, pixel_A, window, side, offset, positions_px, shape, domains, owner,
                          owners, detector, pixel_mrad)


def series_detector(start: SeriesStart) -> DetectorPreprocessing:
    """The series' crop, bin, pixel mask and flatfield, checked against its detector.

    Raises
    ------
    SeriesRefused
        What :meth:`DetectorPreprocessing.build` refuses, or maps that make the series_start larger than
        ``MAX_START_BYTES`` (it goes to every worker in one message).
    """
    try:
        detector = DetectorPreprocessing.build(start.detector_shape, start.detector_crop, start.pixel_mask,
                                               start.flatfield)
    except ValueError as exc:
        raise SeriesRefused(f"series {start.series_id!r}: {exc}") from None
    if start.pixel_mask is not None or start.flatfield is not None:
        size = len(encode_series_start(start)[0])
        if size > MAX_START_BYTES:
            raise SeriesRefused(f"series {start.series_id!r}: its pixel mask and flatfield make a series_start of "
                                f"{size / 2**20:.1f} MiB; at most {MAX_START_BYTES / 2**20:.0f} MiB go to the "
                                f"workers: crop the detector, or cut the maps to the crop")
    return detector
