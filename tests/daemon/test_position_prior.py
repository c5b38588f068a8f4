"""The shot-noise prior of position correction (:func:`ptylive.daemon.engine.positions.refine_positions`).

Two checks: the noise model itself (the variance of a position gradient under Poisson counts, measured
over many draws, against ``counting_noise``), and what the prior does to positions whose gradients carry a
fixed noise (the same data every iteration): exact positions stay put, real errors are still found.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import Box
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.positions import (
    SPREAD_GROWTH,
    SPREAD_MIN_PX2,
    PositionOptions,
    PositionState,
    counting_noise,
    refine_positions,
    residual_noise,
)
from ptylive.gpu.loss import measured_target
from ptylive.gpu.multislice import forward, loss_and_gradient
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.probe import ProbeOptics, make_probe
from ptylive.gpu.propagation import fresnel_propagator


@pytest.mark.parametrize("loss", ["amplitude", "poisson"])
def test_position_gradient_variance_under_poisson_counts_is_the_counting_noise(loss: str) -> None:
    """``Var(g) = k · h_GN`` with ``h_GN = c Σ|∂a/∂d|²`` (the exact Gauss-Newton curvature, central differences)."""
    rng = np.random.default_rng(11)
    n, pixel = 32, 0.3
    probe = make_probe(ProbeOptics(200e3, 25.0, 30.0), n, pixel, dtype=np.complex128)
    phase = 0.4 * rng.random((1, 1, n, n))
    patches = np.exp(1j * phase)  # one slice, one position, a random weak phase object
    propagator = fresnel_propagator(np, n, pixel, wavelength_A(200e3), 2.0, dtype=np.complex128)
    shift = np.array([[0.3, 0.6]])
    model = np.abs(forward(probe, shift, patches, propagator, n)) ** 2  # Σ = 1: counts = α · model
    alpha = 2e5  # counts per frame: most lit pixels hold ≫ 1 count, where Var(√I) ≈ 1/4 holds
    epsilon = 1e-4
    amplitude_slope = [
        (np.sqrt(np.abs(forward(probe, shift + e, patches, propagator, n)) ** 2)
         - np.sqrt(np.abs(forward(probe, shift - e, patches, propagator, n)) ** 2)) / (2 * epsilon)
        for e in (np.array([[epsilon, 0.0]]), np.array([[0.0, epsilon]]))
    ]
    c = {"amplitude": 2.0, "poisson": 4.0}[loss]
    h_gn = np.array([c * float(np.sum(s**2)) for s in amplitude_slope])
    gradients = []
    for _ in range(400):
        counts = rng.poisson(alpha * model).astype(np.float64)
        target = measured_target(loss, counts / alpha)
        found = loss_and_gradient(probe, shift, patches, propagator, target, loss, want_position_gradient=True)
        gradients.append(np.asarray(found.position_gradient)[0])
    variance = np.var(np.array(gradients), axis=0)
    predicted = counting_noise(loss, alpha) * h_gn
    # 400 draws: the sample variance is within ±3·√(2/400) ≈ 21 % of the truth (3 σ); the 1/(4α) of √I adds a
    # few per cent where counts are low, so 30 % is the bound.
    np.testing.assert_allclose(variance, predicted, rtol=0.3)


def fixed_noise_run(true_px: np.ndarray, nominal_px: np.ndarray, noise_px: np.ndarray, h: float, k: float | None,
                    calls: int = 25) -> np.ndarray:
    """Positions after ``calls`` corrections whose loss is ``½ h |p − (true + noise)|²`` per axis: the data's
    maximum-likelihood position is off the truth by a fixed ``noise`` (the same Poisson draw every iteration)."""
    state = PositionState.start(nominal_px)
    box = Box(-1000, 1000, -1000, 1000)
    curvature = np.full_like(nominal_px, h)
    for _ in range(calls):
        gradient = h * (state.positions_px - true_px - noise_px)
        update = refine_positions(state, nominal_px, gradient, curvature, box, 16, NullExchanger(),
                                  PositionOptions(affine="none"), noise_px2_loss=k)
        state = update.state
    return state.positions_px


def rms(a: np.ndarray) -> float:
    a = a - a.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(a**2, axis=1))))


def test_the_prior_keeps_exact_positions_where_the_noise_would_move_them() -> None:
    rng = np.random.default_rng(5)
    nominal = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), axis=-1).reshape(-1, 2) * 2
    h, sigma = 4.0, 0.3  # px: the shot noise of each position
    k = sigma**2 * h  # σ² = k / h
    noise = rng.normal(scale=sigma, size=nominal.shape)
    plain = fixed_noise_run(nominal, nominal, noise, h, None)
    prior = fixed_noise_run(nominal, nominal, noise, h, k)
    assert rms(plain - nominal) > 0.8 * np.sqrt(2) * sigma  # without it the positions walk to the noise
    assert rms(prior - nominal) < 0.25 * rms(plain - nominal)


def spreads_after(targets_px: list[np.ndarray], nominal_px: np.ndarray, h: float, k: float) -> list[float]:
    """``τ²`` after each call whose data put every position's maximum-likelihood place at ``targets_px[call]``."""
    state = PositionState.start(nominal_px)
    curvature = np.full_like(nominal_px, h)
    spreads = []
    for target in targets_px:
        update = refine_positions(state, nominal_px, h * (state.positions_px - target), curvature,
                                  Box(-1000, 1000, -1000, 1000), 16, NullExchanger(),
                                  PositionOptions(affine="none"), noise_px2_loss=k)
        state = update.state
        spreads.append(state.spread_px2)
    return spreads


