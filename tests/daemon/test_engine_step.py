"""The engine's update step and step rule, reached directly (no MPI, no CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import decompose
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.iteration import (
    async_update,
    fit_scale,
    local_gradient,
    minibatches,
    ordered_for_line_search,
    run_sync,
    take_step,
)
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.step import StepControl, line_search_subset, measure_step, parabola_step
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.gpu.patches import window_starts
from ptylive.gpu.simulate import SimulationSpec, simulate
from ptylive.gpu.update import constrain, object_update


def small_tile(n_slices: int = 2, seed: int = 3) -> TileState:
    """One rank's tile of a small simulated PbTiO3 scan (float64), scale fitted, object at vacuum."""
    spec = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=n_slices, scan_shape=(6, 6),
                          scan_step_px=3.0, seed=seed)
    sim = simulate(spec)
    window = spec.window_px
    shape = sim.object_truth.shape[-2:]
    domain = decompose(shape, sim.positions_px, window, 1)[0]
    starts, shifts = window_starts(sim.positions_px, window)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A, window,
                        n_slices, spec.slice_thickness_A, sim.probe)
    state = set_up_tile(domain, optics, starts, shifts, sim.intensities.astype(np.float64), np, "double")
    fit_scale(state, NullExchanger(), EngineOptions())
    return state


def test_async_update_on_one_rank_is_the_sync_update() -> None:
    """With nobody to exchange with, the async step applies exactly what the sync iteration applies."""
    options = EngineOptions(iterations=1, updates_per_iteration=4)
    one, two = small_tile(), small_tile()
    members = minibatches(one, options)[1]
    control_sync, control_async = StepControl.from_options(options), StepControl.from_options(options)
    # sync path, written out: gradient, exact totals (identity on one rank), step, constraint
    ordered, n_subset = ordered_for_line_search(one, members, len(members))
    found = local_gradient(one, options, ordered, n_first=n_subset)
    floor = options.illumination_floor * float(found.illumination.max())
    direction = object_update(found.gradient, found.illumination, floor, 1.0)
    one.volume += take_step(one, options, control_sync, ordered[:n_subset], found, direction, np.asarray)
    constrain(one.volume, options.max_amplitude)
    loss, _, illumination_max = async_update(two, NullExchanger(), options, control_async, members, 1, 0, floor)
    assert loss == pytest.approx(found.loss, rel=1e-12)
    assert control_sync.steps == control_async.steps and control_sync.steps[0] > 0
    np.testing.assert_allclose(two.volume, one.volume, rtol=0, atol=1e-13)
    assert not np.allclose(one.volume, 1.0)  # it moved


def test_a_non_finite_update_is_not_applied_counted_and_backs_off() -> None:
    state = small_tile()
    options = EngineOptions(iterations=1, updates_per_iteration=4)
    control = StepControl.from_options(options)
    members = minibatches(state, options)[0]
    ordered, n_subset = ordered_for_line_search(state, members, len(members))
    found = local_gradient(state, options, ordered, n_first=n_subset)
    direction = object_update(found.gradient, found.illumination, 1e-3, 1.0)
    direction[0, 5, 5] = np.nan
    before = state.volume.copy()
    update = take_step(state, options, control, ordered[:n_subset], found, direction, np.asarray)
    assert np.all(update == 0) and control.rejected == 1 and control.steps == [0.0]
    assert control.trial == pytest.approx(0.5 * options.step)
    state.volume += update
    np.testing.assert_array_equal(state.volume, before)


def test_parabola_step_finds_the_minimum_of_a_parabola() -> None:
    def loss(alpha: float) -> float:
        return 3.0 * (alpha - 0.3) ** 2 + 1.0

    assert parabola_step(loss(0), loss(0.25), loss(0.5), 0.25) == pytest.approx(0.3, rel=1e-12)
    assert parabola_step(loss(0), loss(0.05), loss(0.1), 0.05) == pytest.approx(0.1)  # capped at 2a
    assert parabola_step(1.0, 2.0, 5.0, 0.5) == 0.0  # rising: go nowhere


def test_the_step_rule_keeps_a_step_that_lowers_the_loss_and_backtracks_otherwise() -> None:
    control = StepControl(fixed=None, trial=1.0, nominal=1.0, largest=1.0)
    assert measure_step(control, 10.0, True, lambda a: 10.0 - a, np.asarray) == 1.0
    assert control.trial == 1.0  # already at the nominal step
    # the loss along the direction is 10 + 40 (a - 0.2)^2 - 1.6: rises at a = 1, minimum at 0.2
    alpha = measure_step(control, 10.0, True, lambda a: 10.0 + 40.0 * (a - 0.2) ** 2 - 1.6, np.asarray)
    assert alpha == pytest.approx(0.2) and control.trial == pytest.approx(0.25)  # at least a / 4
    control.end_iteration(5.0)
    control.end_iteration(6.0)  # the iteration's loss rose: the nominal step halves
    assert control.nominal == pytest.approx(0.5) and control.trial <= 0.5
    control.end_iteration(4.0)
    assert control.nominal == pytest.approx(0.6)


def test_a_fixed_step_is_taken_as_given_without_line_search() -> None:
    control = StepControl(fixed=0.3, trial=1.0, nominal=1.0, largest=1.0)

    def never(_: float) -> float:
        raise AssertionError("no line search with a fixed step")

    assert measure_step(control, 10.0, True, never, np.asarray) == 0.3


def test_the_line_search_subset_depends_only_on_global_indices() -> None:
    indices = np.arange(1000)
    chosen = line_search_subset(indices, 1000)
    assert 0.15 < chosen.mean() < 0.35  # about a quarter
    np.testing.assert_array_equal(line_search_subset(indices[500:], 1000), chosen[500:])  # split over ranks
    assert line_search_subset(indices[:8], 8).all()  # small mini-batches measure with every position


def test_strong_phase_object_at_the_classic_step_diverged_and_the_measured_step_does_not() -> None:
    """A thick strong phase object: step 1 raises the loss; the default rule lowers it and stays finite."""
    fixed, measured = small_tile(n_slices=12), small_tile(n_slices=12)  # nothing shared (the probe is refined)
    fixed_report = run_sync(fixed, NullExchanger(), EngineOptions(iterations=4, step_size=1.0))
    measured_report = run_sync(measured, NullExchanger(), EngineOptions(iterations=4))
    assert fixed_report.loss_history[-1] > measured_report.loss_history[-1]
    assert np.isfinite(measured.volume).all()
    assert measured_report.loss_history[-1] < 0.5 * measured_report.loss_history[0]
