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
