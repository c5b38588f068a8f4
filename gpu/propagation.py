"""Fresnel propagation between slices: ``ψ' = F⁻¹[H · F ψ]``.

``H(k) = exp(−iπ λ Δz |k|²)``; the adjoint uses ``conj(H)`` (propagation by −Δz).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module
from ptylive.gpu.fft import fft2, ifft2


def fresnel_propagator(
    xp: ModuleType, window_px: int, pixel_size_A: float, wavelength_A: float,
    slice_thickness_A: float, dtype: Any = np.complex64,
) -> Any:
    """Fresnel kernel in FFT order.

    Returns
    -------
    (N, N) complex
        ``exp(−iπ λ Δz |k|²)``.
    """
    if not slice_thickness_A >= 0:
        raise ValueError(f"slice_thickness_A must be >= 0, got {slice_thickness_A!r}")
    k = np.fft.fftfreq(window_px, d=pixel_size_A)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    return xp.asarray(np.exp(-1j * math.pi * wavelength_A * slice_thickness_A * k2).astype(dtype))


def propagate(wave: Any, propagator: Any) -> Any:
    """Propagate ``wave`` (..., N, N) in place by the kernel ``propagator`` (N, N).

    Pass ``propagator.conj()`` for the adjoint.
    """
    fft2(wave)
    wave *= propagator
    return ifft2(wave)


def farfield_indices(xp: ModuleType, window_px: int, detector_px: int) -> Any:
    """FFT-order indices of the central ``detector_px`` frequencies of a window.

    Taking ``F[idx][:, idx]`` of an unshifted FFT equals cropping the centre of
    ``fftshift(F)``: detector pixel ``detector_px // 2`` holds zero frequency.
    """
    if detector_px > window_px:
        raise ValueError(f"detector_px={detector_px} exceeds window_px={window_px}")
    return xp.asarray((np.arange(detector_px) - detector_px // 2) % window_px)


def farfield(exit_wave: Any, detector_px: int) -> Any:
    """Far field on the detector: centre crop of ``fftshift(F exit)`` (ortho).

    Parameters
    ----------
    exit_wave : (B, N, N) complex
        Overwritten (transformed in place).
    detector_px : int
        ``N`` for no upsampling, ``N / u`` for u-fold real-space upsampling.

    Returns
    -------
    (B, D, D) complex
    """
    xp = get_array_module(exit_wave)
    idx = farfield_indices(xp, exit_wave.shape[-1], detector_px)
    spectrum = fft2(exit_wave)
    return spectrum[:, idx[:, None], idx[None, :]]


def farfield_adjoint(field: Any, window_px: int, out: Any) -> Any:
    """Adjoint of :func:`farfield`: zero-pad into FFT order and inverse FFT.

    Parameters
    ----------
    field : (B, D, D) complex
    window_px : int
    out : (B, N, N) complex
        Destination (aligned for speed); overwritten and returned.
    """
    xp = get_array_module(field)
    idx = farfield_indices(xp, window_px, field.shape[-1])
    if field.shape[-1] != window_px:
        out[...] = 0
    out[:, idx[:, None], idx[None, :]] = field
    return ifft2(out)
