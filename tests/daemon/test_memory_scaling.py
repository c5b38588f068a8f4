"""Per-rank memory shrinks with the rank count, and ``ptylive plan`` predicts what the ranks measure.

A scaled analog of the method's small data set (1024² × 100 slices, 462 positions, 256-px windows):
a quarter of its side (64-px windows, 22 × 21 positions 9 px apart, an object of about 253² px) and
40 slices, so per-slice arrays dominate as they do there. Each rank measures its peak array memory with
tracemalloc (``ranks/peak_memory_bytes``) beside the plan's prediction for its own tile
(``ranks/predicted_memory_bytes``); the plan must hold within 15 % on every rank, sync and async.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptylive.gpu.fft import PLANNER_ENV
from tests.conftest import read_result, run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

PLAN_TOLERANCE = 0.15  # issue 13: plan and measurement within 15 %


@pytest.fixture(scope="module")
def deep_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scans") / "deep.h5"
    result = run_cli("simulate", str(path), "--detector-px", "64", "--scan", "22", "21", "--step-px", "9",
                     "--slices", "40", "--slice-thickness-A", "1.0", "--quiet")
    assert result.returncode == 0, result.stderr
    return path


def measure(scan: Path, out: Path, ranks: int, mode: str, *extra: str) -> dict[str, np.ndarray]:
    result = run_cli("reconstruct", str(scan), "--ranks", str(ranks), "--out", str(out), "--quiet",
                     "--iterations", "2", "--mode", mode, *extra, timeout=600)
    assert result.returncode == 0, result.stderr
    return read_result(out)


@pytest.mark.parametrize("ranks, mode", [(1, "sync"), (2, "sync"), (4, "sync"), (8, "sync"), (4, "async"),
                                         (8, "async")])
def test_measured_peak_memory_matches_the_plan(deep_scan: Path, tmp_path: Path, ranks: int, mode: str) -> None:
    result = measure(deep_scan, tmp_path / "out.h5", ranks, mode)
    measured, predicted = result["ranks/peak_memory_bytes"], result["ranks/predicted_memory_bytes"]
    assert len(measured) == ranks and np.all(measured > 0)
    ratio = measured / predicted
    assert np.all(np.abs(ratio - 1) <= PLAN_TOLERANCE), (ranks, mode, ratio)


def test_worst_rank_memory_shrinks_with_the_rank_count(deep_scan: Path, tmp_path: Path) -> None:
    """Measured, not planned: the worst rank's memory at 8 ranks against one rank's.

    At the default batch this analog is too small to shrink its workspace (below 32 MiB a batch keeps
    up to 32 positions, :data:`ptylive.daemon.engine.tile.WORKSPACE_FLOOR_BYTES`), so the batch is fixed
    at 2 positions here and the test looks at what must scale: tile, gradient, illumination, exchange.
    The halo bounds the gain: the largest extended tile at 8 ranks is 118 × 154 px of the 253 × 244 px
    object (0.29 of it, at best 3.4×). The plan predicts 57.4 → 20.4 MiB (2.8×); the bound is that less
    the plan's 15 % tolerance. The engine before this test planned 61.1 → 48.8 MiB (1.25×): whole-depth
    exchange buffers, and a tile-sized scratch in the amplitude constraint.
    """
    one = measure(deep_scan, tmp_path / "one.h5", 1, "sync", "--batch-size", "2")["ranks/peak_memory_bytes"].max()
    eight = measure(deep_scan, tmp_path / "eight.h5", 8, "sync", "--batch-size", "2")["ranks/peak_memory_bytes"].max()
    assert one / eight > 2.8 * (1 - PLAN_TOLERANCE), (one, eight)


@pytest.mark.parametrize("ranks, mode", [(1, "sync"), (4, "sync"), (4, "async")])
def test_recomputed_waves_cut_the_measured_peak_as_planned_and_change_no_voxel(
        deep_scan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranks: int, mode: str) -> None:
    """``--recompute-waves`` on the 40-slice analog: a batch holds 12 of its 40 waves (segments of 7). The plan
    predicts what that saves within 15 % of what the ranks measure. In sync mode the reconstruction is the stored
    waves' to the last bit (the same FFT plans in both runs: FFTW_MEASURE may time its candidates differently);
    async runs differ from run to run anyway (neighbours' updates land when they arrive)."""
    monkeypatch.setenv(PLANNER_ENV, "FFTW_ESTIMATE")
    stored = measure(deep_scan, tmp_path / "stored.h5", ranks, mode)
    recomputed = measure(deep_scan, tmp_path / "recomputed.h5", ranks, mode, "--recompute-waves")
    if mode == "sync":
        assert np.array_equal(stored["object"], recomputed["object"])
        assert np.array_equal(stored["probe"], recomputed["probe"])
    measured, predicted = recomputed["ranks/peak_memory_bytes"], recomputed["ranks/predicted_memory_bytes"]
    assert np.all(np.abs(measured / predicted - 1) <= PLAN_TOLERANCE), measured / predicted
    planned = stored["ranks/predicted_memory_bytes"] - predicted
    saved = stored["ranks/peak_memory_bytes"] - measured
    assert np.all(planned > 0.1 * stored["ranks/predicted_memory_bytes"]), planned  # the waves are a real share
    assert np.all(np.abs(saved / planned - 1) <= PLAN_TOLERANCE), (saved, planned)
