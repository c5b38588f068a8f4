"""Scan geometry for detectors that send only an image number (DECTRIS SIMPLON stream v1 and v2).

The scan generator drives the beam over ``rows × cols`` positions; the detector numbers its images
0, 1, 2, … in acquisition order and knows nothing of the scan. This module maps an image number to the
position index of ptylive's raster (position ``k`` at row ``k // cols``, column ``k % cols``; see
``streaming/router.py`` for the step and rotation convention), or to *skip*::

    images of one line (cols = 4, flyback_frames = 2, flyback_at = "end"):

      line 0  →   0  1  2  3 | 4  5       positions 0 1 2 3, images 4 and 5 are skipped
      line 1  ←   6  7  8  9 | 10 11      snake: positions 7 6 5 4 (the line runs backwards)
      line 2  →  12 13 14 15 | 16 17      positions 8 9 10 11

    flyback_at = "start" puts the skipped images before each line's first position instead.

Images past the last line keep an index past the last position (``n_positions + …``), so the ingest
rejects them as ``index_out_of_range`` rather than silently dropping them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ptylive.streaming.detector_maps import DetectorSettings
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

SKIP = -1


@dataclass(frozen=True)
class ScanGeometry:
    """Raster of ``rows × cols`` positions ``step_A`` apart, rotated by ``rotation_deg``; ``snake`` lines
    alternate direction; ``flyback_frames`` extra images per line (at its ``"end"`` or ``"start"``) are skipped.
    """

    rows: int
    cols: int
    step_A: tuple[float, float] = (1.0, 1.0)
    rotation_deg: float = 0.0
    snake: bool = False
    flyback_frames: int = 0
    flyback_at: Literal["end", "start"] = "end"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.flyback_frames < 0 or min(self.step_A) <= 0:
            raise ValueError(f"scan needs rows, cols >= 1, steps > 0 and flyback_frames >= 0; got {self.rows}×"
                             f"{self.cols}, step {self.step_A} Å, flyback {self.flyback_frames}")
        if self.flyback_at not in ("end", "start"):
            raise ValueError(f"flyback_at must be 'end' or 'start', got {self.flyback_at!r}")

    @property
    def images_per_line(self) -> int:
        return self.cols + self.flyback_frames

    @property
    def n_images(self) -> int:
        """Images the detector takes for the whole scan, flyback included."""
        return self.rows * self.images_per_line

    @property
    def n_positions(self) -> int:
        return self.rows * self.cols

    def position_indices(self, images: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Position index of each image number, :data:`SKIP` (-1) for flyback images.

        Parameters
        ----------
        images : (n,) int
            Image numbers >= 0.

        Returns
        -------
        (n,) int64
            In ``[0, n_positions)`` for images of the scan, ``>= n_positions`` past its end.
        """
        images = np.asarray(images, dtype=np.int64)
        if images.size and images.min() < 0:
            raise ValueError(f"image numbers must be >= 0, got {int(images.min())}")
        line, within = np.divmod(images, self.images_per_line)
        column = within - (self.flyback_frames if self.flyback_at == "start" else 0)
        flyback = (column < 0) | (column >= self.cols)
        if self.snake:
            column = np.where(line % 2 == 1, self.cols - 1 - column, column)
        index = np.where(flyback, SKIP, line * self.cols + column)
        past = images >= self.n_images
        return np.where(past, self.n_positions + images - self.n_images, index)

    def position_index(self, image: int) -> int:
        """:meth:`position_indices` of one image number."""
        return int(self.position_indices(np.array([image]))[0])

    def image_numbers(self) -> npt.NDArray[np.int64]:
        """Image number of each position index (the inverse of :meth:`position_indices` on the scan)."""
        images = np.arange(self.n_images, dtype=np.int64)
        index = self.position_indices(images)
        out = np.empty(self.n_positions, dtype=np.int64)
        out[index[index != SKIP]] = images[index != SKIP]
        return out


@dataclass(frozen=True)
class Optics:
    """What the electron-optical setup is; DECTRIS streams do not say it, the daemon's config does."""

    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float
    detector_pixel_mrad: float


@dataclass(frozen=True)
class SeriesTemplate:
    """Everything of a ``series_start`` but the detector's own facts (series id, frame shape and dtype) and, for a
    series whose geometry is decided when it begins (:mod:`ptylive.streaming.scan_plan`), its scan.

    ``scan`` is the static geometry (``[scan]``), or None when none is configured; ``detector`` crops, bins and
    masks every series (``[detector]``, :mod:`ptylive.streaming.detector_maps`).
    """

    scan: ScanGeometry | None
    optics: Optics
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    detector: DetectorSettings = field(default_factory=DetectorSettings, hash=False, compare=False)

    def start(self, series_id: str, detector_shape: tuple[int, int], dtype: str,
              scan: ScanGeometry | None = None) -> SeriesStart:
        """The series' start on ``scan`` (default: the template's own)."""
        scan = scan if scan is not None else self.scan
        if scan is None:
            raise ValueError(f"series {series_id!r} has no scan geometry")
        return SeriesStart(series_id=series_id, scan_shape=(scan.rows, scan.cols), scan_step_A=scan.step_A,
                           detector_shape=detector_shape, dtype=dtype, scan_rotation_deg=scan.rotation_deg,
                           overrides=dict(self.overrides), **vars(self.optics))


def template_from_settings(settings: Any, detector: DetectorSettings | None = None) -> SeriesTemplate:
    """A template from an object with the ``[scan]`` config keys (``rows``, ``cols``, ``step_row_A``,
    ``step_col_A``, ``rotation_deg``, ``snake``, ``flyback_frames``, ``flyback_at`` and the four optics keys).

    ``rows`` or ``cols`` 0 (taken from the detector's count per series: :mod:`ptylive.streaming.scan_plan`) leaves
    the template without a static scan.
    """
    scan = None
    if settings.rows >= 1 and settings.cols >= 1:
        scan = ScanGeometry(settings.rows, settings.cols, (settings.step_row_A, settings.step_col_A),
                            settings.rotation_deg, settings.snake, settings.flyback_frames, settings.flyback_at)
    optics = Optics(settings.energy_eV, settings.convergence_semiangle_mrad, settings.defocus_A,
                    settings.detector_pixel_mrad)
    if min(optics.energy_eV, optics.convergence_semiangle_mrad, optics.detector_pixel_mrad) <= 0:
        raise ValueError(f"[scan] energy_eV, convergence_semiangle_mrad and detector_pixel_mrad must be > 0 for a "
                         f"DECTRIS stream, got {optics}")
    return SeriesTemplate(scan, optics, detector=detector if detector is not None else DetectorSettings())
