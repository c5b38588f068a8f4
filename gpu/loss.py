"""Data-fidelity losses on the detector and their gradients.

Gradients are ``g = ∂L/∂Re Ψ + i ∂L/∂Im Ψ`` (twice the Wirtinger derivative
∂L/∂Ψ*), so that a perturbation ``δΨ`` changes the loss by ``Re Σ conj(g) δΨ``.

Measured intensities are divided once by the fitted scale ``α`` of
:func:`fit_intensity_scale` before they reach these functions.

With K incoherent probe modes the model intensity is ``Σ_k |Ψ_k|²``
(:func:`mode_summed_loss`: the same losses of (K, B, D, D) fields, every mode's
gradient the per-pixel factor times its own field); :func:`field_loss` picks by shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ptylive.gpu.backend import get_array_module

LOSSES = ("amplitude", "poisson")
AMPLITUDE_DELTA_PER_PIXEL = 1e-3  # δ = this / D, see amplitude_loss


def amplitude_loss(field: Any, measured_amplitude: Any) -> tuple[float, Any]:
    """Gaussian amplitude loss ``L = Σ (√(|Ψ|² + δ²) − √I)²``.

    The plain ``|Ψ|`` has a gradient ``−2√I Ψ/|Ψ|`` whose direction at
    ``Ψ = 0`` is set by rounding noise: from a vacuum start every dark-field
    pixel is such a point, which made runs differ at 1e-8 between FFT plans.
    ``δ = 1e-3 / D`` (D detector pixels; ``Σ|Ψ|² ≈ 1`` per frame, so a typical
    amplitude is ``1/D``) makes the loss smooth and changes no physically
    meaningful amplitude.

    Parameters
    ----------
    field : (B, D, D) complex
        Model far field Ψ.
    measured_amplitude : (B, D, D) real
        ``√(I/α)``.

    Returns
    -------
    loss : float
    gradient : (B, D, D) complex
        ``2 (a − √I) Ψ / a`` with ``a = √(|Ψ|² + δ²)``.
    """
    xp = get_array_module(field)
    delta = AMPLITUDE_DELTA_PER_PIXEL / field.shape[-1]
    amplitude = xp.sqrt(field.real * field.real + field.imag * field.imag + delta * delta)
    residual = amplitude - measured_amplitude
    loss = float(xp.sum(residual * residual))
    return loss, field * (2.0 * residual / amplitude)


def poisson_loss(field: Any, measured_intensity: Any, epsilon: float = 1e-6) -> tuple[float, Any]:
    """Poisson negative log-likelihood ``L = Σ |Ψ|² − I log(|Ψ|² + ε)``.

    Parameters
    ----------
    field : (B, D, D) complex
    measured_intensity : (B, D, D) real
        ``I/α``.
    epsilon : float
        Keeps the logarithm finite where the model is dark.

    Returns
    -------
    loss : float
    gradient : (B, D, D) complex
        ``2 (1 − I/(|Ψ|²+ε)) Ψ``.
    """
    xp = get_array_module(field)
    model = field.real * field.real + field.imag * field.imag
    loss = float(xp.sum(model - measured_intensity * xp.log(model + epsilon)))
    return loss, field * (2.0 * (1.0 - measured_intensity / (model + epsilon)))


def amplitude_loss_modes(fields: Any, measured_amplitude: Any) -> tuple[float, Any]:
    """:func:`amplitude_loss` of the incoherent sum of K probe modes.

    ``L = Σ (a − √I)²`` with ``a = √(Σ_k |Ψ_k|² + δ²)``; every mode's gradient is the same
    per-pixel factor times its own field.

    Parameters
    ----------
    fields : (K, B, D, D) complex
        Far field Ψ_k of every mode.
    measured_amplitude : (B, D, D) real
        ``√(I/α)``.

    Returns
    -------
    loss : float
    gradient : (K, B, D, D) complex
        ``2 (a − √I) Ψ_k / a``.
    """
    xp = get_array_module(fields)
    delta = AMPLITUDE_DELTA_PER_PIXEL / fields.shape[-1]
    amplitude = xp.sqrt(_mode_sum(fields) + delta * delta)
    residual = amplitude - measured_amplitude
    loss = float(xp.sum(residual * residual))
    return loss, fields * (2.0 * residual / amplitude)[None]


def poisson_loss_modes(fields: Any, measured_intensity: Any, epsilon: float = 1e-6) -> tuple[float, Any]:
    """:func:`poisson_loss` of the incoherent sum of K probe modes, ``m = Σ_k |Ψ_k|²``.

    Parameters
    ----------
    fields : (K, B, D, D) complex
    measured_intensity : (B, D, D) real
        ``I/α``.

    Returns
    -------
    loss : float
        ``Σ m − I log(m + ε)``.
    gradient : (K, B, D, D) complex
        ``2 (1 − I/(m+ε)) Ψ_k``.
    """
    xp = get_array_module(fields)
    model = _mode_sum(fields)
    loss = float(xp.sum(model - measured_intensity * xp.log(model + epsilon)))
    return loss, fields * (2.0 * (1.0 - measured_intensity / (model + epsilon)))[None]


def _mode_sum(fields: Any) -> Any:
    """``Σ_k |Ψ_k|²`` of (K, B, D, D) fields: (B, D, D) real."""
    return (fields.real * fields.real + fields.imag * fields.imag).sum(axis=0)


def loss_function(name: str) -> Callable[[Any, Any], tuple[float, Any]]:
    """Return the loss by name (``"amplitude"`` or ``"poisson"``)."""
    if name == "amplitude":
        return amplitude_loss
    if name == "poisson":
        return poisson_loss
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def mode_summed_loss(name: str) -> Callable[[Any, Any], tuple[float, Any]]:
    """The loss by name for (K, B, D, D) fields of K probe modes (:func:`amplitude_loss_modes`, ...)."""
    if name == "amplitude":
        return amplitude_loss_modes
    if name == "poisson":
        return poisson_loss_modes
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def field_loss(name: str, fields: Any, measured: Any) -> tuple[float, Any]:
    """The loss of :func:`ptylive.gpu.multislice.forward`'s output, one probe or K modes.

    ``fields`` (B, D, D) (one probe) takes :func:`loss_function`, (K, B, D, D) (K modes, one more
    axis than ``measured`` (B, D, D)) :func:`mode_summed_loss`.
    """
    if fields.ndim == measured.ndim + 1:
        return mode_summed_loss(name)(fields, measured)
    return loss_function(name)(fields, measured)


def measured_target(name: str, intensity: Any) -> Any:
    """Turn intensities into what a loss compares against, in place.

    ``√I`` for amplitude, ``I`` for Poisson (negative counts clipped to 0);
    ``intensity`` (real) is overwritten and returned, so frames never exist twice.
    """
    xp = get_array_module(intensity)
    xp.maximum(intensity, 0, out=intensity)
    if name == "amplitude":
        xp.sqrt(intensity, out=intensity)
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
