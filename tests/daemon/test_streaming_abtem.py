"""Streaming on independent data: ``ptylive serve`` fed abTEM's thick SrTiO3 by ``ptylive replay`` (issue 11).

The operator's path end to end, all real processes on loopback (ports 0): ``ptylive serve`` with 2 workers
and a ``[reconstruction]`` fitted to the file (its 32 slices of 1.9525 Å, as offline's default), the scan
file sent by ``ptylive replay`` as fast as the daemon takes it, the final file awaited on the preview PUB.
The same file is reconstructed offline like for like: 2 ranks, ``async`` (serve's workers are), the
iterations serve runs after the last frame (``final_iterations``), and serve's defaults for what offline
defaults otherwise (probe fixed; positions corrected, as offline). Both are scored against abTEM's truth
(``tests/abtem_cases.py``). The perturbed scan (nominal positions in the stream, the data taken at rotated,
scaled and jittered ones) checks position correction while streaming: issue 11's 3× cut of the rms error.

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
PERTURBED = "srtio3_perturbed"
GRAPHENE = "graphene_lowdose_d1e4"
WORKERS = 2
FINAL_ITERATIONS = 30
TOLERANCE = 0.02  # issue 11: streaming ends within 0.02 of offline at the same iterations
FLOOR = 0.85      # issue 11's thick-case threshold


def daemon_for(case_name: str, tmp_path: Path, loss: str = "auto") -> Iterator[tuple[ServeProcess, PreviewListener]]:
    """``ptylive serve``, 2 workers, the file's slices, serve's defaults for everything else (but ``loss``)."""
    case = load_case(case_name)
    reconstruction = ReconstructionConfig(n_slices=case.n_slices, slice_thickness_A=case.slice_thickness_A,
                                          final_iterations=FINAL_ITERATIONS, loss=loss)  # type: ignore[arg-type]
    (tmp_path / "results").mkdir()
    with serving(loopback_config(tmp_path / "results", WORKERS, reconstruction), tmp_path / "serve") as running:
        yield running


@pytest.fixture
def thick_daemon(tmp_path: Path) -> Iterator[tuple[ServeProcess, PreviewListener]]:
    yield from daemon_for(CASE, tmp_path)


@pytest.fixture
def perturbed_daemon(tmp_path: Path) -> Iterator[tuple[ServeProcess, PreviewListener]]:
    yield from daemon_for(PERTURBED, tmp_path)


def replay(process: ServeProcess, series_id: str, case_name: str = CASE) -> None:
    """``ptylive replay FILE --max-rate``, as an operator runs it; exit 3 would mean the daemon refused it."""
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "replay", str(case_path(case_name)),
               "--endpoint", process.endpoints["ingest"], "--status-url", process.endpoints["http"],
               "--max-rate", "--series-id", series_id, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def reconstruct_offline(out: Path) -> None:
    """``ptylive reconstruct`` with serve's engine settings (``ReconstructionConfig`` defaults)."""
    defaults = ReconstructionConfig()
    assert not defaults.refine_probe and defaults.correct_positions and defaults.step_size is None
    result = run_cli("reconstruct", str(case_path(CASE)), "--ranks", str(WORKERS), "--mode", "async",
                     "--iterations", str(FINAL_ITERATIONS), "--no-refine-probe", "--correct-positions",
                     "--updates-per-iteration", str(defaults.updates_per_iteration),
                     "--batch-size", str(defaults.batch_size), "--max-staleness", str(defaults.max_staleness),
                     "--loss", defaults.loss, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr


def scorable(final_path: str | Path, case: AbtemCase, out: Path) -> Path:
    """The final file on the case's grid, for ``score_result``: ``object`` (S, H, W), ``positions_px``, ``loss``.

    The stream carries positions in Å, no origin, so serve puts the smallest at ``N//2 + 0.5`` px
    (docs/daemon.md, "Positions and grid"); the file's smallest is at (32.37, 32.61) px. The two grids
    differ by that constant sub-pixel translation (checked on the nominal positions), which the scorer's
    registration absorbs; the object is cut (or padded with vacuum) to the truth's box, which holds the
    scanned region with the registration's margin, and the corrected positions are put back in the
    file's frame.
    """
    with h5py.File(final_path, "r") as f:
        volume, loss = f["object"][...], f["loss"][...]
        corrected = f["positions_px"][...]
        offset = f["positions_nominal_px"][...] - case.positions_px
        slice_thickness_A = float(f.attrs["slice_thickness_A"])
    assert np.ptp(offset, axis=0).max() < 1e-6, offset  # one translation
    whole = np.rint(offset.mean(axis=0)).astype(int)  # moved back here; the sub-pixel rest is registered
    volume = volume[:, max(whole[0], 0):, max(whole[1], 0):]
    pad = np.maximum(-whole, 0)
    h, w = case.object_shape
    on_grid = np.ones((volume.shape[0], max(h, volume.shape[1] + pad[0]), max(w, volume.shape[2] + pad[1])),
                      volume.dtype)
    on_grid[:, pad[0]:pad[0] + volume.shape[1], pad[1]:pad[1] + volume.shape[2]] = volume
    with h5py.File(out, "w") as f:
        f["object"], f["loss"] = on_grid[:, :h, :w], loss
        f["positions_px"] = corrected - offset.mean(axis=0)
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
    assert streamed["attrs"]["loss_function"] == "amplitude"  # loss = "auto" on a strong scatterer

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


def test_streamed_perturbed_scan_positions_are_corrected(
        perturbed_daemon: tuple[ServeProcess, PreviewListener], tmp_path: Path) -> None:
    """Serve corrects positions while it streams: the rms error falls at least 3× (issue 11's bound, as offline)
    and the image clears offline's floor for this case (0.9, ``test_abtem_cases.py``)."""
    process, listener = perturbed_daemon
    case = load_case(PERTURBED)
    replay(process, "perturbed-streamed", PERTURBED)
    final = listener.wait_final("perturbed-streamed", timeout_s=600.0)
    assert final["status"] == "complete", final
    score = score_result(scorable(final["path"], case, tmp_path / "streamed.h5"), case)
    print(f"\n{PERTURBED} streamed: correlation {score['correlation']:.4f}, rms position error "
          f"{score['position_rms_before_A']:.3f} -> {score['position_rms_after_A']:.3f} A")
    assert score["finite"]
    assert score["position_rms_before_A"] >= 0.3  # the errors are real
    assert score["position_rms_after_A"] <= score["position_rms_before_A"] / 3, score
    assert score["correlation"] >= 0.9, score


def test_streamed_low_dose_graphene_chooses_the_poisson_loss_and_it_fits_better(tmp_path: Path) -> None:
    """``loss = "auto"`` while streaming: the workers choose from the frames once a tenth of them is in
    (daemon.worker.refine) and, on this weak scatterer, take Poisson as offline does from the whole file
    (``test_loss_choice.py``). The same stream with the amplitude loss gives a worse image: measured 0.79
    against 0.62 (both async: a gap far beyond their run-to-run spread of about 0.01)."""
    case = load_case(GRAPHENE)
    scores = {}
    for loss in ("auto", "amplitude"):
        folder = tmp_path / loss
        folder.mkdir()
        for process, listener in daemon_for(GRAPHENE, folder, loss):
            replay(process, f"graphene-{loss}", GRAPHENE)
            final = listener.wait_final(f"graphene-{loss}", timeout_s=600.0)
            assert final["status"] == "complete", final
            streamed = read_final(final["path"])
            assert streamed["attrs"]["loss_function"] == {"auto": "poisson", "amplitude": "amplitude"}[loss]
            scores[loss] = score_result(scorable(final["path"], case, folder / "streamed.h5"), case)
    print(f"\n{GRAPHENE} streamed: auto (poisson) {scores['auto']['correlation']:.4f}, amplitude "
          f"{scores['amplitude']['correlation']:.4f}")
    assert scores["auto"]["finite"] and scores["amplitude"]["finite"]
    assert scores["auto"]["correlation"] > scores["amplitude"]["correlation"], scores
