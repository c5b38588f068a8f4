"""Operator previews: projected phase, block downsampling, the tile mosaic and PNG encoding.

Each worker rank sends rank 0 the projected phase of its tile, downsampled by a
common integer ``factor``; rank 0 places every tile preview into one coarse
:class:`Mosaic` and encodes it with :func:`to_png` for the HTTP viewer::

    object pixels (H×W)                    coarse mosaic (ceil(H/f)×ceil(W/f))
    ┌──────────┬──────────┐                ┌─────┬─────┐
    │ tile 0   │ tile 1   │   block_mean   │  0  │  1  │   NaN where no tile
    │ rows     │          │  ───────────►  ├─────┼─────┤   has reported yet
    ├──────────┼──────────┤   (f×f means)  │  2  │ NaN │
    │ tile 2   │ (pending)│                └─────┴─────┘
    └──────────┴──────────┘

All functions here are pure except :class:`Mosaic`, which holds the coarse image.
"""

from __future__ import annotations

import io
import logging
import math
import threading

import numpy as np
import numpy.typing as npt
from PIL import Image

from ptylive.gpu.backend import get_array_module, to_numpy

logger = logging.getLogger(__name__)

MID_GREY = 128


def downsample_factor(shape: tuple[int, int], max_px: int) -> int:
    """Return the smallest integer ``f >= 1`` with ``ceil(side / f) <= max_px`` for both sides.

    Parameters
    ----------
    shape : (2,) int
        Object shape ``(H, W)`` in pixels, both positive.
    max_px : int
        Largest allowed side of the downsampled image, positive.

    Raises
    ------
    ValueError
        If a side or ``max_px`` is not positive.
    """
    if max_px < 1:
        raise ValueError(f"max_px must be >= 1, got {max_px}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive sides (H, W), got {shape}")
    # ceil(side / f) <= max_px  <=>  side / f <= max_px  <=>  f >= side / max_px
    return max(1, *(math.ceil(side / max_px) for side in shape))


