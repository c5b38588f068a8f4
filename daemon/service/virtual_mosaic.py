"""Rank 0's scan-shaped virtual images, filled per position as workers report frames.

Issue 14 item 3: built and tested on its own; not yet fed by the collector nor served.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ptylive.streaming.virtual_images import integrated_dpc

log = logging.getLogger(__name__)


class VirtualMosaic:
    """Per-kind float64 images of shape (rows, cols), NaN where no frame has arrived.

    Frame ``i`` lands at (i // cols, i % cols), the raster order of the scan.
    """

    def __init__(self, series_id: str, scan_shape: tuple[int, int]) -> None:
        rows, cols = scan_shape
        if rows <= 0 or cols <= 0:
            raise ValueError(f"scan shape {scan_shape} must be positive")
        self.series_id = series_id
        self.scan_shape = (int(rows), int(cols))
        self._images: dict[str, np.ndarray] = {}
        self._filled = np.zeros(rows * cols, dtype=bool)

    @property
    def frames_filled(self) -> int:
        return int(self._filled.sum())

    def add(self, indices: np.ndarray, values: Mapping[str, np.ndarray]) -> int:
        """Place per-frame values; indices outside the scan are dropped and counted.

        Parameters
        ----------
        indices : array of int, shape (N,)
        values : mapping of kind to array, each shape (N,)

        Returns
        -------
        int
            How many indices were out of the scan (dropped).
        """
        indices = np.asarray(indices, dtype=np.int64)
        inside = (indices >= 0) & (indices < self._filled.size)
        for kind, value in values.items():
            value = np.asarray(value, dtype=np.float64)
            if value.shape != indices.shape:
                raise ValueError(f"{kind}: {value.shape} values for {indices.shape} indices")
            image = self._images.setdefault(kind, np.full(self._filled.size, np.nan))
            image[indices[inside]] = value[inside]
        self._filled[indices[inside]] = True
        return int((~inside).sum())

    def images(self) -> dict[str, np.ndarray]:
        """Copies of each kind, shape (rows, cols), with ``idpc`` once CoM is present."""
        out = {kind: image.reshape(self.scan_shape).copy() for kind, image in self._images.items()}
        if "com_x" in out and "com_y" in out:
            out["idpc"] = integrated_dpc(out["com_x"], out["com_y"])
        return out
