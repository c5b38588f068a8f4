"""Compile the numba kernels before the first frame arrives.

The fused CPU kernels (:mod:`ptylive.gpu.fused`, :mod:`ptylive.gpu.patches`) are compiled at first use and
cached on disk (``cache=True``). On a fresh install that first use takes seconds, which a streaming worker
would otherwise spend inside its first iteration, delaying the first preview. Running every kernel once on
tiny arrays moves that cost to start-up, before the worker reports ready.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ptylive.gpu.loss import LOSSES
from ptylive.gpu.multislice import loss_and_gradient
from ptylive.gpu.patches import SliceWindows, TileSink, accumulate_patches, extract_patches

logger = logging.getLogger(__name__)


def compile_kernels(real_dtype: Any, complex_dtype: Any) -> float:
    """Run the multislice gradient (every loss, two slices, upsampled far field) and the patch kernels once.

    Returns the seconds it took (mostly compilation on a fresh install, milliseconds once cached).
    """
    began = time.perf_counter()
    window, detector = 8, 4
    volume = np.ones((2, window + 1, window + 1), dtype=complex_dtype)
    starts = np.zeros((1, 2), dtype=np.int64)
    patches = extract_patches(volume, starts, window)
    probe = np.full((window, window), 1.0 / window, dtype=complex_dtype)
    propagator = np.ones((window, window), dtype=complex_dtype)
    gradient = np.zeros_like(volume)
    illumination = np.zeros(volume.shape, dtype=real_dtype)
    shifts = np.zeros((1, 2), dtype=real_dtype)
    for loss in LOSSES:
        measured = np.ones((1, detector, detector), dtype=real_dtype)
        result = loss_and_gradient(probe, shifts, patches, propagator, measured, loss)
        accumulate_patches(gradient, starts, result.object_gradient)
        accumulate_patches(illumination, starts, result.illumination)
        # the engine's path: windows read slice by slice, gradients scattered into the tile slice by slice
        loss_and_gradient(probe, shifts, SliceWindows(volume, starts, window), propagator, measured, loss,
                          want_position_gradient=True, sink=TileSink(gradient, illumination, starts))
    SliceWindows(volume, starts, window, gradient, 0.5, 1.0)[0]  # a line search's trial windows
    seconds = time.perf_counter() - began
    logger.debug("kernels ready in %.2f s", seconds)
    return seconds
