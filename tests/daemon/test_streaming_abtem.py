"""Streaming on independent data: ``ptylive serve`` fed abTEM's thick SrTiO3 by ``ptylive replay`` (issue 11).

The operator's path end to end, all real processes on loopback (ports 0): ``ptylive serve`` with 2 workers
and a ``[reconstruction]`` fitted to the file (its 32 slices of 1.9525 Å, as offline's default), the scan
file sent by ``ptylive replay`` as fast as the daemon takes it, the final file awaited on the preview PUB.
The same file is reconstructed offline like for like: 2 ranks, ``async`` (serve's workers are), the
iterations serve runs after the last frame (``final_iterations``), and serve's defaults for what offline
defaults otherwise (probe fixed, positions fixed, 4 mini-batches per iteration). Both are scored against
abTEM's truth (``tests/abtem_cases.py``).

Thresholds: issue 11's, streaming within 0.02 of offline in projected-phase correlation, and both at
least 0.85 (the thick case's floor, ``test_abtem_cases.py``). Measured over three runs on two cores
shared with other reconstructions: streamed 0.966-0.984, offline 0.961-0.978, apart by 0.002-0.006
(both runs are async, so neither is bit for bit repeatable); serve ran 30-31 iterations, every one
over all 400 frames (the replay takes under a second). Offline takes 35-40 s, the whole test 115-135 s.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.service.config import ReconstructionConfig, loopback_config
from ptylive.daemon.service.process import ServeProcess
from tests.abtem_cases import AbtemCase, case_path, load_case, score_result
from tests.conftest import run_cli
from tests.daemon.serve_harness import PreviewListener, read_final, serving

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

CASE = "srtio3_thick_d1e5"
WORKERS = 2
FINAL_ITERATIONS = 30
TOLERANCE = 0.02  # issue 11: streaming ends within 0.02 of offline at the same iterations
FLOOR = 0.85      # issue 11's thick-case threshold


@pytest.fixture
def thick_daemon(tmp_path: Path) -> Iterator[tuple[ServeProcess, PreviewListener]]:
    """``ptylive serve``, 2 workers, the file's slices, serve's defaults for everything else."""
    case = load_case(CASE)
    reconstruction = ReconstructionConfig(n_slices=case.n_slices, slice_thickness_A=case.slice_thickness_A,
                                          final_iterations=FINAL_ITERATIONS)
    (tmp_path / "results").mkdir()
    with serving(loopback_config(tmp_path / "results", WORKERS, reconstruction), tmp_path / "serve") as running:
        yield running


def replay(process: ServeProcess, series_id: str) -> None:
    """``ptylive replay FILE --max-rate``, as an operator runs it; exit 3 would mean the daemon refused it."""
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "replay", str(case_path(CASE)),
               "--endpoint", process.endpoints["ingest"], "--status-url", process.endpoints["http"],
               "--max-rate", "--series-id", series_id, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def reconstruct_offline(out: Path) -> None:
    """``ptylive reconstruct`` with serve's engine settings (``ReconstructionConfig`` defaults)."""
    defaults = ReconstructionConfig()
    assert not defaults.refine_probe and not defaults.correct_positions and defaults.step_size is None
    result = run_cli("reconstruct", str(case_path(CASE)), "--ranks", str(WORKERS), "--mode", "async",
                     "--iterations", str(FINAL_ITERATIONS), "--no-refine-probe", "--no-correct-positions",
                     "--updates-per-iteration", str(defaults.updates_per_iteration),
                     "--batch-size", str(defaults.batch_size), "--max-staleness", str(defaults.max_staleness),
                     "--loss", defaults.loss, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr


def scorable(final_path: str | Path, case: AbtemCase, out: Path) -> Path:
    """The final file on the case's grid, for ``score_result``: ``object`` (S, H, W), ``positions_px``, ``loss``.

    The stream carries positions in Å, no origin, so serve puts the smallest at ``N//2 + 0.5`` px
    (docs/daemon.md, "Positions and grid"); the file's smallest is at (32.37, 32.61) px. The two grids
    differ by that constant sub-pixel translation (checked here), which the scorer's registration
    absorbs; the object is cut (or padded with vacuum) to the truth's box, which holds the scanned
    region with the registration's margin, and the positions are put back in the file's frame.
    """
    with h5py.File(final_path, "r") as f:
        volume, loss = f["object"][...], f["loss"][...]
        offset = f["positions_px"][...] - case.positions_px
        slice_thickness_A = float(f.attrs["slice_thickness_A"])
    assert np.ptp(offset, axis=0).max() < 1e-6 and np.abs(offset).max() < 1.0, offset  # one translation
    h, w = case.object_shape
    on_grid = np.ones((volume.shape[0], max(h, volume.shape[1]), max(w, volume.shape[2])), volume.dtype)
    on_grid[:, :volume.shape[1], :volume.shape[2]] = volume
    with h5py.File(out, "w") as f:
        f["object"], f["loss"] = on_grid[:, :h, :w], loss
        f["positions_px"] = case.positions_px + (offset - offset.mean(axis=0))
        f.attrs["slice_thickness_A"] = slice_thickness_A
    return out


def test_streamed_thick_srtio3_ends_within_0p02_of_offline(
        thick_daemon: tuple[ServeProcess, PreviewListener], tmp_path: Path) -> None:
    process, listener = thick_daemon
    case = load_case(CASE)
    replay(process, "thick-streamed")
    final = listener.wait_final("thick-streamed", timeout_s=600.0)
    assert final["status"] == "complete", final
    streamed = read_final(final["path"])
    assert streamed["received"].all() and streamed["frames_used"][-1] == len(streamed["received"])
    assert streamed["attrs"]["iterations"] >= FINAL_ITERATIONS
    assert streamed["attrs"]["n_slices"] == case.n_slices
    assert streamed["attrs"]["slice_thickness_A"] == pytest.approx(case.slice_thickness_A)

    offline = tmp_path / "offline.h5"
    reconstruct_offline(offline)

    stream_score = score_result(scorable(final["path"], case, tmp_path / "streamed.h5"), case)
    offline_score = score_result(offline, case)
    assert stream_score["n_slices"] == offline_score["n_slices"] == case.n_slices
    assert stream_score["finite"] and offline_score["finite"]
    corr_stream, corr_offline = stream_score["correlation"], offline_score["correlation"]
    print(f"\n{CASE}: streamed {corr_stream:.4f}, offline {corr_offline:.4f} "
          f"({streamed['attrs']['iterations']} streamed iterations, {FINAL_ITERATIONS} after the last frame)")
    assert np.isfinite([corr_stream, corr_offline]).all()
    assert corr_stream >= FLOOR and corr_offline >= FLOOR, (stream_score, offline_score)
    assert abs(corr_stream - corr_offline) <= TOLERANCE, (stream_score, offline_score)
