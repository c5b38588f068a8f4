"""gpu.missing_cone: what the filter removes, what it keeps, and the locality that lets it decompose.

The module is not yet called by the engine (see its docstring and the issue 11 note); these tests hold the
array function to its stated properties.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.missing_cone import TRUNCATION_SIGMAS, cone_correction, cone_filter

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
    """k_r = 0 lies in the blind part of the cone for every k_z ≠ 0: only the depth mean survives."""
    z = np.arange(32)[:, None, None]
    volume = np.broadcast_to(1 + 0.3 * np.cos(2 * np.pi * 3 * z / 32) + 0.1j * np.sin(2 * np.pi * z / 32),
                             (32, 24, 30)).astype(np.complex128)
    filtered = volume + cone_correction(volume, CONE)
    np.testing.assert_allclose(filtered, np.broadcast_to(volume.mean(axis=0), volume.shape), atol=1e-12)


def test_the_correction_is_linear_in_o_minus_one() -> None:
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(32, 30, 28)) + 1j * rng.normal(size=(32, 30, 28)) for _ in range(2))
    lhs = cone_correction(1 + 2.0 * a - 0.5 * b, CONE)
    rhs = 2.0 * cone_correction(1 + a, CONE) - 0.5 * cone_correction(1 + b, CONE)
    np.testing.assert_allclose(lhs, rhs, atol=1e-11)


def test_the_correction_at_a_voxel_needs_the_object_only_within_the_radius() -> None:
    """What decomposes: change the object beyond R of a region (or cut the array there) and the correction inside
    is the same, to rounding."""
    rng = np.random.default_rng(3)
    radius = CONE.radius_px
    volume = 1 + 0.2 * (rng.normal(size=(32, 60, 64)) + 1j * rng.normal(size=(32, 60, 64)))
    inner = (slice(None), slice(radius + 5, 60 - radius - 5), slice(radius + 5, 64 - radius - 5))
    reference = cone_correction(volume, CONE)[inner]
    changed = volume.copy()
    changed[:, :5, :] = 3.0  # beyond R of every inner voxel
    changed[:, :, -5:] = -2.0j
    np.testing.assert_allclose(cone_correction(changed, CONE)[inner], reference, atol=1e-12)
    cut = volume[:, 5:, :-5]  # a smaller tile holding the same neighbourhood
    np.testing.assert_allclose(cone_correction(cut, CONE)[:, radius:60 - radius - 10, radius + 5:64 - radius - 5],
                               reference, atol=1e-12)


def test_wrong_slice_count_and_bad_optics_are_refused() -> None:
    with pytest.raises(ValueError, match="slices"):
        cone_correction(np.ones((4, 8, 8), complex), CONE)
    with pytest.raises(ValueError, match="positive"):
        cone_filter(8, 1.0, 0.2, 0.0)
