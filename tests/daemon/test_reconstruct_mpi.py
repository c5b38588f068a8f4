"""``ptylive reconstruct`` under real mpiexec: sync equivalence, async accuracy, memory."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import decompose
from ptylive.gpu.quality import phase_correlation
from tests.conftest import read_result, run_cli

pytestmark = pytest.mark.mpi


def reconstruct(scan: Path, out: Path, ranks: int, *extra: str) -> dict[str, np.ndarray]:
    result = run_cli("reconstruct", str(scan), "--ranks", str(ranks), "--out", str(out), "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    return read_result(out)


def test_problem_is_non_trivial(small_scan: Path) -> None:
    with h5py.File(small_scan) as f:
        positions, shape, window = f["positions_px"][...], f["object_truth"].shape, f["probe"].shape[0]
    assert shape[0] >= 3 and shape[1] != shape[2]
    domains = decompose(shape[1:], positions, window, 4)
    for d in domains:
        assert max(d.tile.shape) < window and len(d.positions) > 0
    # the scan crosses every internal tile boundary
    for boundary in {d.tile.row0 for d in domains} - {0}:
        assert (positions[:, 0] < boundary).any() and (positions[:, 0] >= boundary).any()
    for boundary in {d.tile.col0 for d in domains} - {0}:
        assert (positions[:, 1] < boundary).any() and (positions[:, 1] >= boundary).any()


# Float64: only summation order differs between rank counts (1e-16 per sum, a few hundred
# updates). Float32: 6e-8 per operation through the same steps; 1e-4 per the spec.
# The float64 case runs with the depth penalty on (added after the halo sum over each whole extended tile,
# local along z, so it adds no rank dependence); float64 with it off is the probe and position test below.
@pytest.mark.parametrize("precision, tolerance, depth", [("double", 1e-10, "0.1"), ("single", 1e-4, "0")])
def test_sync_result_is_independent_of_rank_count(small_scan: Path, tmp_path: Path, precision: str,
                                                  tolerance: float, depth: str) -> None:
    args = ("--iterations", "4", "--precision", precision, "--depth-regularisation", depth)
    volumes = {r: reconstruct(small_scan, tmp_path / f"r{r}.h5", r, *args)["object"] for r in (1, 2, 4)}
    reference = volumes[1]
    assert np.abs(reference - 1).max() > 0.1  # the reconstruction actually moved
    for ranks in (2, 4):
        difference = np.abs(volumes[ranks] - reference).max() / np.abs(reference).max()
        assert difference < tolerance, (ranks, difference)


def test_async_loss_within_five_percent_of_sync(small_scan: Path, tmp_path: Path) -> None:
    # Step 0.5 for both modes: at step 1 (full projection per mini-batch) neighbours' updates
    # arriving one or more updates late over-correct and async lags sync by 15-45 % at 10
    # iterations (docs/decomposition.md). At 20 iterations the loss still fell 5 % per iteration, so async's
    # timing-dependent lag (4 ranks on 2 shared cores) moved its final loss -6 % to +6 % of sync's (sync 0.0306;
    # async 0.0287-0.0325 over 5 runs, this test failing 2 of them); at 40 iterations (1-2 % per iteration)
    # async ended 0.0173-0.0177 against sync 0.0174: within 2.2 %.
    # Probe and positions fixed: this compares the two exchanges (async refines the probe one iteration
    # late by design, and that schedule is tested on its own below).
    common = ("--iterations", "40", "--step-size", "0.5", "--no-refine-probe", "--no-correct-positions")
    sync = reconstruct(small_scan, tmp_path / "sync.h5", 4, *common)
    asyn = reconstruct(small_scan, tmp_path / "async.h5", 4, *common, "--mode", "async")
    assert asyn["attrs"]["mode"] == "async"
    assert asyn["ranks/bytes_sent"].min() > 0
    assert sync["loss"][-1] < 0.5 * sync["loss"][0]  # both actually converge
    assert abs(asyn["loss"][-1] - sync["loss"][-1]) <= 0.05 * sync["loss"][-1], (asyn["loss"], sync["loss"])
    assert asyn["ranks/staleness_mean"].max() > 0  # it really ran behind its neighbours
    # staleness is bounded by --max-staleness (4), except the final drain after the last update
    assert asyn["ranks/staleness_max"].max() <= 4 + 1
    with h5py.File(small_scan) as f:
        truth, positions = f["object_truth"][...], f["positions_px"][...]
    sync_quality = phase_correlation(sync["object"], truth, positions)
    assert phase_correlation(asyn["object"], truth, positions) > 0.9 * sync_quality


def test_measured_peak_memory_matches_plan(small_scan: Path, tmp_path: Path) -> None:
    for ranks, mode in ((1, "sync"), (4, "sync"), (4, "async")):
        result = reconstruct(small_scan, tmp_path / f"m{ranks}{mode}.h5", ranks, "--iterations", "2", "--mode", mode)
        ratio = result["ranks/peak_memory_bytes"] / result["ranks/predicted_memory_bytes"]
        assert np.all(np.abs(ratio - 1) < 0.2), (ranks, mode, ratio)


def test_probe_refinement_is_rank_independent_and_moves_the_probe(small_scan: Path, tmp_path: Path) -> None:
    args = ("--iterations", "3", "--precision", "double", "--refine-probe")
    one = reconstruct(small_scan, tmp_path / "p1.h5", 1, *args)
    two = reconstruct(small_scan, tmp_path / "p2.h5", 2, *args)
    with h5py.File(small_scan) as f:
        initial_probe = f["probe"][...]
    assert np.abs(one["probe"] - initial_probe).max() > 1e-4 * np.abs(initial_probe).max()
    assert np.abs(two["probe"] - one["probe"]).max() < 1e-10 * np.abs(one["probe"]).max()
    assert np.abs(two["object"] - one["object"]).max() < 1e-10 * np.abs(one["object"]).max()


def test_async_probe_refinement_runs_and_moves_the_probe(small_scan: Path, tmp_path: Path) -> None:
    result = reconstruct(small_scan, tmp_path / "ap.h5", 2, "--mode", "async", "--refine-probe", "--iterations", "6")
    with h5py.File(small_scan) as f:
        initial_probe = f["probe"][...]
    assert np.isfinite(result["object"]).all() and np.isfinite(result["probe"]).all()
    assert np.abs(result["probe"] - initial_probe).max() > 1e-4 * np.abs(initial_probe).max()
    assert result["loss"][-1] < result["loss"][0]


def test_sync_with_probe_refinement_and_position_correction_is_independent_of_rank_count(
        small_scan: Path, tmp_path: Path) -> None:
    """Float64, probe refined and positions corrected (from iteration 3): 1, 2 and 4 ranks agree to rounding."""
    args = ("--iterations", "5", "--precision", "double", "--refine-probe", "--correct-positions")
    results = {r: reconstruct(small_scan, tmp_path / f"pc{r}.h5", r, *args) for r in (1, 2, 4)}
    reference = results[1]
    moved = np.abs(reference["positions_px"] - reference["positions_nominal_px"]).max()
    assert moved > 1e-3  # the positions really were corrected
    for ranks in (2, 4):
        other = results[ranks]
        assert np.abs(other["object"] - reference["object"]).max() < 1e-10 * np.abs(reference["object"]).max()
        assert np.abs(other["probe"] - reference["probe"]).max() < 1e-10 * np.abs(reference["probe"]).max()
        assert np.abs(other["positions_px"] - reference["positions_px"]).max() < 1e-8  # pixels


def test_a_strong_phase_object_in_async_mode_stays_finite_and_converges(tmp_path: Path) -> None:
    """Regression: 12 slices of PbTiO3 on 4 ranks, async. Neighbours' updates used to arrive after a rank's
    amplitude constraint, |O| grew through the slices and the loss was NaN from the second iteration."""
    scan = tmp_path / "strong.h5"
    assert run_cli("simulate", str(scan), "--detector-px", "32", "--detector-pixel-mrad", "3.0", "--slices", "12",
                   "--scan", "12", "12", "--step-px", "2", "--dose", "1e5").returncode == 0
    default = reconstruct(scan, tmp_path / "default.h5", 4, "--mode", "async", "--iterations", "8")
    assert np.isfinite(default["object"]).all() and np.isfinite(default["loss"]).all()
    assert default["loss"][-1] < 0.6 * default["loss"][0]  # (async: not monotonic to the last update)
    # the old default (step 1, optics probe) still overshoots, but nothing non-finite reaches the result
    classic = reconstruct(scan, tmp_path / "classic.h5", 4, "--mode", "async", "--iterations", "8",
                          "--step-size", "1", "--no-refine-probe")
    assert np.isfinite(classic["object"]).all() and np.isfinite(classic["loss"]).all()
    assert classic["loss"][-1] > default["loss"][-1]
