"""Virtual detector values against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.streaming.virtual_images import (
    VirtualDetector,
    angles_mrad,
    default_detector,
    frame_values,
    integrated_dpc,
)

D = 64
PIXEL_MRAD = 0.5
ALPHA_MRAD = 5.0


def disk(centre_y_px: float, centre_x_px: float, radius_px: float) -> np.ndarray:
    y, x = np.mgrid[0:D, 0:D]
    return ((y - centre_y_px) ** 2 + (x - centre_x_px) ** 2 <= radius_px ** 2).astype(np.float64)


def test_shifted_disk_gives_its_shift_in_mrad() -> None:
    detector = default_detector(ALPHA_MRAD, PIXEL_MRAD, D)
    frames = np.stack([disk(D // 2, D // 2, 6), disk(D // 2 + 3, D // 2 - 5, 6)])
    values = frame_values(frames, detector)
    assert values["com_x"][0] == pytest.approx(0.0, abs=1e-12)
    assert values["com_y"][0] == pytest.approx(0.0, abs=1e-12)
    assert values["com_x"][1] == pytest.approx(-5 * PIXEL_MRAD, rel=1e-12)
    assert values["com_y"][1] == pytest.approx(3 * PIXEL_MRAD, rel=1e-12)


def test_bf_and_annulus_sums_count_their_pixels() -> None:
    detector = VirtualDetector(ALPHA_MRAD, PIXEL_MRAD, ((6.0, 10.0), (10.0, 15.0)))
    frame = np.ones((1, D, D))
    frame[0, D // 2, D // 2] = 7.0
    ky, kx = angles_mrad(D, PIXEL_MRAD)
    radius = np.hypot(ky, kx)
    values = frame_values(frame, detector)
    assert values["bf"][0] == np.count_nonzero(radius <= ALPHA_MRAD) + 6
    assert values["adf0"][0] == np.count_nonzero((radius >= 6) & (radius < 10))
    assert values["adf1"][0] == np.count_nonzero((radius >= 10) & (radius < 15))
    # the ring 6–10 mrad is 12–20 px: about π(20² − 12²) pixels
    assert values["adf0"][0] == pytest.approx(np.pi * (20 ** 2 - 12 ** 2), rel=0.05)


def test_empty_frame_has_nan_com_and_bad_rings_are_refused() -> None:
    values = frame_values(np.zeros((1, D, D)), default_detector(ALPHA_MRAD, PIXEL_MRAD, D))
    assert np.isnan(values["com_x"][0]) and values["bf"][0] == 0
    with pytest.raises(ValueError, match="inner < outer"):
        VirtualDetector(ALPHA_MRAD, PIXEL_MRAD, ((10.0, 5.0),))
    with pytest.raises(ValueError, match="N, D, D"):
        frame_values(np.zeros((D, D)), default_detector(ALPHA_MRAD, PIXEL_MRAD, D))


def test_idpc_of_a_gradient_recovers_the_field_up_to_a_constant() -> None:
    rows, cols = 48, 40
    y, x = np.mgrid[0:rows, 0:cols]
    field = (np.sin(2 * np.pi * 3 * x / cols) * np.cos(2 * np.pi * 2 * y / rows)
             + 0.5 * np.cos(2 * np.pi * 5 * y / rows))
    fx, fy = np.fft.fftfreq(cols)[None, :], np.fft.fftfreq(rows)[:, None]
    spectrum = np.fft.fft2(field)
    grad_x = np.fft.ifft2(2j * np.pi * fx * spectrum).real
    grad_y = np.fft.ifft2(2j * np.pi * fy * spectrum).real
    recovered = integrated_dpc(grad_x, grad_y)
    np.testing.assert_allclose(recovered - recovered.mean(), field - field.mean(), atol=1e-10)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(integrated_dpc(grad_y, grad_x), field - field.mean(), atol=1e-3)
