"""Recomputed waves (``wave_segment``): the backward pass recomputes ψ_s from every g-th slice instead of storing
them all. The same operations on the same inputs, so every result must equal the stored waves' bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.multislice import held_waves, loss_and_gradient, wave_segment_slices
from ptylive.gpu.patches import SliceWindows, TileSink
from ptylive.gpu.propagation import fresnel_propagator


def tile_problem(n_slices: int, n_modes: int | None, dtype: type = np.complex64) -> dict:
    """A random (S, 40, 44) object tile, 5 positions of a 16-px window, one probe or ``n_modes`` modes."""
    rng = np.random.default_rng(n_slices * 10 + (n_modes or 0))
    window, batch = 16, 5
    volume = np.exp(1j * 0.3 * rng.standard_normal((n_slices, 40, 44))).astype(dtype)
    starts = np.stack([rng.integers(0, 40 - window, batch), rng.integers(0, 44 - window, batch)], axis=1)
    shape = (window, window) if n_modes is None else (n_modes, window, window)
    probe = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    probe /= np.linalg.norm(probe)
    return dict(volume=volume, starts=starts, probe=probe, shifts=rng.uniform(-0.5, 0.5, (batch, 2)),
                propagator=fresnel_propagator(np, window, 0.25, 0.025, 8.0, dtype=dtype),
                measured=rng.uniform(0, 2.0 / window, (batch, window, window)).astype(np.float32))


def gradients(problem: dict, loss: str, wave_segment: int) -> tuple:
    volume = problem["volume"]
    gradient, illumination = np.zeros_like(volume), np.zeros(volume.shape, np.float32)
    result = loss_and_gradient(problem["probe"], problem["shifts"],
                               SliceWindows(volume, problem["starts"], problem["probe"].shape[-1]),
                               problem["propagator"], problem["measured"], loss, want_probe_gradient=True,
                               want_position_gradient=True, sink=TileSink(gradient, illumination, problem["starts"]),
                               wave_segment=wave_segment)
    return (result.loss, gradient, illumination, result.probe_gradient, result.position_gradient,
            result.position_curvature)


@pytest.mark.parametrize("n_modes", [None, 3])
@pytest.mark.parametrize("loss", ["amplitude", "poisson"])
@pytest.mark.parametrize("n_slices, segments", [(2, [1]), (5, [1, 2, 3, 4]), (9, [2, 3, 4]), (16, [4, 5])])
def test_recomputed_waves_give_the_stored_waves_results_bit_for_bit(
        n_slices: int, segments: list[int], loss: str, n_modes: int | None) -> None:
    problem = tile_problem(n_slices, n_modes)
    stored = gradients(problem, loss, 0)
    assert np.abs(stored[1]).max() > 0 and stored[4] is not None
    for segment in segments:
        recomputed = gradients(problem, loss, segment)
        assert recomputed[0] == stored[0]
        for name, a, b in zip(("object", "illumination", "probe", "positions", "curvature"), stored[1:],
                              recomputed[1:], strict=True):
            assert np.array_equal(a, b), f"{name} gradient differs with segments of {segment}"


def test_a_segment_of_the_whole_depth_or_more_stores_every_wave_and_needs_no_sink() -> None:
    problem = tile_problem(4, None)
    patches = SliceWindows(problem["volume"], problem["starts"], 16)
    args = (problem["probe"], problem["shifts"], patches, problem["propagator"], problem["measured"])
    whole = loss_and_gradient(*args, wave_segment=4)
    assert whole.object_gradient.shape == (4, 5, 16, 16)
    assert np.array_equal(whole.object_gradient, loss_and_gradient(*args).object_gradient)
    with pytest.raises(ValueError, match="need a sink"):
        loss_and_gradient(*args, wave_segment=2)


@pytest.mark.parametrize("n_slices, segment, held", [(1, 1, 1), (4, 0, 4), (4, 4, 4), (4, 2, 3), (100, 10, 19),
                                                     (10, 3, 6), (16, 4, 7)])
def test_held_waves_counts_one_start_per_earlier_segment_and_one_segment(n_slices: int, segment: int,
                                                                          held: int) -> None:
    assert held_waves(n_slices, segment) == held


@pytest.mark.parametrize("n_slices, segment", [(1, 1), (2, 2), (4, 2), (10, 4), (16, 4), (17, 5), (100, 10)])
def test_the_default_segment_is_the_ceiling_of_the_square_root(n_slices: int, segment: int) -> None:
    assert wave_segment_slices(n_slices) == segment
    # and no other segment length holds fewer waves
    assert held_waves(n_slices, segment) == min(held_waves(n_slices, g) for g in range(1, n_slices + 1))
