"""A worker's virtual detector values (BF, ADF rings, CoM): one row per frame, computed as it is stored, sent
to rank 0 at a low rate.

:meth:`VirtualFrames.add` is called by :meth:`~ptylive.daemon.worker.frames.FrameStore.add` with the intensities
the store now holds for the frame (raw, before they become loss targets), in the store's array module: one
``(K, D·D) @ (D·D,)`` product with the series' weights (:func:`~ptylive.streaming.virtual_images.detector_weights`,
built once), written into a preallocated ``(P, K)`` row on the same device, so a GPU worker waits for nothing.
:meth:`VirtualFrames.take` copies the rows added since the last call to the host, for the worker's ``virtual``
message (:mod:`ptylive.daemon.service.messages`)::

    FrameStore.add(frame) ── VirtualFrames.add(row, intensities) ── sums[row] = W @ I      (device, per frame)
    Worker.drain() (≤ 2 × preview rate, and before the final) ── take() ── "virtual" ──► rank 0's VirtualMosaic
                                                              ── pattern() ── "pattern" ──► rank 0's mean pattern

The store's running sum of the frames themselves (:meth:`VirtualFrames.pattern`, for rank 0's mean diffraction
pattern) is kept beside the sums, on the same device; worker 0 adds its probe's amplitude to the ``pattern``
message (:func:`probe_amplitude`).

The detector (:func:`series_detector`) has α the start's convergence semi-angle, the ADF rings of ``[virtual]
adf_annuli_mrad`` (cut at the stored frames' inscribed edge) or by default one ring from 1.5 α to that edge, and
the angle of one stored pixel the geometry's ``detector_pixel_mrad`` (the detector's times its bin factor: frames
are stored at the detector's resolution whatever the upsampling), so the rings follow whatever the frames went
through before they were stored (``docs/physics.md``, "Virtual detector images").
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.preview import block_mean, downsample_factor
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.virtual_images import (
    SUM_NAMES,
    VirtualDetector,
    configured_detector,
    default_detector,
    detector_weights,
    values_from_sums,
)

logger = logging.getLogger(__name__)

PROBE_MAX_PX = 128  # the probe amplitude rank 0 shows is block-averaged to at most this side


def series_detector(start: SeriesStart, geometry: SeriesGeometry,
                    annuli_mrad: tuple[tuple[float, float], ...] | None = None) -> VirtualDetector:
    """The virtual detector of a series' stored ``geometry.detector_px``-square frames.

    ``annuli_mrad``: the ADF rings (``[virtual] adf_annuli_mrad``), cut at the frames' inscribed edge or left out
    past it, each logged at WARNING (:func:`~ptylive.streaming.virtual_images.configured_detector`); None: the
    default ring from 1.5 α to the edge.
    """
    alpha, pixel, side = start.convergence_semiangle_mrad, geometry.detector_pixel_mrad, geometry.detector_px
    if annuli_mrad is None:
        return default_detector(alpha, pixel, side)
    detector, notes = configured_detector(alpha, pixel, side, annuli_mrad)
    for note in notes:
        logger.warning("series %r: %s ([virtual] adf_annuli_mrad; %d px frames of %g mrad)", start.series_id, note,
                       side, pixel)
    return detector


class VirtualFrames:
    """Per-frame detector sums of one worker's frames of one series, and which rows rank 0 has not had yet.

    Parameters
    ----------
    detector : VirtualDetector
    global_index : (P,) int64
        The frame index of each row (the store's ``global_index``).
    detector_px : int
        Side D of the frames :meth:`add` is given.
    xp : module
        numpy or CuPy: the store's.
    """

    def __init__(self, detector: VirtualDetector, global_index: npt.NDArray[np.int64], detector_px: int,
                 xp: Any = np) -> None:
        self.detector = detector
        self.global_index = np.asarray(global_index, dtype=np.int64)
        self.xp = xp
        self.names, self._weights = detector_weights(detector, detector_px, xp)
        self._sums = xp.zeros((len(self.global_index), len(self.names)), xp.float64)
        self._pending: list[int] = []
        self._pattern = xp.zeros((detector_px, detector_px), xp.float64)
        self.frames_summed = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        """The per-frame kinds :meth:`take` returns, in order: ``bf``, ``adf0``…, ``com_x``, ``com_y``."""
        return (*(name for name in self.names if name not in SUM_NAMES), "com_x", "com_y")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, row: int, intensities: Any) -> None:
        """Sum row ``row``'s frame ``intensities`` ``(D, D)`` (the store's array module) into its virtual values."""
        self._sums[row] = self._weights @ intensities.reshape(-1).astype(self._weights.dtype)
        self._pattern += intensities
        self.frames_summed += 1
        self._pending.append(row)

    def pattern(self) -> tuple[npt.NDArray[np.float64], int]:
        """The sum of every frame :meth:`add` was given, ``(D, D)`` float64 on the host, and how many."""
        return np.array(to_numpy(self._pattern), dtype=np.float64), self.frames_summed  # a copy: sent zero-copy

    def take(self) -> tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[np.float32]]] | None:
        """The frames added since the last call: ``(frame indices (N,), {kind: (N,) float32})``; None if none."""
        if not self._pending:
            return None
        rows = np.asarray(self._pending, dtype=np.int64)
        self._pending = []
        sums = to_numpy(self._sums[self.xp.asarray(rows)])
        values = values_from_sums(self.names, sums)
        return self.global_index[rows], {kind: np.ascontiguousarray(values[kind], dtype=np.float32)
                                         for kind in self.kinds}


def probe_amplitude(probe: Any, max_px: int = PROBE_MAX_PX) -> tuple[npt.NDArray[np.float32], int]:
    """The probe's amplitude ``√(Σ_k |P_k|²)`` (over its modes, ``(N, N)`` or ``(K, N, N)``), block-averaged to at
    most ``max_px`` a side on its device: ``(image (h, w) float32 on the host, factor)``."""
    xp = get_array_module(probe)
    modes = probe.reshape(-1, *probe.shape[-2:])
    amplitude = xp.sqrt((xp.abs(modes) ** 2).sum(axis=0))
    factor = downsample_factor(amplitude.shape, max_px)
    return np.ascontiguousarray(to_numpy(block_mean(amplitude, factor)), dtype=np.float32), factor
