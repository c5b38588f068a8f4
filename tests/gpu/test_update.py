"""The preconditioned step and the amplitude constraint."""

from __future__ import annotations

import numpy as np

from ptylive.gpu.update import constrain, object_update


def test_constrain_clips_amplitude_and_keeps_phase() -> None:
    volume = np.array([[[2.0 * np.exp(0.7j), 0.5 * np.exp(-1.2j), 1.0 + 0j]]])
    original = volume.copy()
    constrain(volume, 1.0)
    np.testing.assert_allclose(np.abs(volume), [[[1.0, 0.5, 1.0]]], rtol=1e-15)
    np.testing.assert_allclose(np.angle(volume), np.angle(original), rtol=1e-15)
    constrain(volume, None)  # no constraint: untouched
    np.testing.assert_allclose(np.abs(volume), [[[1.0, 0.5, 1.0]]], rtol=1e-15)


def test_single_position_unit_step_reaches_projected_object() -> None:
    # One slice, one position: g = 2 conj(ψ)(φ − φ'), p = |ψ|²; step 1 with no floor gives O' = φ'/ψ.
    psi = np.array([0.3 + 0.4j, 1.0 - 0.2j])
    obj = np.array([1.0 + 0j, 0.8 + 0.1j])
    projected = np.array([0.1 + 0.2j, -0.3 + 0.5j])
    gradient = 2 * np.conj(psi) * (psi * obj - projected)
    illumination = np.abs(psi) ** 2
    update = object_update(gradient, illumination, 0.0, 1.0)
    assert update is gradient  # in place: no tile-sized temporaries
    np.testing.assert_allclose((obj + update) * psi, projected, rtol=1e-14)
