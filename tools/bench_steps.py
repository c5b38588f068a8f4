"""Time each step of one gradient pass separately (N = 64, S = 1, B = 16, complex64).

Run: ``python -m ptylive.tools.bench_steps``. Absolute microseconds per position;
compare each line with the ``fft`` line printed in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ptylive.gpu.backend import empty_aligned
from ptylive.gpu.fft import fft2
from ptylive.gpu.fused import backward_slice, detector_amplitude_in_place, transmit
from ptylive.gpu.multislice import loss_and_gradient
from ptylive.gpu.probe import fourier_shift, shift_ramps
from ptylive.gpu.propagation import fresnel_propagator


def _per_position(fn: Callable[[], Any], batch: int, repeats: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats / batch * 1e6


def main(window: int = 64, batch: int = 16) -> None:
    rng = np.random.default_rng(0)
    probe = (rng.standard_normal((window, window)) + 1j * rng.standard_normal((window, window))).astype(np.complex64)
    patches = empty_aligned(np, (1, batch, window, window), np.complex64)
    patches[...] = np.exp(1j * rng.standard_normal(patches.shape))
    shifts = rng.uniform(0, 1, (batch, 2)).astype(np.float32)
    measured = rng.uniform(0, 1, (batch, window, window)).astype(np.float32)
    propagator = fresnel_propagator(np, window, 0.25, 0.025, 2.0)
    wave = fourier_shift(probe, shifts)
    stored = empty_aligned(np, (batch, window, window), np.complex64)
    illumination = np.empty((batch, window, window), np.float32)
    steps: dict[str, Callable[[], Any]] = {
        "gradient pass": lambda: loss_and_gradient(probe, shifts, patches, propagator, measured, "amplitude"),
        "fft": lambda: fft2(wave, normalise=False),
        "fourier_shift": lambda: fourier_shift(probe, shifts),
        "shift_ramps": lambda: shift_ramps(np, window, shifts, np.complex64),
        "transmit": lambda: transmit(wave, patches[0], stored),
        "detector kernel": lambda: detector_amplitude_in_place(wave, measured),
        "backward_slice": lambda: backward_slice(stored, wave, patches[0], illumination),
    }
    for name, fn in steps.items():
        print(f"{name:16s} {_per_position(fn, batch):7.2f} µs per position")


if __name__ == "__main__":
    main()
