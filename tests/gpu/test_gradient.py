"""Finite-difference checks (float64) of the multislice loss gradient."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.loss import fit_intensity_scale, measured_target
from ptylive.gpu.multislice import forward, loss_and_gradient
from ptylive.gpu.propagation import fresnel_propagator

# Central differences have truncation error O(ε²·L''') and rounding error O(1e-16·L/ε).
# ε = 1e-6 on an O(1) problem keeps both near 1e-10, far below the required 1e-6, even
# where the Poisson logarithm is strongly curved (dark detector pixels; ε = 1e-5 was not).
EPS = 1e-6
RTOL = 1e-6


def make_problem(seed: int, n_slices: int, window: int, detector: int, loss: str, n_modes: int | None = None) -> dict:
    """A random O(1) batch of 3 positions; ``n_modes``: a (K, N, N) probe of K modes instead of one (N, N)."""
    rng = np.random.default_rng(seed)
    batch = 3
    shape = (window, window) if n_modes is None else (n_modes, window, window)
    probe = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    probe /= np.linalg.norm(probe)
    patches = np.exp(1j * 0.3 * rng.standard_normal((n_slices, batch, window, window)))
    patches *= 1.0 - 0.1 * rng.random(patches.shape)
    shifts = rng.uniform(0, 1, size=(batch, 2))
    propagator = fresnel_propagator(np, window, 0.25, 0.025, 8.0, dtype=np.complex128)
    intensity = rng.uniform(0, 2.0 / detector**2, size=(batch, detector, detector))
    return dict(probe=probe, shifts_px=shifts, patches=patches, propagator=propagator,
                measured=measured_target(loss, intensity), loss=loss)


def loss_at(problem: dict, patches: np.ndarray | None = None, probe: np.ndarray | None = None) -> float:
    args = dict(problem, want_probe_gradient=False)
    if patches is not None:
        args["patches"] = patches
    if probe is not None:
        args["probe"] = probe
    return loss_and_gradient(**args).loss


CASES = [(3, 16, 16, "amplitude"), (3, 16, 8, "amplitude"), (2, 16, 16, "poisson"), (1, 12, 6, "poisson")]


@pytest.mark.parametrize("n_slices, window, detector, loss", CASES)
def test_object_gradient_matches_central_differences(n_slices: int, window: int, detector: int, loss: str) -> None:
    problem = make_problem(1, n_slices, window, detector, loss)
    result = loss_and_gradient(**problem, want_probe_gradient=True)
    rng = np.random.default_rng(2)
    for s in range(n_slices):  # each slice separately, so a wrong slice index cannot hide
        direction = np.zeros_like(problem["patches"])
        direction[s] = rng.standard_normal(direction[s].shape) + 1j * rng.standard_normal(direction[s].shape)
        plus = loss_at(problem, patches=problem["patches"] + EPS * direction)
        minus = loss_at(problem, patches=problem["patches"] - EPS * direction)
        numeric = (plus - minus) / (2 * EPS)
        analytic = float(np.real(np.vdot(result.object_gradient, direction)))
        assert abs(numeric - analytic) <= RTOL * abs(analytic), (s, numeric, analytic)


@pytest.mark.parametrize("n_slices, window, detector, loss", CASES)
def test_probe_gradient_matches_central_differences(n_slices: int, window: int, detector: int, loss: str) -> None:
    problem = make_problem(3, n_slices, window, detector, loss)
    result = loss_and_gradient(**problem, want_probe_gradient=True)
    rng = np.random.default_rng(4)
    direction = rng.standard_normal((window, window)) + 1j * rng.standard_normal((window, window))
    numeric = (loss_at(problem, probe=problem["probe"] + EPS * direction)
               - loss_at(problem, probe=problem["probe"] - EPS * direction)) / (2 * EPS)
    analytic = float(np.real(np.vdot(result.probe_gradient, direction)))
    assert abs(numeric - analytic) <= RTOL * abs(analytic)


def test_illumination_is_intensity_of_incident_wave_per_slice() -> None:
    problem = make_problem(5, 2, 16, 16, "amplitude")
    result = loss_and_gradient(**problem)
    # Slice 0 sees the shifted probe: Σ|ψ_0|² = Σ|P|² = 1 per position.
    np.testing.assert_allclose(result.illumination[0].sum(axis=(-2, -1)), 1.0, rtol=1e-12)
    # Slice 1 sees ψ_0·O_0 propagated (unitary): its power is Σ|ψ_0 O_0|².
    expected = np.sum(np.abs(result_wave0(problem) * problem["patches"][0]) ** 2, axis=(-2, -1))
    np.testing.assert_allclose(result.illumination[1].sum(axis=(-2, -1)), expected, rtol=1e-12)


def result_wave0(problem: dict) -> np.ndarray:
    from ptylive.gpu.probe import fourier_shift

    return fourier_shift(problem["probe"], problem["shifts_px"])


def test_loss_is_zero_on_noise_free_data_and_scale_fit_recovers_dose() -> None:
    problem = make_problem(6, 3, 16, 8, "amplitude")
    field = forward(problem["probe"], problem["shifts_px"], problem["patches"], problem["propagator"], 8)
    model = np.abs(field) ** 2
    dose = 1234.5
    alpha = fit_intensity_scale(float((dose * model).sum()), float(model.sum()))
    assert alpha == pytest.approx(dose, rel=1e-12)
    problem["measured"] = measured_target("amplitude", dose * model / alpha)
    result = loss_and_gradient(**problem)
    # The smoothed amplitude √(|Ψ|²+δ²) exceeds |Ψ| by at most δ = 1e-3/D per pixel.
    delta = 1e-3 / 8
    assert result.loss <= field.size * delta**2
    exact = problem["measured"] - np.abs(field)
    assert np.abs(exact).max() < 1e-12