def test_the_spread_is_the_correlation_of_successive_proposals() -> None:
    """A model error that flips sign between calls (measured on thick SrTiO3 with exact positions: proposals
    2 px rms about the affine while the object converged) is no spread; a persistent one is. One call's
    scatter alone could not tell them apart."""
    rng = np.random.default_rng(7)
    nominal = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), axis=-1).reshape(-1, 2) * 2
    h, sigma, tau = 4.0, 0.05, 1.0
    b = rng.normal(scale=tau, size=nominal.shape)
    b -= b.mean(axis=0)  # the translation is pinned: a mean offset is no spread
    k = sigma**2 * h
    swinging = spreads_after([nominal + b, nominal - b], nominal, h, k)
    persistent = spreads_after([nominal + b, nominal + b], nominal, h, k)
    assert swinging[0] == pytest.approx(persistent[0])  # the first call has only its own scatter
    assert swinging[1] == SPREAD_MIN_PX2
    # (mean |b|² − 2σ²)/2 per axis, up to the sample: 400 positions, ±3·√(2/800) ≈ 15 %
    assert persistent[1] == pytest.approx(tau**2 - sigma**2, rel=0.15)


def test_the_spread_grows_by_at_most_its_factor_per_call() -> None:
    rng = np.random.default_rng(8)
    nominal = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), axis=-1).reshape(-1, 2) * 2
    small, large = (rng.normal(scale=s, size=nominal.shape) for s in (0.1, 1.0))
    spreads = spreads_after([nominal + small] * 2 + [nominal + large] * 5, nominal, 4.0, 1e-4)
    assert spreads[1] == pytest.approx(0.01, rel=0.2)
    assert spreads[2] < spreads[1]  # small and large are independent: no correlation, a fall at once
    # then 1 px² persists, and τ² climbs towards it by the factor per call (far below it, the limit binds)
    np.testing.assert_allclose(spreads[3:], spreads[2] * SPREAD_GROWTH ** np.arange(1, 5), rtol=1e-12)


def test_the_prior_still_finds_real_errors() -> None:
    """Errors of 0.5 px rms per axis under noise of 0.1 px: the prior's shrinkage τ²/(τ² + σ²) ≈ 0.96 costs
    at most a few hundredths of a pixel against the plain step."""
    rng = np.random.default_rng(6)
    nominal = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), axis=-1).reshape(-1, 2) * 2
    true = nominal + rng.normal(scale=0.5, size=nominal.shape)
    h, sigma = 4.0, 0.1
    noise = rng.normal(scale=sigma, size=nominal.shape)
    plain = fixed_noise_run(true, nominal, noise, h, None)
    prior = fixed_noise_run(true, nominal, noise, h, sigma**2 * h)
    before = rms(nominal - true)
    assert rms(plain - true) < before / 3 and rms(prior - true) < before / 3
    # the posterior mean's error: √(σ²τ²/(σ²+τ²)) per axis against σ for the plain estimate
    assert rms(prior - true) <= rms(plain - true) + 0.03


def test_residual_noise_is_the_amplitude_loss_per_pixel_times_its_curvature_factor() -> None:
    assert residual_noise("amplitude", 0.25 / 1e4) == pytest.approx(counting_noise("amplitude", 1e4))
    assert residual_noise("poisson", 1.0) is None
    assert residual_noise("amplitude", float("nan")) is None
    with pytest.raises(ValueError, match="positive"):
        counting_noise("amplitude", 0.0)
