"""The FFTW plan cache stays bounded, and a plan dropped from it is planned again when needed."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu import fft
from ptylive.gpu.backend import empty_aligned


def test_the_plan_cache_keeps_at_most_max_plans_shapes_least_recently_used_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fft, "MAX_PLANS", 3)
    monkeypatch.setattr(fft, "_PLANS", fft.OrderedDict())
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 1, 4):  # batch 1 used again before batch 4 arrives: 2 is the least recently used
        x = empty_aligned(np, (batch, 8, 8), np.complex64)
        x[...] = rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape)
        expected = np.fft.fft2(x, norm="ortho")
        np.testing.assert_allclose(fft.fft2(x), expected, rtol=1e-5, atol=1e-6)
    assert [key[0][0] for key in fft._PLANS] == [3, 1, 4]
    x = empty_aligned(np, (2, 8, 8), np.complex64)  # a dropped shape is planned again and still right
    x[...] = rng.standard_normal(x.shape)
    np.testing.assert_allclose(fft.ifft2(fft.fft2(x.copy())), x, rtol=1e-5, atol=1e-6)
    assert len(fft._PLANS) == 3


def test_the_planner_comes_from_the_environment_and_an_unknown_one_is_refused() -> None:
    assert fft.planner_flags({}) == ("FFTW_MEASURE",)
    assert fft.planner_flags({fft.PLANNER_ENV: "FFTW_ESTIMATE"}) == ("FFTW_ESTIMATE",)
    with pytest.raises(ValueError, match="FFTW_FAST"):
        fft.planner_flags({fft.PLANNER_ENV: "FFTW_FAST"})


@pytest.mark.parametrize("dtype, rtol", [(np.complex64, 2e-6), (np.complex128, 1e-13)])
@pytest.mark.parametrize("axes", [(0,), (0, 1)])
def test_fft_axes_is_numpys_fft_in_place_on_strided_views(dtype: type, rtol: float, axes: tuple[int, ...]) -> None:
    """The missing-cone filter's transforms: numpy's unscaled forward and 1/n inverse, written into the given view
    (a column block of a larger volume); the inverse undoes the forward. Tolerance: FFT rounding, ~eps·log2 n."""
    rng = np.random.default_rng(3)
    volume = (rng.standard_normal((12, 20, 30)) + 1j * rng.standard_normal((12, 20, 30))).astype(dtype)
    original = volume.copy()
    block = volume[:, :, 8:24]
    expected = np.fft.fftn(original[:, :, 8:24], axes=axes)
    assert fft.fft_axes(block, axes) is block
    scale = np.abs(expected).max()
    np.testing.assert_allclose(block, expected, rtol=0, atol=rtol * scale)
    assert np.array_equal(volume[:, :, :8], original[:, :, :8]) and np.array_equal(volume[:, :, 24:],
                                                                                   original[:, :, 24:])
    fft.fft_axes(block, axes, inverse=True)
    np.testing.assert_allclose(volume, original, rtol=0, atol=rtol * np.abs(original).max())
