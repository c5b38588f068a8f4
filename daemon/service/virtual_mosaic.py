"""Rank 0's scan-shaped virtual images, filled per position as workers report frames.

The collector hands each worker's ``virtual`` message (:mod:`ptylive.daemon.service.messages`) to the series'
view (:mod:`ptylive.daemon.service.series_views`), whose :class:`VirtualMosaic` places the values; HTTP threads
read :meth:`VirtualMosaic.snapshot` (``/virtual.json``, ``/virtual.png``), and the series' final file gets the
snapshot taken when its last ``final`` arrived (the ``virtual/`` group, :mod:`ptylive.daemon.service.results`)::

    worker "virtual" (indices, bf, adf0…, com_x, com_y) ─► VirtualMosaic.add ─► snapshot() ─► JSON, PNG, file
                                                            (frame k at (k // cols, k % cols))   + iDPC from CoM

Frame indices are the scan's position indices (a DECTRIS image number is mapped to one before it reaches a
worker: :mod:`ptylive.streaming.scan_geometry`), so raster order holds for snake and flyback scans too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ptylive.streaming.virtual_images import VirtualDetector, integrated_dpc, kind_descriptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class VirtualSnapshot:
    """Every virtual image of a series as of one moment: copies, never changed.

    Attributes
    ----------
    images : dict of kind to (rows, cols) float64
        NaN where no frame arrived (for ``idpc``: where CoM is NaN); ``idpc`` once CoM is present.
    detector : VirtualDetector or None
        The rings the workers used (None before a worker said).
    version : int
        :meth:`VirtualMosaic.add` calls before this snapshot.
    """

    series_id: str
    scan_shape: tuple[int, int]
    frames_filled: int
    version: int
    detector: VirtualDetector | None
    images: dict[str, npt.NDArray[np.float64]]

    def describe(self) -> list[dict[str, Any]]:
        """``/virtual.json``'s ``images``: per kind ``kind``, ``label``, ``units``, ``shape``, ``inner_mrad``,
        ``outer_mrad``, ``finite_min``, ``finite_max`` (None while no pixel is finite), in the order of
        :func:`~ptylive.streaming.virtual_images.kind_descriptions`."""
        known = kind_descriptions(self.detector) if self.detector is not None else {}
        order = [kind for kind in known if kind in self.images] + [k for k in self.images if k not in known]
        entries = []
        for kind in order:
            image = self.images[kind]
            finite = image[np.isfinite(image)]
            info = known.get(kind, {"label": kind, "units": "", "inner_mrad": None, "outer_mrad": None})
            entries.append({"kind": kind, **info, "shape": list(image.shape),
                            "finite_min": float(finite.min()) if finite.size else None,
                            "finite_max": float(finite.max()) if finite.size else None})
        return entries


class VirtualMosaic:
    """Per-kind float64 images of shape (rows, cols), NaN where no frame has arrived.

    Frame ``i`` lands at (i // cols, i % cols), the raster order of the scan. :meth:`add` and :meth:`snapshot`
    are thread-safe (the collector adds while HTTP threads read).
    """

    def __init__(self, series_id: str, scan_shape: tuple[int, int], detector: VirtualDetector | None = None) -> None:
        rows, cols = scan_shape
        if rows <= 0 or cols <= 0:
            raise ValueError(f"scan shape {scan_shape} must be positive")
        self.series_id = series_id
        self.scan_shape = (int(rows), int(cols))
        self.detector = detector
        self._images: dict[str, np.ndarray] = {}
        self._filled = np.zeros(rows * cols, dtype=bool)
        self._version = 0
        self._cached: VirtualSnapshot | None = None
        self._lock = threading.Lock()

    @property
    def frames_filled(self) -> int:
        with self._lock:
            return int(self._filled.sum())

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

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
        arrays = {kind: np.asarray(value, dtype=np.float64) for kind, value in values.items()}
        for kind, value in arrays.items():
            if value.shape != indices.shape:
                raise ValueError(f"{kind}: {value.shape} values for {indices.shape} indices")
        with self._lock:
            inside = (indices >= 0) & (indices < self._filled.size)
            for kind, value in arrays.items():
                image = self._images.setdefault(kind, np.full(self._filled.size, np.nan))
                image[indices[inside]] = value[inside]
            self._filled[indices[inside]] = True
            self._version += 1
        return int((~inside).sum())

    def images(self) -> dict[str, np.ndarray]:
        """Copies of each kind, shape (rows, cols), with ``idpc`` once CoM is present."""
        return {kind: image.copy() for kind, image in self.snapshot().images.items()}

    def snapshot(self) -> VirtualSnapshot:
        """Every image now (iDPC integrated outside the lock; the same object until the next :meth:`add`)."""
        with self._lock:
            if self._cached is not None and self._cached.version == self._version:
                return self._cached
            version, filled = self._version, int(self._filled.sum())
            out = {kind: image.reshape(self.scan_shape).copy() for kind, image in self._images.items()}
        if "com_x" in out and "com_y" in out:  # missing CoM counts as 0 in the integral, and is NaN in the image
            idpc = integrated_dpc(out["com_x"], out["com_y"])
            idpc[~(np.isfinite(out["com_x"]) & np.isfinite(out["com_y"]))] = np.nan
            out["idpc"] = idpc
        snapshot = VirtualSnapshot(self.series_id, self.scan_shape, filled, version, self.detector, out)
        with self._lock:
            if self._version == version:
                self._cached = snapshot
        return snapshot
