"""Data-fidelity losses on the detector and their gradients.

Gradients are ``g = ∂L/∂Re Ψ + i ∂L/∂Im Ψ`` (twice the Wirtinger derivative
∂L/∂Ψ*), so that a perturbation ``δΨ`` changes the loss by ``Re Σ conj(g) δΨ``.

Measured intensities are divided once by the fitted scale ``α`` of
:func:`fit_intensity_scale` before they reach these functions.

With K incoherent probe modes the model intensity is ``Σ_k |Ψ_k|²`` (:func:`model_intensity`):
the same losses take (K, B, D, D) fields, every mode's gradient the per-pixel factor times its
own field.

A detector pixel whose target is negative (:data:`MASKED_TARGET`, set by :func:`measured_target`'s
``mask``) is masked: it adds nothing to the loss and gets no gradient. Rescaling a target by a positive
factor keeps it masked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ptylive.gpu.backend import get_array_module

LOSSES = ("amplitude", "poisson")
AMPLITUDE_DELTA_PER_PIXEL = 1e-3  # δ = this / D, see amplitude_loss
MASKED_TARGET = -1.0  # a target below zero marks a masked detector pixel (no loss, no gradient)


def model_intensity(fields: Any) -> Any:
    """The model intensity of far fields: ``|Ψ|²`` of (B, D, D), or ``Σ_k |Ψ_k|²`` of K modes' (K, B, D, D).

    Returns
    -------
    (B, D, D) real
    """
    intensity = fields.real * fields.real + fields.imag * fields.imag
    return intensity.sum(axis=0) if fields.ndim == 4 else intensity


def amplitude_loss(field: Any, measured_amplitude: Any) -> tuple[float, Any]:
    """Gaussian amplitude loss ``L = Σ (√(m + δ²) − √I)²``, ``m`` the :func:`model_intensity`.

    The plain ``|Ψ|`` has a gradient ``−2√I Ψ/|Ψ|`` whose direction at
    ``Ψ = 0`` is set by rounding noise: from a vacuum start every dark-field
    pixel is such a point, which made runs differ at 1e-8 between FFT plans.
    ``δ = 1e-3 / D`` (D detector pixels; ``Σ|Ψ|² ≈ 1`` per frame, so a typical
    amplitude is ``1/D``) makes the loss smooth and changes no physically
    meaningful amplitude.

    Parameters
    ----------
    field : (B, D, D) or (K, B, D, D) complex
        Model far field Ψ, or that of each of K incoherent probe modes.
    measured_amplitude : (B, D, D) real
        ``√(I/α)``; negative where a pixel is masked.

    Returns
    -------
    loss : float
    gradient : complex, the shape of ``field``
        ``2 (a − √I) Ψ_k / a`` with ``a = √(m + δ²)``: every mode its own field times the same factor
        (zero at masked pixels).
    """
    xp = get_array_module(field)
    delta = AMPLITUDE_DELTA_PER_PIXEL / field.shape[-1]
    amplitude = xp.sqrt(model_intensity(field) + delta * delta)
    residual = amplitude - measured_amplitude
    residual[measured_amplitude < 0] = 0
    loss = float(xp.sum(residual * residual))
    return loss, field * (2.0 * residual / amplitude)


def poisson_loss(field: Any, measured_intensity: Any, epsilon: float = 1e-6) -> tuple[float, Any]:
    """Poisson negative log-likelihood ``L = Σ m − I log(m + ε)``, ``m`` the :func:`model_intensity`.

    Parameters
    ----------
    field : (B, D, D) or (K, B, D, D) complex
        As for :func:`amplitude_loss`.
    measured_intensity : (B, D, D) real
        ``I/α``; negative where a pixel is masked.
    epsilon : float
        Keeps the logarithm finite where the model is dark.

    Returns
    -------
    loss : float
    gradient : complex, the shape of ``field``
        ``2 (1 − I/(m+ε)) Ψ_k`` (zero at masked pixels).
    """
    xp = get_array_module(field)
    model = model_intensity(field)
    masked = measured_intensity < 0
    terms = model - measured_intensity * xp.log(model + epsilon)
    terms[masked] = 0
    factor = 2.0 * (1.0 - measured_intensity / (model + epsilon))
    factor[masked] = 0
    return float(xp.sum(terms)), field * factor


def loss_function(name: str) -> Callable[[Any, Any], tuple[float, Any]]:
    """Return the loss by name (``"amplitude"`` or ``"poisson"``); each takes one probe's or K modes' fields."""
    if name == "amplitude":
        return amplitude_loss
    if name == "poisson":
        return poisson_loss
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def measured_target(name: str, intensity: Any, mask: Any = None) -> Any:
    """Turn intensities into what a loss compares against, in place.

    ``√I`` for amplitude, ``I`` for Poisson (negative counts clipped to 0);
    ``intensity`` (real, (..., D, D)) is overwritten and returned, so frames never exist twice.
    ``mask`` ((D, D) bool, True = masked, optional) sets those pixels to :data:`MASKED_TARGET`, which
    every loss leaves out.
    """
    xp = get_array_module(intensity)
    xp.maximum(intensity, 0, out=intensity)
    if name == "amplitude":
        xp.sqrt(intensity, out=intensity)
    if mask is not None:
        intensity[..., xp.asarray(mask, dtype=bool)] = MASKED_TARGET
    return intensity


def fit_intensity_scale(total_measured: float, total_model: float) -> float:
    """Maximum-likelihood detector scale ``α = ΣI / Σ|Ψ|²``.

    This is the Poisson maximum-likelihood estimate of ``α`` in ``I ~ α|Ψ|²``;
    both sums run over every frame of the series (all ranks).
    """
    if not (total_measured > 0 and total_model > 0):
        raise ValueError(
            f"cannot fit intensity scale: total measured {total_measured!r}, model {total_model!r}"
        )
    return total_measured / total_model
