"""The simulator's typed result: shapes, dtypes, immutability, and the dose model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ptylive.gpu.simulate import Simulation, SimulationSpec, scan_positions, simulate

SPEC = SimulationSpec(detector_px=16, detector_pixel_mrad=6.0, scan_shape=(3, 4), scan_step_px=2.0, n_slices=2)


@pytest.fixture(scope="module")
def simulation() -> Simulation:
    return simulate(SPEC)


def test_fields_have_the_documented_shapes_and_dtypes(simulation: Simulation) -> None:
    n, window = 12, SPEC.window_px
    assert simulation.intensities.shape == (n, 16, 16) and simulation.intensities.dtype == np.float32
    assert simulation.positions_px.shape == (n, 2) and simulation.positions_px.dtype == np.float64
    np.testing.assert_array_equal(simulation.positions_px, scan_positions(SPEC))
    assert simulation.probe.shape == (window, window) and simulation.probe.dtype == np.complex64
    slices, rows, cols = simulation.object_truth.shape
    assert slices == 2 and simulation.object_truth.dtype == np.complex64
    assert (rows, cols) == (window + 2 * 2, window + 3 * 2)  # the last window ends at the object's edge
    np.testing.assert_allclose(np.abs(simulation.object_truth), 1.0, rtol=1e-6)  # a pure phase object
    assert simulation.metadata["pixel_size_A"] == SPEC.pixel_size_A and simulation.metadata["n_slices"] == 2


def test_result_is_frozen(simulation: Simulation) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        simulation.probe = simulation.probe  # type: ignore[misc]


def test_dose_gives_reproducible_integer_counts(simulation: Simulation) -> None:
    dosed = dataclasses.replace(SPEC, dose_e_per_A2=1e4, seed=3)
    counts, again = simulate(dosed).intensities, simulate(dosed).intensities
    np.testing.assert_array_equal(counts, again)
    np.testing.assert_array_equal(counts, np.round(counts))
    electrons = 1e4 * (SPEC.scan_step_px * SPEC.pixel_size_A) ** 2
    np.testing.assert_allclose(counts.sum(axis=(1, 2)), simulation.intensities.sum(axis=(1, 2)) * electrons,
                               rtol=0.1)


def test_progress_is_reported_after_every_batch_and_ends_at_the_total(simulation: Simulation) -> None:
    seen: list[tuple[int, int]] = []
    again = simulate(SPEC, batch_size=5, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(5, 12), (10, 12), (12, 12)]  # 12 positions in batches of 5
    np.testing.assert_array_equal(again.intensities, simulation.intensities)  # the hook changes nothing
