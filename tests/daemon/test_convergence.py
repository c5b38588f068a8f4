"""Reconstructions of simulated PbTiO3 recover the projected phase."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ptylive.daemon.engine.memory_plan import plan_memory, synthetic_positions
from ptylive.gpu.quality import phase_correlation
from tests.conftest import read_result, run_cli


def correlation_after(scan: Path, out: Path, iterations: int, *extra: str) -> float:
    result = run_cli("reconstruct", str(scan), "--iterations", str(iterations), "--out", str(out), "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    with h5py.File(scan) as f:
        truth, positions = f["object_truth"][...], f["positions_px"][...]
    loss = read_result(out)["loss"]
    if "poisson" in extra:  # the Poisson NLL is dominated by its constant part Σ I log I
        assert loss[-1] < loss[0]
    else:  # noisy data cannot fall below the noise floor (about half the initial loss here)
        assert loss[-1] < 0.75 * loss[0]
    return phase_correlation(read_result(out)["object"], truth, positions)


def test_noise_free_pbtio3_phase_correlates(default_scan: Path, tmp_path: Path) -> None:
    assert correlation_after(default_scan, tmp_path / "r.h5", 30) >= 0.9


def test_pbtio3_at_1e5_electrons_per_A2_correlates(tmp_path: Path) -> None:
    scan = tmp_path / "noisy.h5"
    assert run_cli("simulate", str(scan), "--dose", "1e5").returncode == 0
    with h5py.File(scan) as f:
        counts = f["intensities"][...]
    assert np.all(counts == np.round(counts)) and 1e3 < counts.sum(axis=(1, 2)).mean() < 1e5  # Poisson counts
    assert correlation_after(scan, tmp_path / "r.h5", 30) >= 0.9


def test_poisson_loss_at_default_step_recovers_the_structure(tmp_path: Path) -> None:
    # At step 1 the Poisson loss diverged (correlation 0.03); its default step is halved.
    scan = tmp_path / "noisy.h5"
    assert run_cli("simulate", str(scan), "--dose", "1e5").returncode == 0
    assert correlation_after(scan, tmp_path / "r.h5", 30, "--loss", "poisson") >= 0.8


def test_object_and_gradient_per_rank_shrink_below_40_percent_at_4_ranks() -> None:
    window = 64
    shape = (8 * window, 8 * window + 40)
    positions = synthetic_positions(shape, 900, window)
    one = plan_memory(shape, positions, 1, 4, window, window)[0]
    for rank in plan_memory(shape, positions, 4, 4, window, window):
        assert (rank.object + rank.gradient) < 0.4 * (one.object + one.gradient)


def test_the_plan_counts_the_missing_cone_scratch_only_where_the_filter_runs() -> None:
    """64 slices, one position per batch with recomputed waves: the filter's column block (64 × 256 × 64
    complex64, 8 MiB) is the workspace with the filter and absent without it."""
    window = 64
    shape = (4 * window, 4 * window + 16)
    positions = synthetic_positions(shape, 100, window)
    args = (shape, positions, 1, 64, window, window, 1)
    on = plan_memory(*args, recompute_waves=True)[0]
    off = plan_memory(*args, recompute_waves=True, missing_cone=False)[0]
    assert on.batch_workspace == 64 * shape[0] * 64 * 8
    assert off.batch_workspace < 0.5 * on.batch_workspace
    assert off.total == on.total - (on.batch_workspace - off.batch_workspace)
