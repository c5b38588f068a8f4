"""What a DECTRIS series is reconstructed from: the ``[detector]`` crop, bin and maps, settled per series.

A DECTRIS series' ``series_start`` is made by ptylive (:class:`~ptylive.streaming.dectris_v1.ImageSeries`,
with its first image), so ptylive fills its detector part (:class:`~ptylive.streaming.protocol.SeriesStart`'s
``detector_crop``, ``pixel_mask``, ``flatfield``) from :class:`DetectorSettings`:

- the pixel mask: the detector's own (the SIMPLON v1 ``dpixelmask-1.0`` part, the stream v2 start's
  ``pixel_mask`` of the channel; non-zero = bad) or'ed with ``[detector] mask_file``'s;
- the flatfield: ``flatfield_file``'s if given, else the detector's own when the detector did not already apply
  it (v1 config ``flatfield_correction_applied``, v2 start ``flatfield_enabled`` false);
- the crop: ``crop_px`` around ``centre`` (a fixed ``(row, col)``, or ``"auto"``: the bright-field centre of the
  series' first image, :func:`~ptylive.streaming.detector_frames.bright_field_centre_px`), binned ``bin``.

Maps of the detector's shape are cut to the crop box before they go into the start, so the start stays small
for a large detector; a map of another shape goes as it is and the daemon refuses the series with its shapes
(:func:`ptylive.daemon.engine.geometry.series_detector`). The same :class:`DetectorSettings` fill every series of
the daemon, and rank 0 and every worker then read the same start.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptylive.streaming.detector_frames import DetectorCrop, bright_field_centre_px, check_crop_size, crop_around
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

#: Where a DECTRIS master file (NeXus) keeps its maps, tried in this order for an HDF5 ``mask_file`` or
#: ``flatfield_file`` that names no dataset.
MASTER_FILE_PATHS = {
    "pixel_mask": ("/entry/instrument/detector/detectorSpecific/pixel_mask", "/entry/instrument/detector/pixel_mask",
                   "/pixel_mask"),
    "flatfield": ("/entry/instrument/detector/detectorSpecific/flatfield", "/entry/instrument/detector/flatfield",
                  "/flatfield"),
}


@dataclass(frozen=True, eq=False)
class DetectorSettings:
    """How every DECTRIS series is cropped, binned and masked (the ``[detector]`` section, files read).

    Attributes
    ----------
    crop_px : int
        Side of the crop box; 0: none (the whole detector, which must then be square).
    centre_px : (float, float) or None
        Bright-field centre on the detector; None: found in each series' first image.
    bin_factor : int
    pixel_mask : (H, W) bool or None
        From ``mask_file`` (True = bad).
    flatfield : (H, W) float32 or None
        From ``flatfield_file``.
    """

    crop_px: int = 0
    centre_px: tuple[float, float] | None = None
    bin_factor: int = 1
    pixel_mask: np.ndarray | None = None
    flatfield: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.crop_px:
            check_crop_size(self.crop_px, self.bin_factor)
        elif self.bin_factor < 1:
            raise ValueError(f"bin must be >= 1, got {self.bin_factor}")

    def series_start(self, start: SeriesStart, first_image: np.ndarray | None, stream_mask: np.ndarray | None = None,
                     stream_flatfield: np.ndarray | None = None) -> SeriesStart:
        """``start`` with its crop and maps: this configuration's, the detector's own, and the centre of
        ``first_image`` ((H, W), the series' first image; needed for ``centre = "auto"`` with a crop)."""
        shape = start.detector_shape
        mask = _combined_mask(self.pixel_mask, stream_mask, shape)
        flatfield = self.flatfield if self.flatfield is not None else stream_flatfield
        crop = self._crop(start, first_image, mask)
        if crop is not None:
            mask, flatfield = _cut(mask, shape, crop), _cut(flatfield, shape, crop)
        return dataclasses.replace(start, detector_crop=crop, pixel_mask=mask, flatfield=flatfield)

    def _crop(self, start: SeriesStart, first_image: np.ndarray | None, mask: np.ndarray | None) -> DetectorCrop | None:
        rows, cols = start.detector_shape
        if not self.crop_px:
            if self.bin_factor == 1:
                return None
            return DetectorCrop(0, 0, rows, self.bin_factor) if rows == cols else None  # else refused: not square
        centre = self.centre_px
        if centre is None:
            centre = (rows / 2, cols / 2)
            usable = mask if mask is not None and mask.shape == (rows, cols) else None
            try:
                if first_image is None:
                    raise ValueError("no image")
                centre = bright_field_centre_px(first_image, usable)
            except ValueError as exc:
                logger.warning("series %r: no bright-field centre in its first image (%s); the crop is centred on the "
                               "detector", start.series_id, exc)
        crop = crop_around(centre, self.crop_px, self.bin_factor)
        logger.info("series %r: %d px crop at (%d, %d) of the %d×%d detector (bright-field centre %.2f, %.2f), bin %d",
                    start.series_id, crop.size_px, crop.row0_px, crop.col0_px, rows, cols, *centre, crop.bin_factor)
        return crop

    @property
    def needs_first_image(self) -> bool:
        """True when the crop centre is found in each series' first image."""
        return bool(self.crop_px) and self.centre_px is None


def _combined_mask(configured: np.ndarray | None, streamed: np.ndarray | None,
                   shape: tuple[int, int]) -> np.ndarray | None:
    """Either mask, or both or'ed; one of another shape than the detector is passed on (and refused there)."""
    masks = [np.asarray(m) != 0 for m in (configured, streamed) if m is not None]
    wrong = [m for m in masks if m.shape != tuple(shape)]
    if wrong:
        return wrong[0]
    if not masks:
        return None
    return np.logical_or.reduce(masks) if len(masks) > 1 else masks[0]


def _cut(values: np.ndarray | None, shape: tuple[int, int], crop: DetectorCrop) -> np.ndarray | None:
    """The crop box of a whole-detector map (copied); other maps as they are (the daemon checks them)."""
    if values is None or values.shape != tuple(shape):
        return values
    r, c, s = crop.row0_px, crop.col0_px, crop.size_px
    if not (0 <= r <= shape[0] - s and 0 <= c <= shape[1] - s):
        return values  # the crop leaves the detector: refused, with the maps as they came
    return np.array(values[r:r + s, c:c + s])


def read_detector_map(path: str | Path, kind: str) -> np.ndarray:
    """A pixel mask (``kind`` "pixel_mask": non-zero = bad, returned as bool) or flatfield ("flatfield", float32)
    from a ``.npy`` file, or from an HDF5 file: ``file.h5`` (a DECTRIS master file's place,
    :data:`MASTER_FILE_PATHS`) or ``file.h5::/path/to/dataset``.

    Raises
    ------
    ValueError
        The file cannot be read, holds no such 2-D array, or a flatfield that is not real; the message names it.
    """
    text = str(path)
    name, _, dataset = text.partition("::")
    try:
        if name.endswith(".npy"):
            values = np.load(name, allow_pickle=False)
        else:
            with h5py.File(name, "r") as f:
                places = (dataset,) if dataset else MASTER_FILE_PATHS[kind]
                found = next((p for p in places if isinstance(f.get(p), h5py.Dataset)), None)
                if found is None:
                    raise ValueError(f"holds no dataset {' or '.join(places)}")
                values = f[found][...]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{kind} file {text}: {exc}") from None
    if values.ndim != 2 or values.dtype.kind not in "biuf":
        raise ValueError(f"{kind} file {text}: expected a 2-D real array, got {values.dtype} {values.shape}")
    return values != 0 if kind == "pixel_mask" else values.astype(np.float32)


def settings_from_config(section: Any) -> DetectorSettings:
    """:class:`DetectorSettings` from an object with the ``[detector]`` keys (``crop_px``, ``centre`` "auto" or
    ``(row, col)``, ``bin``, ``mask_file``, ``flatfield_file``); the files are read now (ValueError naming one that
    cannot be)."""
    centre = None if section.centre == "auto" else (float(section.centre[0]), float(section.centre[1]))
    mask = read_detector_map(section.mask_file, "pixel_mask") if section.mask_file else None
    flatfield = read_detector_map(section.flatfield_file, "flatfield") if section.flatfield_file else None
    return DetectorSettings(section.crop_px, centre, section.bin, mask, flatfield)
