"""Batched multislice forward model and its gradient.

For probe positions ``j`` of a batch and slices ``s = 0 … S−1``::

    ψ_0 = shift(P, d_j)                     sub-pixel Fourier shift
    φ_s = ψ_s · O_s[window_j]               transmission
    ψ_{s+1} = F⁻¹[H · F φ_s]                Fresnel propagation
    Ψ_j = crop(fftshift(F φ_{S−1}))         far field on the detector

The gradient is back-propagated through exactly these steps (each linear step
by its adjoint), see :func:`loss_and_gradient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ptylive.gpu.backend import empty_aligned, get_array_module
from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.fused import backward_slice, detector_amplitude_in_place, transmit
from ptylive.gpu.loss import loss_function
from ptylive.gpu.probe import fourier_shift
from ptylive.gpu.propagation import farfield, farfield_adjoint, propagate


@dataclass(frozen=True)
class BatchGradient:
    """Result of one batch.

    Attributes
    ----------
    loss : float
        Sum of the loss over the batch.
    object_gradient : (S, B, N, N) complex
        Gradient with respect to each slice's window.
    illumination : (S, B, N, N) real
        ``|ψ_s|²``, the illumination preconditioner's contribution.
    probe_gradient : (N, N) complex or None
        Summed over the batch; None unless requested.
    """

    loss: float
    object_gradient: Any
    illumination: Any
    probe_gradient: Any | None


def forward(probe: Any, shifts_px: Any, patches: Any, propagator: Any, detector_px: int) -> Any:
    """Model far field.

    Parameters
    ----------
    probe : (N, N) complex
    shifts_px : (B, 2) float
        Sub-pixel shift of each position inside its window.
    patches : (S, B, N, N) complex
        Object windows.
    propagator : (N, N) complex
    detector_px : int

    Returns
    -------
    (B, D, D) complex
    """
    wave = fourier_shift(probe, shifts_px)
    for s in range(patches.shape[0]):
        wave *= patches[s]
        if s < patches.shape[0] - 1:
            propagate(wave, propagator)
    return farfield(wave, detector_px)


def loss_and_gradient(
    probe: Any, shifts_px: Any, patches: Any, propagator: Any, measured: Any,
    loss: str = "amplitude", want_probe_gradient: bool = False,
) -> BatchGradient:
    """Loss of one batch and its gradient with respect to object and probe.

    Parameters
    ----------
    probe : (N, N) complex
    shifts_px : (B, 2) float
    patches : (S, B, N, N) complex
        Object windows; read only.
    propagator : (N, N) complex
    measured : (B, D, D) real
        Target of the loss (``√(I/α)`` for amplitude, ``I/α`` for Poisson).
    loss : {"amplitude", "poisson"}
    want_probe_gradient : bool

    Returns
    -------
    BatchGradient
    """
    xp = get_array_module(patches)
    n_slices, batch, n, _ = patches.shape
    waves = empty_aligned(xp, patches.shape, patches.dtype)  # ψ_s, later the gradients
    illumination = xp.empty(patches.shape, dtype=patches.real.dtype)
    wave = fourier_shift(probe, shifts_px)
    for s in range(n_slices):
        transmit(wave, patches[s], waves[s])  # waves[s] = ψ_s; wave = φ_s
        if s < n_slices - 1:
            propagate(wave, propagator)
    if loss == "amplitude" and xp is np:  # one pass from the exit wave's spectrum to the gradient's
        value = detector_amplitude_in_place(fft2(wave, normalise=False), measured)
        gradient = ifft2(wave, normalise=False)  # ∂L/∂φ_{S-1}
    else:
        value, field_gradient = loss_function(loss)(farfield(wave, measured.shape[-1]), measured)
        gradient = farfield_adjoint(field_gradient, n, out=wave)  # ∂L/∂φ_{S-1}
    backward = propagator.conj()
    for s in range(n_slices - 1, -1, -1):
        # |ψ_s|², ∂L/∂O_s[window] = conj(ψ_s) ∂L/∂φ_s (into waves[s]), ∂L/∂ψ_s = conj(O_s) ∂L/∂φ_s
        backward_slice(waves[s], gradient, patches[s], illumination[s])
        if s > 0:
            propagate(gradient, backward)  # ∂L/∂φ_{s-1}
    probe_gradient = None
    if want_probe_gradient:  # adjoint of broadcast-and-shift: shift back, sum over positions
        probe_gradient = fourier_shift(gradient, -xp.asarray(shifts_px)).sum(axis=0)
    return BatchGradient(value, waves, illumination, probe_gradient)
