"""The fused numba steps agree with the plain array expressions they replace."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.fused import backward_slice, detector_amplitude_in_place, transmit
from ptylive.gpu.loss import amplitude_loss
from ptylive.gpu.propagation import farfield, farfield_adjoint

RNG = np.random.default_rng(11)


def complex_array(*shape: int, dtype: type = np.complex64) -> np.ndarray:
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("window, detector", [(16, 16), (16, 8), (15, 7)])
def test_detector_amplitude_matches_crop_loss_and_adjoint(window: int, detector: int) -> None:
    exit_wave = complex_array(3, window, window, dtype=np.complex128)
    target = RNG.uniform(0, 0.2, size=(3, detector, detector))
    expected_loss, field_gradient = amplitude_loss(farfield(exit_wave.copy(), detector), target)
    expected = farfield_adjoint(field_gradient, window, out=np.empty_like(exit_wave))
    spectrum = fft2(exit_wave.copy(), normalise=False)
    value = detector_amplitude_in_place(spectrum, target)
    assert abs(value - expected_loss) <= 1e-12 * expected_loss
    np.testing.assert_allclose(ifft2(spectrum, normalise=False), expected, rtol=1e-10, atol=1e-14)


def test_transmit_and_backward_slice_match_array_expressions() -> None:
    wave, patch, gradient = (complex_array(2, 6, 6) for _ in range(3))
    stored = np.empty_like(wave)
    w0 = wave.copy()
    transmit(wave, patch, stored)
    np.testing.assert_array_equal(stored, w0)
    np.testing.assert_allclose(wave, w0 * patch, rtol=1e-6)
    illumination = np.empty(stored.shape, np.float32)
    g0 = gradient.copy()
    backward_slice(stored, gradient, patch, illumination)
    np.testing.assert_allclose(illumination, np.abs(w0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(stored, np.conj(w0) * g0, rtol=1e-6)
    np.testing.assert_allclose(gradient, g0 * np.conj(patch), rtol=1e-6)
