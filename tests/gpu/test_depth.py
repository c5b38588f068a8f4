"""The depth penalty (:mod:`ptylive.gpu.depth`): gradient against the penalty, zero on z-constant objects,
and its preconditioned step independent of the illumination's scale."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.depth import add_depth_gradient, depth_penalty, depth_weight
from ptylive.gpu.update import object_update

STRENGTH = 0.37


def random_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    return (1.0 - 0.2 * rng.random(shape)) * np.exp(1j * rng.standard_normal(shape))


def gradient_of(volume: np.ndarray, weight: np.ndarray, strength: float) -> np.ndarray:
    gradient = np.zeros_like(volume)
    add_depth_gradient(gradient, volume, weight, strength)
    return gradient


@pytest.mark.parametrize("n_slices", [2, 3, 6])
def test_gradient_matches_central_differences_of_the_penalty(n_slices: int) -> None:
    # R is quadratic, so a central difference has no truncation error: only rounding, about
    # 1e-16 · R / ε = 1e-13 relative at ε = 1e-3; 1e-9 leaves four orders of magnitude.
    rng = np.random.default_rng(n_slices)
    volume = random_volume(rng, (n_slices, 5, 7))
    weight = 0.5 + rng.random((5, 7))
    gradient = gradient_of(volume, weight, STRENGTH)
    eps = 1e-3
    for _ in range(4):
        direction = rng.standard_normal(volume.shape) + 1j * rng.standard_normal(volume.shape)
        numeric = (depth_penalty(volume + eps * direction, weight, STRENGTH)
                   - depth_penalty(volume - eps * direction, weight, STRENGTH)) / (2 * eps)
        analytic = float(np.sum(gradient.real * direction.real + gradient.imag * direction.imag))
        assert abs(numeric - analytic) <= 1e-9 * abs(analytic), (numeric, analytic)
    for s in range(n_slices):  # every slice (both ends too) at one voxel, real and imaginary parts
        for unit in (1.0, 1j):
            bump = np.zeros_like(volume)
            bump[s, 2, 3] = unit
            numeric = (depth_penalty(volume + eps * bump, weight, STRENGTH)
                       - depth_penalty(volume - eps * bump, weight, STRENGTH)) / (2 * eps)
            analytic = gradient[s, 2, 3].real if unit == 1.0 else gradient[s, 2, 3].imag
            assert abs(numeric - analytic) <= 1e-9 * np.abs(gradient).max(), (s, unit, numeric, analytic)


def test_penalty_is_half_the_gradient_along_the_object() -> None:
    # Euler's identity for a quadratic form: Re⟨∇R, O⟩ = 2 R (exact up to rounding).
    rng = np.random.default_rng(7)
    volume = random_volume(rng, (4, 6, 6))
    weight = rng.random((6, 6))
    gradient = gradient_of(volume, weight, STRENGTH)
    penalty = depth_penalty(volume, weight, STRENGTH)
    assert penalty > 0
    np.testing.assert_allclose(np.sum(gradient.real * volume.real + gradient.imag * volume.imag), 2 * penalty,
                               rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_a_z_constant_object_has_no_penalty_and_no_gradient(dtype: type) -> None:
    rng = np.random.default_rng(3)
    layer = random_volume(rng, (1, 5, 4))[0]
    volume = np.repeat(layer[None], 5, axis=0).astype(dtype)
    weight = rng.random((5, 4)).astype(volume.real.dtype)
    data_gradient = (rng.standard_normal(volume.shape) + 1j * rng.standard_normal(volume.shape)).astype(dtype)
    gradient = data_gradient.copy()
    add_depth_gradient(gradient, volume, weight, STRENGTH)
    assert depth_penalty(volume, weight, STRENGTH) == 0.0
    np.testing.assert_array_equal(gradient, data_gradient)  # (O_s − O_{s−1}) + O_s − O_{s+1} is exactly 0


def test_off_and_a_single_slice_leave_the_gradient_alone() -> None:
    rng = np.random.default_rng(4)
    volume = random_volume(rng, (3, 4, 4))
    weight = rng.random((4, 4))
    data_gradient = rng.standard_normal(volume.shape) + 0j
    for strength, part in ((0.0, volume), (STRENGTH, volume[:1])):
        gradient = data_gradient[:part.shape[0]].copy()
        add_depth_gradient(gradient, part, weight, strength)
        np.testing.assert_array_equal(gradient, data_gradient[:part.shape[0]])


def test_a_view_of_the_gradient_is_written_in_place() -> None:
    # The async engine regularises the rank's own tile: a view g[:, rows, cols] of the extended tile.
    rng = np.random.default_rng(5)
    volume = random_volume(rng, (3, 8, 9))
    weight = rng.random((8, 9))
    gradient = np.zeros_like(volume)
    rows, cols = slice(2, 6), slice(1, 7)
    add_depth_gradient(gradient[:, rows, cols], volume[:, rows, cols], weight[rows, cols], STRENGTH)
    np.testing.assert_array_equal(gradient[:, rows, cols],
                                  gradient_of(volume[:, rows, cols], weight[rows, cols], STRENGTH))
    outside = np.ones(gradient.shape, bool)
    outside[:, rows, cols] = False
    assert not gradient[outside].any()


@pytest.mark.parametrize("dose_scale", [1e-3, 1.0, 1e4])
def test_preconditioned_step_is_mu_times_the_second_difference_whatever_the_dose(dose_scale: float) -> None:
    # With the illumination constant along z, Δ = −(∇R) / (2 (p + floor)) = −μ (2 O_s − O_{s−1} − O_{s+1})
    # exactly (one-sided at the ends): μ is dimensionless, the same at any dose or scan density.
    rng = np.random.default_rng(6)
    volume = random_volume(rng, (4, 5, 5))
    illumination = np.repeat(dose_scale * (0.2 + rng.random((1, 5, 5))), 4, axis=0)
    floor = 0.05 * dose_scale
    gradient = gradient_of(volume, depth_weight(illumination, floor), STRENGTH)
    step = object_update(gradient, illumination.copy(), floor, 1.0)
    second = 2 * volume
    second[1:] -= volume[:-1]
    second[:-1] -= volume[1:]
    second[0] -= volume[0]
    second[-1] -= volume[-1]
    np.testing.assert_allclose(step, -STRENGTH * second, rtol=1e-13, atol=1e-15)
