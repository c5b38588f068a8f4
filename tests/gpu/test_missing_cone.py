"""gpu.missing_cone: what the filter removes, what it keeps, and the locality that lets it decompose.

The engine's use across ranks is tested in tests/daemon/test_cone_decomposed.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.missing_cone import (
    AMPLITUDE_FLOOR,
    PHASE_CUT_RAD,
    TRUNCATION_SIGMAS,
    cone_correction,
    cone_filter,
    log_transmission,
)

# The static SrTiO3 case's grid: 32 slices of 1.9525 Å, 0.183 Å pixels, 20 mrad.
CONE = cone_filter(32, 1.9525, 0.18304687499999997, 20.0)


def test_the_kernels_follow_the_cone_edge() -> None:
    """σ = √(ln 2 / 2π²) · α / (|k_z| · pixel): the lowest depth frequency has the widest kernel; k_z = 0 none."""
    kz = np.abs(np.fft.fftfreq(32, d=1.9525))
    expected = np.sqrt(np.log(2) / (2 * np.pi**2)) * 0.020 / np.where(kz == 0, np.inf, kz) / 0.18304687499999997
    np.testing.assert_allclose(CONE.sigmas_px, expected, rtol=1e-12)
    assert CONE.sigmas_px[0] == 0.0
    assert CONE.radius_px == int(np.ceil(TRUNCATION_SIGMAS * max(CONE.sigmas_px)))
    stronger = cone_filter(32, 1.9525, 0.18304687499999997, 20.0, strength=2.0)
    np.testing.assert_allclose(stronger.sigmas_px, np.asarray(CONE.sigmas_px) / 2, rtol=1e-12)


def test_a_depth_uniform_object_and_a_single_slice_are_left_alone() -> None:
    rng = np.random.default_rng(1)
    plane = np.exp(1j * rng.normal(0, 0.5, (40, 37)))
    correction = cone_correction(np.broadcast_to(plane, (32, 40, 37)).copy(), CONE)
    assert np.abs(correction).max() < 1e-12
    one = cone_filter(1, 1.9525, 0.183, 20.0)
    assert np.abs(cone_correction(plane[None].copy(), one)).max() == 0.0


def test_laterally_uniform_depth_variation_is_removed_entirely() -> None:
    """k_r = 0 lies in the blind part of the cone for every k_z ≠ 0: only the depth mean of ln O survives (every
    slice becomes the geometric mean of the column)."""
    z = np.arange(32)[:, None, None]
    column = (1 - 0.2 * np.cos(2 * np.pi * 3 * z / 32)) * np.exp(1j * (1.0 + np.sin(2 * np.pi * z / 32)))
    volume = np.broadcast_to(column, (32, 24, 30)).astype(np.complex128)
    filtered = volume + cone_correction(volume, CONE)
    mean = np.exp(np.mean(np.log(np.abs(volume)) + 1j * np.angle(volume), axis=0))
    np.testing.assert_allclose(filtered, np.broadcast_to(mean, volume.shape), atol=1e-12)


def phase_change(volume: np.ndarray) -> np.ndarray:
    """The filter's change of ``ln O`` (what is linear): ``ln(1 + correction / O)``."""
    return np.log1p(cone_correction(volume, CONE) / volume)


def test_the_change_of_log_amplitude_and_phase_is_linear_in_them() -> None:
    rng = np.random.default_rng(2)
    shape = (32, 30, 28)
    a, b = (rng.uniform(0.0, 1.2, shape) + 1j * rng.uniform(-0.4, 0.0, shape) for _ in range(2))  # i·φ + ln|O|
    as_object = lambda log_o: np.exp(1j * log_o.real + log_o.imag)  # noqa: E731 - φ = real part, ln|O| = imag part
    lhs = phase_change(as_object(a + b))
    np.testing.assert_allclose(lhs, phase_change(as_object(a)) + phase_change(as_object(b)), atol=1e-11)


def test_the_projected_phase_and_amplitude_are_kept() -> None:
    """The depth mean of ln O is the measured part: Σ_s φ_s and Π_s |O_s| do not change, even for strong phases
    (a filter of O − 1 averaged them as complex numbers and lost them)."""
    rng = np.random.default_rng(4)
    phase = rng.uniform(0.0, 2.5, (32, 26, 22))
    volume = np.exp(1j * phase - rng.uniform(0.0, 0.3, phase.shape))
    filtered = volume + cone_correction(volume, CONE)
    assert np.abs(filtered - volume).max() > 0.1  # it does change the slices
    after = log_transmission(filtered)
    np.testing.assert_allclose(after.imag.sum(axis=0), phase.sum(axis=0), atol=1e-10)
    np.testing.assert_allclose(np.log(np.abs(filtered)).sum(axis=0), np.log(np.abs(volume)).sum(axis=0), atol=1e-10)


def test_log_transmission_cuts_the_phase_below_zero_and_floors_the_amplitude() -> None:
    phases = np.array([PHASE_CUT_RAD + 1e-3, 0.0, 2.0, 3.0, PHASE_CUT_RAD + 2 * np.pi - 1e-3])
    np.testing.assert_allclose(log_transmission(np.exp(1j * phases)).imag, phases, atol=1e-12)
    assert log_transmission(np.zeros(1, complex)).real[0] == np.log(AMPLITUDE_FLOOR)
    assert log_transmission(np.ones(3, np.complex64)).dtype == np.complex64


def test_the_correction_at_a_voxel_needs_the_object_only_within_the_radius() -> None:
    """What decomposes: change the object beyond R of a region (or cut the array there) and the correction inside
    is the same, to rounding."""
    rng = np.random.default_rng(3)
    radius = CONE.radius_px
    volume = np.exp(1j * rng.uniform(0, 2, (32, 60, 64)) - rng.uniform(0, 0.3, (32, 60, 64)))
    inner = (slice(None), slice(radius + 5, 60 - radius - 5), slice(radius + 5, 64 - radius - 5))
    reference = cone_correction(volume, CONE)[inner]
    changed = volume.copy()
    changed[:, :5, :] = 0.3  # beyond R of every inner voxel
    changed[:, :, -5:] = -0.5j
    np.testing.assert_allclose(cone_correction(changed, CONE)[inner], reference, atol=1e-12)
    cut = volume[:, 5:, :-5]  # a smaller tile holding the same neighbourhood
    np.testing.assert_allclose(cone_correction(cut, CONE)[:, radius:60 - radius - 10, radius + 5:64 - radius - 5],
                               reference, atol=1e-12)


def test_wrong_slice_count_and_bad_optics_are_refused() -> None:
    with pytest.raises(ValueError, match="slices"):
        cone_correction(np.ones((4, 8, 8), complex), CONE)
    with pytest.raises(ValueError, match="positive"):
        cone_filter(8, 1.0, 0.2, 0.0)
