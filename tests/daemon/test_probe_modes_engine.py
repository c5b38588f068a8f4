"""Probe modes in the engine: set-up, K = 1 against one probe, options, a partially coherent beam, and
rank equivalence under real mpiexec."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import decompose
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.iteration import fit_scale, run_sync
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.positions import PositionCorrection
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.daemon.service.config import ConfigError, ReconstructionConfig
from ptylive.gpu.loss import AMPLITUDE_DELTA_PER_PIXEL, model_intensity
from ptylive.gpu.multislice import forward
from ptylive.gpu.patches import extract_patches, window_starts
from ptylive.gpu.probe_modes import MODE_POWER_FRACTION, mode_powers, orthogonalise_modes
from ptylive.gpu.simulate import Simulation, SimulationSpec, simulate, source_probes
from tests.conftest import read_result, run_cli

ROUNDING = 1e-12  # float64, a few hundred operations on O(1) numbers


def tile_for(spec: SimulationSpec, sim: Simulation, probe_modes: int) -> TileState:
    """One rank's tile of ``sim`` in float64, the file's (nominal, coherent) probe as mode 0, scale fitted."""
    window = spec.window_px
    domain = decompose(sim.object_truth.shape[-2:], sim.positions_px, window, 1)[0]
    starts, shifts = window_starts(sim.positions_px, window)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A, window,
                        spec.n_slices, spec.slice_thickness_A, sim.probe)
    state = set_up_tile(domain, optics, starts, shifts, sim.intensities.astype(np.float64), np, "double",
                        probe_modes)
    fit_scale(state, NullExchanger(), EngineOptions())
    return state


SMALL = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=2, scan_shape=(6, 6), scan_step_px=3.0)


def test_set_up_tile_makes_orthogonal_modes_around_the_optics_probe() -> None:
    sim = simulate(SMALL)
    state = tile_for(SMALL, sim, 3)
    assert state.probe.shape == (3, 32, 32)
    powers = mode_powers(state.probe)
    power = float(np.sum(np.abs(sim.probe.astype(np.complex128)) ** 2))  # 1 to the file's float32 rounding
    assert powers.sum() == pytest.approx(power, rel=ROUNDING)
    assert powers[0] == pytest.approx((1.0 - MODE_POWER_FRACTION) * power, rel=ROUNDING)
    # mode 0 is the file's probe (stored as complex64: its rounding, 6e-8 relative)
    np.testing.assert_allclose(state.probe[0], np.sqrt(1.0 - MODE_POWER_FRACTION) * sim.probe, rtol=0,
                               atol=1e-6 * np.abs(sim.probe).max())
    assert tile_for(SMALL, sim, 1).probe.shape == (32, 32)  # K = 1: one (N, N) probe, as before


@pytest.mark.parametrize("loss, correct", [("amplitude", False), ("poisson", False), ("amplitude", True)])
def test_one_mode_runs_bit_for_bit_like_one_probe(loss: str, correct: bool) -> None:
    """A (1, N, N) probe through the whole engine (gradients, line search, probe steps) is the (N, N) run."""
    sim = simulate(SMALL)
    options = EngineOptions(iterations=3, loss=loss, updates_per_iteration=4, correct_positions=correct,
                            positions_from_iteration=1)
    runs = []
    for as_mode in (False, True):
        state = tile_for(SMALL, sim, 1)
        if as_mode:
            state.probe = state.probe[None].copy()
        if correct:
            state.positions = PositionCorrection.start(sim.positions_px, options.positions_from_iteration)
        report = run_sync(state, NullExchanger(), options)
        runs.append((state, report))
    (plain, plain_report), (moded, moded_report) = runs
    assert moded_report.loss_history == plain_report.loss_history
    np.testing.assert_array_equal(moded.volume, plain.volume)
    np.testing.assert_array_equal(moded.probe[0], plain.probe)
    assert not np.allclose(plain.volume, 1.0)  # it moved


def test_options_and_config_take_probe_modes() -> None:
    with pytest.raises(ValueError, match="probe_modes"):
        EngineOptions(probe_modes=0)
    assert EngineOptions().probe_modes == 1
    config = ReconstructionConfig(refine_probe=True, probe_modes=3)
    assert config.engine_options("sync", 5).probe_modes == 3
    assert ReconstructionConfig().engine_options("async", 5).probe_modes == 1
    with pytest.raises(ConfigError, match="probe_modes"):
        ReconstructionConfig(probe_modes=2)  # refine_probe is off by default in serve: the modes would stay fixed
    with pytest.raises(ConfigError, match="probe_modes"):
        ReconstructionConfig(refine_probe=True, probe_modes=0)


# A beam with a chromatic focal spread of σ = 60 Å (three Gauss-Hermite defoci 40 Å ± 104 Å): its density
# matrix has eigenvalues 0.68, 0.17, 0.15, far from one coherent probe. One slice, noise free, 8×8 positions.
SPREAD = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=1, scan_shape=(8, 8), scan_step_px=2.0,
                        focal_spread_A=60.0, focal_spread_samples=3)


def test_the_source_eigenmodes_and_the_true_object_fit_partially_coherent_data() -> None:
    """The K = 3 model holds the data exactly: the loss at the truth is the δ smoothing and float32 storage."""
    sim = simulate(SPREAD)
    modes = orthogonalise_modes(source_probes(SPREAD))
    assert mode_powers(modes)[1] > 0.1  # really incoherent
    state = tile_for(SPREAD, sim, 3)
    state.probe = modes
    window = SPREAD.window_px
    truth = sim.object_truth.astype(np.complex128)
    patches = extract_patches(truth, state.starts, window)
    intensity = model_intensity(forward(modes, state.shifts, patches, state.propagator, 32))
    amplitude = np.sqrt(intensity)
    # D = N and a phase object: every frame and the vacuum model carry power 1, so α = 1 (float32 data: 6e-8)
    assert state.scale == pytest.approx(1.0, rel=1e-6)
    residual = np.sqrt(intensity + (AMPLITUDE_DELTA_PER_PIXEL / 32) ** 2) - state.targets
    # δ adds at most δ per pixel; float32 data add 6e-8 relative to each amplitude
    assert np.abs(residual).max() <= AMPLITUDE_DELTA_PER_PIXEL / 32 + 1e-6 * amplitude.max()


def final_loss(spec: SimulationSpec, probe_modes: int, iterations: int = 30) -> float:
    state = tile_for(spec, simulate(spec), probe_modes)
    report = run_sync(state, NullExchanger(), EngineOptions(iterations=iterations, updates_per_iteration=4,
                                                           probe_modes=probe_modes))
    assert np.isfinite(report.loss_history).all()
    return report.loss_history[-1]


def test_probe_modes_fit_a_partially_coherent_beam_that_one_probe_cannot() -> None:
    """Same data, same start, same iterations: K = 3 removes a large share of what the mixture costs K = 1.

    Reference: the same scan with a coherent beam, where one probe reaches ``coherent`` in 30 iterations. With
    the focal spread, one probe stalls far above it (it cannot represent a rank-3 density matrix: measured
    3.7e-2 against 5e-4); three modes, which can represent it exactly (test above), remove a clear share of the
    excess (measured 46 %); a quarter is asked.
    """
    coherent = final_loss(SimulationSpec(**{**SPREAD.__dict__, "focal_spread_A": 0.0}), 1)
    one = final_loss(SPREAD, 1)
    three = final_loss(SPREAD, 3)
    assert one > 10 * coherent, (one, coherent)
    assert three < one - 0.25 * (one - coherent), (three, one, coherent)


def reconstruct(scan: Path, out: Path, ranks: int, *extra: str) -> dict[str, np.ndarray]:
    result = run_cli("reconstruct", str(scan), "--ranks", str(ranks), "--out", str(out), "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    return read_result(out)


@pytest.mark.mpi
def test_sync_with_two_probe_modes_is_independent_of_rank_count(small_scan: Path, tmp_path: Path) -> None:
    """Float64, two modes, probe refined and positions corrected: 1, 2 and 4 ranks agree to rounding.

    Every rank applies the same all-reduced mode gradients, then the same deterministic orthogonalisation;
    only summation order differs between rank counts (1e-16 per sum), as in test_reconstruct_mpi.py.
    """
    args = ("--iterations", "5", "--precision", "double", "--refine-probe", "--correct-positions",
            "--probe-modes", "2")
    results = {r: reconstruct(small_scan, tmp_path / f"m{r}.h5", r, *args) for r in (1, 2, 4)}
    reference = results[1]
    assert reference["probe"].shape == (2, 32, 32)
    with h5py.File(small_scan) as f:
        initial = f["probe"][...].astype(np.complex128)
    flat = reference["probe"].reshape(2, -1)
    assert abs(np.vdot(flat[0], flat[1])) < ROUNDING  # orthogonal modes in the file
    assert np.sum(np.abs(flat) ** 2) == pytest.approx(np.sum(np.abs(initial) ** 2), rel=ROUNDING)  # power kept
    assert np.abs(reference["probe"][0] / np.sqrt(1 - MODE_POWER_FRACTION) - initial).max() > 1e-4  # refined
    assert np.abs(reference["positions_px"] - reference["positions_nominal_px"]).max() > 1e-3  # corrected
    for ranks in (2, 4):
        other = results[ranks]
        assert np.abs(other["object"] - reference["object"]).max() < 1e-10 * np.abs(reference["object"]).max()
        assert np.abs(other["probe"] - reference["probe"]).max() < 1e-10 * np.abs(reference["probe"]).max()
        assert np.abs(other["positions_px"] - reference["positions_px"]).max() < 1e-8  # pixels


@pytest.mark.mpi
def test_async_with_probe_modes_runs_and_keeps_orthogonal_modes(small_scan: Path, tmp_path: Path) -> None:
    result = reconstruct(small_scan, tmp_path / "async.h5", 2, "--mode", "async", "--iterations", "4",
                         "--probe-modes", "3")
    probe = result["probe"]
    assert probe.shape == (3, 32, 32) and np.isfinite(probe).all() and np.isfinite(result["object"]).all()
    flat = probe.reshape(3, -1).astype(np.complex128)
    gram = flat.conj() @ flat.T
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-6  # single precision
    assert result["loss"][-1] < result["loss"][0]


def test_probe_modes_without_probe_refinement_is_refused(small_scan: Path, tmp_path: Path) -> None:
    result = run_cli("reconstruct", str(small_scan), "--out", str(tmp_path / "x.h5"), "--probe-modes", "2",
                     "--no-refine-probe", "--quiet")
    assert result.returncode != 0 and "probe_modes" in result.stderr