def projected_phase(volume: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Sum the phase of every slice's transmission.

    Parameters
    ----------
    volume : (S, h, w) complex
        Transmission of each slice; numpy or CuPy (the array module follows the input).

    Returns
    -------
    (h, w) float32
        ``sum_s angle(volume[s])`` as a host (numpy) array, in radians.
    """
    xp = get_array_module(volume)
    transmission = xp.asarray(volume)
    if transmission.ndim != 3:
        raise ValueError(f"volume must have shape (S, h, w), got {transmission.shape}")
    phase = xp.angle(transmission).sum(axis=0).astype(xp.float32)
    return np.ascontiguousarray(to_numpy(phase), dtype=np.float32)


def block_mean(image: npt.ArrayLike, factor: int) -> npt.NDArray[np.float32]:
    """Average ``factor × factor`` blocks; partial edge blocks average only their real pixels.

    Parameters
    ----------
    image : (h, w) real
        Image to downsample; numpy or CuPy (the array module follows the input).
    factor : int
        Block side, ``>= 1``. ``1`` returns a float32 copy.

    Returns
    -------
    (ceil(h / factor), ceil(w / factor)) float32
        Block means, accumulated in float64, in the input's array module.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    xp = get_array_module(image)
    pixels = xp.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"image must have shape (h, w), got {pixels.shape}")
    if factor == 1:
        return pixels.astype(np.float32, copy=True)
    rows, cols = pixels.shape
    coarse_rows, coarse_cols = -(-rows // factor), -(-cols // factor)
    padded = xp.zeros((coarse_rows * factor, coarse_cols * factor), np.float64)
    padded[:rows, :cols] = pixels
    sums = padded.reshape(coarse_rows, factor, coarse_cols, factor).sum(axis=(1, 3))
    row_counts = np.minimum(rows - np.arange(coarse_rows) * factor, factor)
    col_counts = np.minimum(cols - np.arange(coarse_cols) * factor, factor)
    return (sums / xp.asarray(np.outer(row_counts, col_counts))).astype(np.float32)


def slice_phases(volume: npt.ArrayLike, factor: int) -> npt.NDArray[np.float32]:
    """Each slice's phase, block-averaged: the previews behind the viewer's slice selector.

    Parameters
    ----------
    volume : (S, h, w) complex
        Transmission of each slice; numpy or CuPy (averaged on the device, only the result is copied).
    factor : int
        Block side, ``>= 1``, as for :func:`block_mean`.

    Returns
    -------
    (S, ceil(h / factor), ceil(w / factor)) float32
        Host array. Its sum over slices is ``block_mean(projected_phase(volume), factor)`` to float32 rounding.
    """
    xp = get_array_module(volume)
    transmission = xp.asarray(volume)
    if transmission.ndim != 3:
        raise ValueError(f"volume must have shape (S, h, w), got {transmission.shape}")
    return np.stack([to_numpy(block_mean(xp.angle(layer), factor)) for layer in transmission])


class Mosaic:
    """Coarse image of the whole object, filled tile by tile from downsampled previews.

    Pixels no tile has reported yet are NaN. A tile ``(row0, row1, col0, col1)``
    lands at coarse rows ``row0 // f ...`` and columns ``col0 // f ...``. When
    ``row0`` or ``col0`` is not a multiple of ``f`` the tile is still placed at
    ``floor(row0 / f)``, so two adjacent tiles may overlap by one coarse pixel;
    the later placement wins. Choose tile edges on multiples of ``f`` to avoid it.

    :meth:`place` and :attr:`image` are thread-safe (rank 0 receives while the
    HTTP server reads).

    Parameters
    ----------
    object_shape : (2,) int
        Object shape ``(H, W)`` in pixels.
    factor : int
        Common downsampling factor ``f >= 1`` of every tile preview.
    """

    def __init__(self, object_shape: tuple[int, int], factor: int) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if len(object_shape) != 2 or min(object_shape) < 1:
            raise ValueError(f"object_shape must be two positive sides (H, W), got {object_shape}")
        self.object_shape = (int(object_shape[0]), int(object_shape[1]))
        self.factor = int(factor)
        coarse_shape = (-(-self.object_shape[0] // factor), -(-self.object_shape[1] // factor))
        self._image = np.full(coarse_shape, np.nan, np.float32)
        self._version = 0
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int]:
        """Coarse shape ``(ceil(H / f), ceil(W / f))``."""
        return (self._image.shape[0], self._image.shape[1])

    @property
    def version(self) -> int:
        """Number of :meth:`place` calls so far."""
        with self._lock:
            return self._version

    @property
    def image(self) -> npt.NDArray[np.float32]:
        """Copy of the coarse image, ``(ceil(H / f), ceil(W / f))`` float32, NaN where empty."""
        with self._lock:
            return self._image.copy()

    def expected_shape(self, tile: tuple[int, int, int, int]) -> tuple[int, int]:
        """Shape ``(ceil((row1 - row0) / f), ceil((col1 - col0) / f))`` a tile's preview must have."""
        row0, row1, col0, col1 = tile
        return (-(-(row1 - row0) // self.factor), -(-(col1 - col0) // self.factor))

    def place(self, tile: tuple[int, int, int, int], image: npt.ArrayLike) -> None:
        """Put one tile's preview into the mosaic.

        Parameters
        ----------
        tile : (4,) int
            Half-open ``(row0, row1, col0, col1)`` in object pixels, inside ``(H, W)``.
        image : (ceil((row1 - row0) / f), ceil((col1 - col0) / f)) real
            The tile's downsampled preview (e.g. from :func:`block_mean`).

        Raises
        ------
        ValueError
            If the tile is empty or outside the object, or the preview has the wrong shape.
        """
        row0, row1, col0, col1 = (int(edge) for edge in tile)
        height, width = self.object_shape
        if not (0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width):
            raise ValueError(f"tile {tuple(tile)} is empty or outside the object of shape {self.object_shape}")
        preview = np.asarray(image)
        expected = self.expected_shape((row0, row1, col0, col1))
        if preview.shape != expected:
            raise ValueError(f"preview of tile {(row0, row1, col0, col1)} has shape {preview.shape}; "
                             f"expected {expected} at factor {self.factor}")
        top, left = row0 // self.factor, col0 // self.factor
        # floor(row0/f) + ceil((row1-row0)/f) <= ceil(row1/f) <= ceil(H/f): never past the edge.
        with self._lock:
            self._image[top:top + expected[0], left:left + expected[1]] = preview
            self._version += 1
        logger.debug("placed tile %s at coarse (%d, %d)", (row0, row1, col0, col1), top, left)


def display_range(image: npt.ArrayLike) -> tuple[float, float] | None:
    """The values :func:`to_png` maps to black and white by default: the 1st and 99th percentiles of the finite
    pixels, or None when there are none (the viewer's colour bar prints them).

    Parameters
    ----------
    image : (h, w) real
        Image as given to :func:`to_png`; NaN and infinities are left out.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = (float(p) for p in np.percentile(finite, [1.0, 99.0]))
    return low, high


def to_png(image: npt.ArrayLike, low_high: tuple[float, float] | None = None) -> bytes:
    """Encode a float image as an 8-bit grayscale PNG.

    Parameters
    ----------
    image : (h, w) real
        Image to encode; NaN means "no data".
    low_high : (2,) float, optional
        Values mapped to black and white. Default: the 1st and 99th percentiles of the finite pixels.

    Returns
    -------
    bytes
        PNG file, mode ``L``, size ``w × h``. Values are scaled linearly and clipped
        (``+inf`` white, ``-inf`` black); NaN pixels are black. A constant image
        (``low == high``) is drawn mid-grey; an all-NaN image is black.
    """
    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"image must have shape (h, w), got {values.shape}")
    if low_high is not None and low_high[1] < low_high[0]:
        raise ValueError(f"low_high must satisfy low <= high, got {low_high}")
    gray = np.zeros(values.shape, np.uint8)
    present = ~np.isnan(values)
    finite = np.isfinite(values)
    if finite.any() or low_high is not None:
        if low_high is None:
            low, high = display_range(values) or (0.0, 0.0)
        else:
            low, high = float(low_high[0]), float(low_high[1])
        if high > low:
            scaled = (np.clip(values[present], low, high) - low) * (255.0 / (high - low))
            gray[present] = np.rint(scaled).astype(np.uint8)
        else:
            gray[present] = MID_GREY
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()
