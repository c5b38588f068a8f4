"""Masked detector pixels (negative targets) leave every loss: no loss term, no gradient."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.fused import detector_amplitude_in_place
from ptylive.gpu.loss import AMPLITUDE_DELTA_PER_PIXEL, MASKED_TARGET, loss_function, measured_target
from ptylive.gpu.propagation import farfield, farfield_adjoint

RNG = np.random.default_rng(5)


def field_and_intensity(batch: int = 3, detector: int = 8) -> tuple[np.ndarray, np.ndarray]:
    field = RNG.standard_normal((batch, detector, detector)) + 1j * RNG.standard_normal((batch, detector, detector))
    return field, RNG.uniform(0.0, 2.0, (batch, detector, detector))


def mask_of(detector: int = 8) -> np.ndarray:
    mask = np.zeros((detector, detector), bool)
    mask[2, 5] = mask[0, 0] = mask[7, 3] = True
    return mask


@pytest.mark.parametrize("name", ["amplitude", "poisson"])
def test_masked_pixels_add_nothing_and_get_no_gradient(name: str) -> None:
    field, intensity = field_and_intensity()
    mask = mask_of()
    target = measured_target(name, intensity.copy(), mask)
    assert (target[:, mask] == MASKED_TARGET).all() and (target[:, ~mask] >= 0).all()
    loss, gradient = loss_function(name)(field, target)
    plain_loss, plain_gradient = loss_function(name)(field, measured_target(name, intensity.copy()))
    assert (gradient[:, mask] == 0).all()
    np.testing.assert_array_equal(gradient[:, ~mask], plain_gradient[:, ~mask])
    # The plain loss minus the masked pixels' own terms (δ and ε as in gpu.loss).
    model = np.abs(field[:, mask]) ** 2
    if name == "amplitude":
        delta = AMPLITUDE_DELTA_PER_PIXEL / field.shape[-1]
        masked_terms = np.sum((np.sqrt(model + delta**2) - np.sqrt(intensity[:, mask])) ** 2)
    else:
        masked_terms = np.sum(model - intensity[:, mask] * np.log(model + 1e-6))
    assert loss == pytest.approx(plain_loss - masked_terms, rel=1e-12)
    # A positive rescale (the worker's running detector scale) keeps them masked.
    assert (target[:, mask] * 0.3 < 0).all()


def test_fused_detector_kernel_leaves_masked_pixels_out() -> None:
    window, detector = 16, 8
    exit_wave = RNG.standard_normal((2, window, window)) + 1j * RNG.standard_normal((2, window, window))
    target = measured_target("amplitude", RNG.uniform(0, 0.2, (2, detector, detector)), mask_of(detector))
    expected_loss, field_gradient = loss_function("amplitude")(farfield(exit_wave.copy(), detector), target)
    expected = farfield_adjoint(field_gradient, window, out=np.empty_like(exit_wave))
    spectrum = fft2(exit_wave.copy(), normalise=False)
    value = detector_amplitude_in_place(spectrum, target)
    assert abs(value - expected_loss) <= 1e-12 * expected_loss
    np.testing.assert_allclose(ifft2(spectrum, normalise=False), expected, rtol=1e-10, atol=1e-14)
