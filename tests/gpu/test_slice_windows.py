"""The engine's low-memory path: windows read one slice at a time, gradients scattered into the tile per slice.

It must compute exactly what the array path computes (the same kernels on the same numbers), so these
tests compare bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.multislice import forward, loss_and_gradient
from ptylive.gpu.patches import SliceWindows, TileSink, accumulate_patches, extract_patches
from ptylive.gpu.update import constrain
from tests.gpu.test_gradient import make_problem


def _volume(seed: int, n_slices: int, shape: tuple[int, int], dtype: type = np.complex128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = np.exp(1j * rng.standard_normal((n_slices, *shape))) * rng.uniform(0.5, 1.3, (n_slices, *shape))
    return volume.astype(dtype)


STARTS = np.array([[0, 0], [3, 5], [7, 2], [3, 5]], dtype=np.int64)  # one window twice: scatter-add, not assign


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_slice_windows_are_the_extracted_windows(dtype: type) -> None:
    volume = _volume(0, 3, (20, 22), dtype)
    expected = extract_patches(volume, STARTS, 12)
    windows = SliceWindows(volume, STARTS, 12)
    assert windows.shape == expected.shape and len(windows) == 3
    for s in range(3):
        np.testing.assert_array_equal(windows[s], expected[s])


def test_trial_windows_are_the_constrained_trial_object() -> None:
    volume, direction = _volume(1, 3, (20, 22)), _volume(2, 3, (20, 22))
    step = 0.37
    trial = volume + step * direction
    constrain(trial, 1.0)
    expected = extract_patches(trial, STARTS, 12)
    windows = SliceWindows(volume, STARTS, 12, direction, step, 1.0)
    for s in range(3):
        np.testing.assert_allclose(windows[s], expected[s], rtol=1e-14, atol=1e-15)
    assert np.abs(windows[2]).max() <= 1.0 + 1e-15
    unconstrained = SliceWindows(volume, STARTS, 12, direction, step)
    assert np.abs(unconstrained[0]).max() > 1.0  # no amplitude bound asked: none applied
    np.testing.assert_allclose(unconstrained[0], extract_patches(volume + step * direction, STARTS, 12)[0],
                               rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("n_modes", [None, 2])
@pytest.mark.parametrize("loss", ["amplitude", "poisson"])
def test_sink_path_equals_the_array_path(loss: str, n_modes: int | None) -> None:
    window, detector = 12, 8
    problem = make_problem(3, 3, window, detector, loss, n_modes)
    rng = np.random.default_rng(4)
    volume = np.exp(0.3j * rng.standard_normal((3, 21, 23))) * (1.0 - 0.1 * rng.random((3, 21, 23)))
    starts = STARTS[:3]
    problem["patches"] = extract_patches(volume, starts, window)
    arrays = loss_and_gradient(**problem, want_probe_gradient=True, want_position_gradient=True)
    gradient, illumination = np.zeros_like(volume), np.zeros(volume.shape)
    accumulate_patches(gradient, starts, arrays.object_gradient)
    accumulate_patches(illumination, starts, arrays.illumination)

    sunk_gradient, sunk_illumination = np.zeros_like(volume), np.zeros(volume.shape)
    sunk = loss_and_gradient(**dict(problem, patches=SliceWindows(volume, starts, window)),
                             want_probe_gradient=True, want_position_gradient=True,
                             sink=TileSink(sunk_gradient, sunk_illumination, starts))
    assert sunk.object_gradient is None and sunk.illumination is None
    assert sunk.loss == arrays.loss
    np.testing.assert_array_equal(sunk_gradient, gradient)
    np.testing.assert_array_equal(sunk_illumination, illumination)
    for name in ("probe_gradient", "position_gradient", "position_curvature"):
        np.testing.assert_array_equal(getattr(sunk, name), getattr(arrays, name))
    np.testing.assert_array_equal(
        forward(problem["probe"], problem["shifts_px"], SliceWindows(volume, starts, window), problem["propagator"],
                detector),
        forward(problem["probe"], problem["shifts_px"], problem["patches"], problem["propagator"], detector))
