"""Raw detector frames → the square frames the reconstruction fits: crop, bin, pixel mask, flatfield.

A detector of any shape (EIGER2's 514 × 1030, a 4k × 4k camera) is cut to a square *crop box* of
``C × C`` pixels, multiplied by the flatfield, and binned ``b × b`` (pixels summed, so counts stay
counts) into ``D × D``, ``D = C / b``::

    raw (H, W) ──crop box (row0, col0, C × C)──▶ × gain ──bin b × b (sum)──▶ (D, D)
                                                  gain = flatfield, 0 where masked

The box is placed so that the bright-field centre falls on the output pixel ``(D//2, D//2)``, the zero
frequency of ptylive's far field (``docs/physics.md``): output pixel ``j`` sums source pixels
``[j b, (j + 1) b)`` of the box, whose centre is ``j b + (b − 1)/2``, so

    row0 = round(centre_row − (D//2) b − (b − 1)/2)          (the same for columns)

which leaves the disk's centre within half a source pixel of the output's zero frequency. The centre is
given, or found (:func:`bright_field_centre_px`: the centre of mass of the thresholded mean frame).

Masks: ``True`` is a bad pixel. A pixel whose flatfield is not finite or not positive is bad too. A
binned pixel is masked when *any* of its source pixels is (a partial sum would be a biased count); masked
output pixels hold 0, :attr:`DetectorPreprocessing.output_mask` says which, and the losses leave those
pixels out (:data:`ptylive.gpu.loss.MASKED_TARGET`). The angle of one output pixel is
``b`` times the detector's (:meth:`DetectorPreprocessing.pixel_mrad`).

Pure array functions: numpy or CuPy, ``xp`` from the inputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ptylive.gpu.backend import get_array_module

logger = logging.getLogger(__name__)

#: The disk is what is brighter than this fraction of the frame's (robust) maximum. A specimen's disk is not flat
#: (PbTiO3, 32 px, 3 mrad: from 0.55 to 1 of the maximum inside it): at 0.5 the holes moved the centre of single
#: frames up to 3 px, at 0.2 at most 0.19 px (0.29 px with 4 masked columns through the disk).
BRIGHT_FIELD_FRACTION = 0.2
ROBUST_MAX_RANK = 16  # the maximum is the 16th brightest good pixel: a few hot pixels do not set the threshold
MIRROR_ROUNDS = 3  # masked pixels filled from their mirror image about the centre, this many times


@dataclass(frozen=True)
class DetectorCrop:
    """Where a series' square frames come from: the box ``[row0, row0 + size) × [col0, col0 + size)`` of the
    detector, binned ``bin_factor × bin_factor`` (``size`` a multiple of it)."""

    row0_px: int
    col0_px: int
    size_px: int
    bin_factor: int = 1

    @property
    def output_px(self) -> int:
        """``D``: the side of the frames the reconstruction fits."""
        return self.size_px // self.bin_factor


def round_half_up(value: float) -> int:
    """``floor(value + 0.5)``: the same on every rank and in every library (``round`` rounds half to even)."""
    return math.floor(value + 0.5)


def crop_around(centre_px: tuple[float, float], crop_px: int, bin_factor: int = 1) -> DetectorCrop:
    """The crop of ``crop_px`` binned by ``bin_factor`` whose output zero frequency is nearest ``centre_px``.

    Raises
    ------
    ValueError
        ``crop_px`` < 1, ``bin_factor`` < 1 or not dividing ``crop_px``.
    """
    check_crop_size(crop_px, bin_factor)
    output = crop_px // bin_factor
    offset = (output // 2) * bin_factor + (bin_factor - 1) / 2
    return DetectorCrop(round_half_up(centre_px[0] - offset), round_half_up(centre_px[1] - offset), crop_px,
                        bin_factor)


def check_crop_size(crop_px: int, bin_factor: int) -> None:
    """ValueError unless ``crop_px`` >= 1 and ``bin_factor`` >= 1 divides it."""
    if crop_px < 1 or bin_factor < 1:
        raise ValueError(f"crop must be >= 1 px and bin >= 1, got crop {crop_px} px, bin {bin_factor}")
    if crop_px % bin_factor:
        raise ValueError(f"bin {bin_factor} does not divide the crop of {crop_px} px "
                         f"(a {crop_px // bin_factor * bin_factor} or {(crop_px // bin_factor + 1) * bin_factor} px "
                         f"crop would)")


def bright_field_centre_px(frames: Any, pixel_mask: Any = None,
                           fraction: float = BRIGHT_FIELD_FRACTION) -> tuple[float, float]:
    """Centre ``(row, col)`` of the bright-field disk: the centre of mass of the pixels of the mean frame brighter
    than ``fraction`` × its maximum (the :data:`ROBUST_MAX_RANK`-th brightest good pixel).

    Masked pixels (a gap through the disk) are left out and then filled from their mirror image about the
    centre found so far (:data:`MIRROR_ROUNDS` times), so a gap off the centre does not pull it away.

    Parameters
    ----------
    frames : (N, H, W) or (H, W) real
    pixel_mask : (H, W) bool, optional
        True = bad pixel.

    Raises
    ------
    ValueError
        No good pixel, or nothing brighter than zero (a dark frame: no disk to find).
    """
    xp = get_array_module(frames)
    mean = frames.mean(axis=0, dtype=np.float64) if frames.ndim == 3 else frames.astype(np.float64)
    bad = xp.zeros(mean.shape, bool) if pixel_mask is None else xp.asarray(pixel_mask, dtype=bool)
    if bad.shape != mean.shape:
        raise ValueError(f"pixel mask {bad.shape} does not match the frames' {mean.shape}")
    values = mean[~bad]
    if values.size == 0:
        raise ValueError("every pixel is masked: no bright-field disk to find")
    rank = values.size - min(ROBUST_MAX_RANK, values.size)
    top = float(xp.partition(values, rank)[rank])
    if not top > 0:
        raise ValueError("the frame is dark (no pixel above 0): no bright-field disk to find")
    disk = (mean > fraction * top) & ~bad
    centre = _centre_of_mass(disk)
    rows, cols = xp.nonzero(bad)
    for _ in range(MIRROR_ROUNDS if rows.size else 0):
        mirror_rows = xp.floor(2 * centre[0] - rows + 0.5).astype(np.int64)
        mirror_cols = xp.floor(2 * centre[1] - cols + 0.5).astype(np.int64)
        inside = (mirror_rows >= 0) & (mirror_rows < mean.shape[0]) & (mirror_cols >= 0) & (mirror_cols < mean.shape[1])
        filled = disk.copy()
        filled[rows[inside], cols[inside]] = disk[mirror_rows[inside], mirror_cols[inside]]
        centre = _centre_of_mass(filled)
    return centre


def _centre_of_mass(disk: Any) -> tuple[float, float]:
    xp = get_array_module(disk)
    rows, cols = xp.nonzero(disk)
    if rows.size == 0:
        raise ValueError("no pixel above the bright-field threshold")
    return float(rows.mean()), float(cols.mean())


@dataclass(frozen=True, eq=False)
class DetectorPreprocessing:
    """How one series' raw ``(H, W)`` frames become ``(D, D)``: see the module docstring.

    Build it with :meth:`build`, which checks everything; the maps are kept cut to the crop box.

    Attributes
    ----------
    detector_shape : (int, int)
        ``(H, W)`` of the raw frames.
    crop : DetectorCrop
    gain : (C, C) float32 or None
        Flatfield over the box, 0 at bad pixels; None: all ones (nothing to multiply).
    output_mask : (D, D) bool or None
        Masked output pixels; None: none.
    """

    detector_shape: tuple[int, int]
    crop: DetectorCrop
    gain: npt.NDArray[np.float32] | None = None
    output_mask: npt.NDArray[np.bool_] | None = None
    _device_copies: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, detector_shape: tuple[int, int], crop: DetectorCrop | None = None, pixel_mask: Any = None,
              flatfield: Any = None) -> DetectorPreprocessing:
        """Check a series' detector settings and cut its maps to the box.

        Parameters
        ----------
        detector_shape : (int, int)
        crop : DetectorCrop, optional
            None: the whole detector, which must then be square.
        pixel_mask : (H, W) or (C, C) bool-like, optional
            Non-zero = bad; the whole detector's or the box's own.
        flatfield : (H, W) or (C, C) real, optional
            Multiplies the raw counts; the whole detector's or the box's own.

        Raises
        ------
        ValueError
            A non-square detector without a crop, a crop larger than the detector or leaving it, a bin that does
            not divide the crop, or a map of another shape; the message names the numbers.
        """
        rows, cols = detector_shape
        if crop is None:
            if rows != cols:
                raise ValueError(f"detector {rows}×{cols} is not square: crop it ([detector] crop_px, or the "
                                 f"series_start's detector crop)")
            crop = DetectorCrop(0, 0, rows)
        check_crop_size(crop.size_px, crop.bin_factor)
        if crop.size_px > min(rows, cols):
            raise ValueError(f"crop of {crop.size_px} px is larger than the {rows}×{cols} detector")
        if not (0 <= crop.row0_px <= rows - crop.size_px and 0 <= crop.col0_px <= cols - crop.size_px):
            raise ValueError(f"crop of {crop.size_px} px at ({crop.row0_px}, {crop.col0_px}) leaves the {rows}×{cols} "
                             f"detector (the bright-field disk too close to its edge for this crop?)")
        box = (slice(crop.row0_px, crop.row0_px + crop.size_px), slice(crop.col0_px, crop.col0_px + crop.size_px))
        bad = _in_box(pixel_mask, "pixel mask", detector_shape, box, crop.size_px)
        bad = bad != 0 if bad is not None else np.zeros((crop.size_px, crop.size_px), bool)
        gain = None
        flat = _in_box(flatfield, "flatfield", detector_shape, box, crop.size_px)
        if flat is not None:
            flat = flat.astype(np.float32)
            bad |= ~(np.isfinite(flat) & (flat > 0))
            gain = np.where(bad, np.float32(0), flat).astype(np.float32)
        elif bad.any():
            gain = (~bad).astype(np.float32)
        output_mask = None
        if bad.any():
            d, b = crop.output_px, crop.bin_factor
            output_mask = np.asarray(bad.reshape(d, b, d, b).any(axis=(1, 3)), dtype=bool)
        return cls((rows, cols), crop, gain, output_mask)

    @property
    def output_px(self) -> int:
        """``D``."""
        return self.crop.output_px

    @property
    def identity(self) -> bool:
        """True when :meth:`apply` changes nothing but the dtype (a square detector as it is)."""
        return (self.gain is None and self.crop.bin_factor == 1 and self.crop.size_px == self.detector_shape[0]
                == self.detector_shape[1])

    def pixel_mrad(self, detector_pixel_mrad: float) -> float:
        """The angle one output pixel spans: ``b`` detector pixels."""
        return detector_pixel_mrad * self.crop.bin_factor

    def apply(self, raw: Any, dtype: Any = np.float32) -> Any:
        """Crop, flatfield, mask and bin raw frames.

        Parameters
        ----------
        raw : (N, H, W) or (H, W) real
            Any real dtype; numpy or CuPy.
        dtype : real dtype of the result

        Returns
        -------
        (N, D, D) or (D, D) ``dtype``
            Masked output pixels hold 0 (:attr:`output_mask` says which).
        """
        if tuple(raw.shape[-2:]) != self.detector_shape:
            raise ValueError(f"frame of {tuple(raw.shape[-2:])} px for a {self.detector_shape} detector")
        xp = get_array_module(raw)
        crop = self.crop
        block = raw[..., crop.row0_px:crop.row0_px + crop.size_px, crop.col0_px:crop.col0_px + crop.size_px]
        block = block.astype(dtype, copy=True)
        if self.gain is not None:
            block *= self._gain_on(xp).astype(dtype, copy=False)
        if crop.bin_factor > 1:
            d, b = crop.output_px, crop.bin_factor
            block = block.reshape(*block.shape[:-2], d, b, d, b).sum(axis=(-3, -1), dtype=dtype)
            if self.output_mask is not None:  # a partly masked bin too: no partial sum reaches the scale's sum
                block[..., self._mask_on(xp)] = 0
        return block

    def _gain_on(self, xp: Any) -> Any:
        """:attr:`gain` on ``xp``'s device, copied there once."""
        return self._on(xp, "gain")

    def _mask_on(self, xp: Any) -> Any:
        return self._on(xp, "output_mask")

    def _on(self, xp: Any, name: str) -> Any:
        values = getattr(self, name)
        if xp is np:
            return values
        key = f"{xp.__name__}.{name}"
        if key not in self._device_copies:
            self._device_copies[key] = xp.asarray(values)
        return self._device_copies[key]


def _in_box(values: Any, what: str, detector_shape: tuple[int, int], box: tuple[slice, slice],
            size_px: int) -> np.ndarray | None:
    """A map cut to the box: the whole detector's (``detector_shape``) or the box's own (``size_px`` square)."""
    if values is None:
        return None
    values = np.asarray(values)
    if values.shape == tuple(detector_shape):
        return values[box]
    if values.shape == (size_px, size_px):
        return values
    shape = "×".join(map(str, values.shape))
    raise ValueError(f"{what} is {shape}; expected the detector's {detector_shape[0]}×{detector_shape[1]} "
                     f"(or the crop's {size_px}×{size_px})")
