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

    Pass ``propagator.conj()`` for the adjoint. The two FFTs are unscaled and
    their ``1/N²`` rides on the (small) kernel, saving two passes over the batch.
    """
    fft2(wave, normalise=False)
    wave *= propagator * propagator.real.dtype.type(1.0 / (wave.shape[-1] * wave.shape[-2]))
    return ifft2(wave, normalise=False)


def _blocks(window_px: int, detector_px: int) -> list[tuple[slice, slice]]:
    """(detector slice, FFT-order slice) pairs along one axis: the crop as two block copies.

    Frequencies ``[−D/2, D/2)`` in FFT order are ``[N − D//2, N)`` then
    ``[0, D − D//2)``. Two slices per axis replace a fancy-index gather, which
    cost as much as an FFT (profiled at N = 256).
    """
    half = detector_px // 2
    return [(slice(0, half), slice(window_px - half, window_px)),
            (slice(half, detector_px), slice(0, detector_px - half))]


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
    window_px = exit_wave.shape[-1]
    if detector_px > window_px:
        raise ValueError(f"detector_px={detector_px} exceeds window_px={window_px}")
    spectrum = fft2(exit_wave, normalise=False)
    scale = exit_wave.real.dtype.type(1.0 / window_px)  # ortho, applied during the crop
    out = xp.empty((*exit_wave.shape[:-2], detector_px, detector_px), exit_wave.dtype)
    blocks = _blocks(window_px, detector_px)
    for rows_out, rows_in in blocks:
        for cols_out, cols_in in blocks:
            xp.multiply(spectrum[..., rows_in, cols_in], scale, out=out[..., rows_out, cols_out])
    return out


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
    if field.shape[-1] != window_px:
        out[...] = 0
    scale = out.real.dtype.type(1.0 / window_px)
    blocks = _blocks(window_px, field.shape[-1])
    for rows_det, rows_fft in blocks:
        for cols_det, cols_fft in blocks:
            xp.multiply(field[..., rows_det, cols_det], scale, out=out[..., rows_fft, cols_fft])
    return ifft2(out, normalise=False)
