"""The update sweeps only where it can change the tile (daemon/engine/sweep.py), with the same result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptylive.daemon.engine.iteration as iteration
from ptylive.daemon.engine.decomposition import Box, decompose, windows_box
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.iteration import fit_scale, run_async, run_sync
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.sweep import WHOLE, GradientWorkspace, disjoint_cover
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.gpu.patches import window_starts
from ptylive.gpu.simulate import SimulationSpec, simulate

PAD = 20


def padded_tile(max_amplitude_start: float = 1.0) -> TileState:
    """A small simulated scan (float64) in the middle of an object with ``PAD`` vacuum pixels on every side."""
    spec = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=2, scan_shape=(6, 6), scan_step_px=3.0)
    sim = simulate(spec)
    window = spec.window_px
    shape = (sim.object_truth.shape[1] + 2 * PAD, sim.object_truth.shape[2] + 2 * PAD)
    positions = sim.positions_px + PAD
    domain = decompose(shape, positions, window, 1)[0]
    starts, shifts = window_starts(positions, window)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A, window,
                        2, spec.slice_thickness_A, sim.probe)
    state = set_up_tile(domain, optics, starts, shifts, sim.intensities.astype(np.float64), np, "double")
    state.volume *= max_amplitude_start
    fit_scale(state, NullExchanger(), EngineOptions())
    return state


boxes = st.builds(lambda r, c, h, w: Box(r, r + h, c, c + w), st.integers(0, 30), st.integers(0, 30),
                  st.integers(0, 12), st.integers(0, 12))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(boxes, st.none()), max_size=6))
def test_disjoint_cover_covers_the_union_once(chosen: list[Box | None]) -> None:
    union, covered = np.zeros((45, 45), bool), np.zeros((45, 45), int)
    for box in chosen:
        if box is not None:
            union[box.row0:box.row1, box.col0:box.col1] = True
    for rows, cols in disjoint_cover(chosen):
        covered[rows, cols] += 1
    np.testing.assert_array_equal(covered, union.astype(int))


def test_windows_box_bounds_every_window() -> None:
    starts = np.array([[3, 9], [7, 2], [5, 5]])
    assert windows_box(starts, 4) == Box(3, 11, 2, 13)
    assert windows_box(starts[:0], 4) is None


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("start", [1.0, 1.3])  # 1.3: the first update's whole-tile constraint matters
def test_sweeping_the_windows_box_gives_the_whole_tile_result(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                               start: float) -> None:
    """Every default feature on (line search, probe, positions from iteration 1), 4 updates per iteration.

    Equal to rounding, not bit for bit: numpy's SIMD loops round complex products differently at the ends
    of a row than inside it, and a view of the box has other row ends than the whole tile (the whole
    tile's rounding depends on its shape, and so on the number of ranks, in the same way).
    """
    options = EngineOptions(iterations=4, mode=mode, updates_per_iteration=4, positions_from_iteration=1)
    run = run_sync if mode == "sync" else run_async
    swept, whole = padded_tile(start), padded_tile(start)
    run(swept, NullExchanger(), options)
    seen: list[int] = []

    def everywhere(*args: object, **kwargs: object) -> list:
        seen.append(1)
        return WHOLE

    monkeypatch.setattr(iteration, "update_regions", everywhere)
    run(whole, NullExchanger(), options)
    assert len(seen) == 16
    np.testing.assert_allclose(swept.volume, whole.volume, rtol=0, atol=1e-13)
    np.testing.assert_allclose(swept.probe, whole.probe, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(swept.starts, whole.starts)
    assert not np.allclose(swept.volume[:, PAD:-PAD, PAD:-PAD], start)  # the scanned part moved ...
    np.testing.assert_allclose(np.abs(swept.volume[:, :PAD // 2]), min(start, 1.0), rtol=1e-15)  # ... vacuum clipped


def test_the_workspace_is_zero_between_updates() -> None:
    state = padded_tile()
    workspace = GradientWorkspace(state.volume)
    run_sync(state, NullExchanger(), EngineOptions(iterations=2, updates_per_iteration=3), workspace=workspace)
    assert workspace.constrained
    assert not workspace.gradient.any() and not workspace.illumination.any()
    gradient, _ = workspace.begin()
    gradient[0, 0, 0] = 1.0  # an update that never ended (an exception) ...
    assert not workspace.begin()[0].any()  # ... is cleared whole at the next one
