"""A crash of the whole daemon mid-series: the next start writes the series from its workers' checkpoints.

The first ``ptylive serve`` receives every frame and runs its (many) final iterations, checkpointing every
0.3 s. Once both workers' checkpoints exist, every process of the daemon gets SIGKILL at once (ranks, then
launcher: what a power cut or an OOM kill of the unit leaves): no file is written. A second ``ptylive serve``
on the same state folder writes the series as ``recovered`` before it takes any new one, announces it in
``/status``, and removes the checkpoints. The same holds when only one worker is killed: mpiexec ends the rest of
the job at once, and the second start writes the dead worker's tile from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.service.checkpoints import checkpoint_path, read_checkpoint
from ptylive.daemon.service.config import ServiceConfig
from ptylive.daemon.service.process import ServeProcess
from ptylive.daemon.service.roster import process_alive
from ptylive.streaming.fake_detector import ScanSource
from tests.daemon.serve_harness import daemon_config, get_json, read_final, serving, stream, wait_for
from tests.daemon.test_launcher import descendants

pytestmark = [pytest.mark.mpi, pytest.mark.chaos]


def kill_everything(process: ServeProcess) -> None:
    """SIGKILL to rank 0, every worker and the launcher, without a chance to write anything."""
    assert process.process is not None
    status = get_json(process.endpoints["http"] + "status")
    ranks = [int(process.endpoints["pid"]), *map(int, status["worker_pids"].values())]
    assert len(ranks) == 3, status["worker_pids"]
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    process.process.kill()
    process.process.wait(30)
    wait_for(lambda: not any(map(process_alive, ranks)), 30, "every rank to be gone")


def kill_one_worker(process: ServeProcess, worker: int) -> tuple[int, int]:
    """SIGKILL to one worker rank alone; every process of the job (launcher, mpiexec, its proxy, the three ranks)
    must be gone within 10 s. The launcher's exit code and the killed pid; whatever happens, none of the job is
    left running."""
    assert process.process is not None
    launcher = process.process
    worker_pids = get_json(process.endpoints["http"] + "status")["worker_pids"]
    job = {launcher.pid, *descendants(launcher.pid)}
    assert len(worker_pids) == 2 and {int(process.endpoints["pid"]), *map(int, worker_pids.values())} <= job, (
        job, worker_pids)
    try:
        killed = int(worker_pids[str(worker)])
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not any(map(process_alive, job)), 10, "every process of the job to be gone")  # 0.2-0.6 s
        return launcher.wait(5), killed
    except BaseException:  # no orphan may keep running or hold the ports
        for pid in filter(process_alive, job | (descendants(launcher.pid) if launcher.poll() is None else set())):
            os.kill(pid, signal.SIGKILL)
        raise


def received_datagrams(receiver: socket.socket) -> list[str]:
    """Every datagram waiting on ``receiver``, in order."""
    receiver.setblocking(False)
    received = []
    while True:
        try:
            received.append(receiver.recv(65536).decode())
        except BlockingIOError:
            return received


def recovered_file(second: ServeProcess, series_id: str) -> dict[str, Any]:
    """The file the second start wrote for ``series_id``, once ``/status`` lists it: ``recovered``, in
    ``<series_id>.h5``, no worker missing."""
    http = second.endpoints["http"]
    [entry] = wait_for(lambda: [e for e in get_json(http + "status")["finished"] if e["series_id"] == series_id],
                       60, "the recovered series in /status")
    assert entry["status"] == "recovered" and entry["file"] == f"{series_id}.h5", entry
    written = read_final(entry["path"])
    assert written["attrs"]["status"] == "recovered" and written["attrs"]["series_id"] == series_id
    assert written["attrs"]["missing_workers"].tolist() == []
    return written


def test_a_series_cut_by_sigkill_is_written_as_recovered_at_the_next_start(tmp_path: Path, dosed_scan: Path) -> None:
    results, state = tmp_path / "results", tmp_path / "state"
    results.mkdir()
    config = daemon_config(results, final_iterations=100_000)  # still refining when it is killed
    config = dataclasses.replace(config, service=ServiceConfig(state_folder=str(state), checkpoint_interval_s=0.3))
    first = ServeProcess(config, tmp_path / "first")
    try:
        first.start()
        stream(first, ScanSource.from_file(dosed_scan), series_id="cut", dtype="uint16")
        wait_for(lambda: len(list(state.glob("*.ckpt.npz"))) == 2, 120, "both workers' checkpoints")
        kill_everything(first)
    finally:
        first.stop()
    assert not list(results.glob("*.h5")), "a killed daemon wrote a file"

    with serving(config, tmp_path / "second") as (second, _):
        written = recovered_file(second, "cut")
        assert min(written["attrs"]["checkpoint_iterations"]) >= 1
        assert np.isfinite(written["object"]).all() and np.abs(written["object"] - 1).max() > 1e-3  # not vacuum
        assert written["received"].all()
        wait_for(lambda: not list(state.glob("*.ckpt.npz*")), 10, "the checkpoints to be removed")


@pytest.mark.slow
def test_one_worker_killed_mid_series_ends_the_job_and_its_tile_is_recovered_at_the_next_start(
        tmp_path: Path, dosed_scan: Path) -> None:
    """SIGKILL of worker 1 alone: the launcher logs which rank died (MPI rank 2, its pid, SIGKILL) and tells
    systemd STOPPING=1; mpiexec ends rank 0, worker 0 and itself (no process of the job is left); the next start
    writes the series as ``recovered`` with both tiles, worker 1's from its last checkpoint."""
    results, state = tmp_path / "results", tmp_path / "state"
    results.mkdir()
    config = daemon_config(results, final_iterations=100_000)  # still refining when the worker is killed
    config = dataclasses.replace(config, service=ServiceConfig(state_folder=str(state), checkpoint_interval_s=0.3))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "n.sock"))
        first = ServeProcess(config, tmp_path / "first", env={"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        try:
            first.start()
            source = ScanSource.from_file(dosed_scan)
            stream(first, source, series_id="cut", dtype="uint16")
            wait_for(lambda: len(list(state.glob("*.ckpt.npz"))) == 2, 120, "both workers' checkpoints")
            code, killed = kill_one_worker(first, 1)
        finally:
            first.stop()
        states = received_datagrams(systemd)
    # The launcher fails, so systemd restarts the unit; first it names the dead rank, from the rank's guard.
    assert code != 0, first.log_tail()
    death = f"MPI rank 2 (pid {killed} on {socket.gethostname()}) was killed by SIGKILL"
    assert f"ERROR {death}; mpiexec ends the job" in first.log_tail(400), first.log_tail(400)
    assert f"STOPPING=1\nSTATUS={death}" in states, states
    assert not list(results.glob("*.h5")), "the job wrote a file after a worker died"
    last = [read_checkpoint(checkpoint_path(state, "cut", w)) for w in (0, 1)]  # what the second start finds

    with serving(config, tmp_path / "second") as (second, _):
        written = recovered_file(second, "cut")
        assert written["attrs"]["recovered_workers"].tolist() == [0, 1]
        assert min(written["attrs"]["checkpoint_iterations"]) >= 1
        assert written["attrs"]["checkpoint_iterations"].tolist() == [c.final.header["iterations"] for c in last]
        assert np.isfinite(written["object"]).all()
        for worker, checkpoint in enumerate(last):  # worker 1 is the one killed
            row0, row1, col0, col1 = checkpoint.final.header["tile"]
            tile = written["object"][:, row0:row1, col0:col1]
            assert np.array_equal(tile, checkpoint.final.arrays[0]), f"worker {worker}'s tile is not its checkpoint"
            assert np.abs(tile - 1).max() > 1e-3, f"worker {worker}'s tile is vacuum"
        assert written["received"].shape == (source.n_frames,) and written["received"].all()
        wait_for(lambda: not list(state.glob("*.ckpt.npz*")), 10, "the checkpoints to be removed")


def test_a_series_cut_by_sigkill_is_refined_on_from_the_recording(tmp_path: Path, dosed_scan: Path) -> None:
    """With ``record_to``, the second start writes the checkpoint version, then re-streams the recorded series,
    takes every tile over from the checkpoints and writes a second ``recovered`` file that went further."""
    results, state, recording = tmp_path / "results", tmp_path / "state", tmp_path / "record.zmqdump"
    results.mkdir()
    config = daemon_config(results, final_iterations=100_000)  # still refining when it is killed
    config = dataclasses.replace(config, ingest=dataclasses.replace(config.ingest, record_to=str(recording)),
                                 service=ServiceConfig(state_folder=str(state), checkpoint_interval_s=0.3,
                                                       resume_iterations=8))
    first = ServeProcess(config, tmp_path / "first")
    try:
        first.start()
        stream(first, ScanSource.from_file(dosed_scan), series_id="cut", dtype="uint16")
        wait_for(lambda: len(checkpoint_iterations(state)) == 2 and min(checkpoint_iterations(state)) >= 10, 120,
                 "both workers' checkpoints at 10 iterations or more")
        kill_everything(first)
    finally:
        first.stop()
    assert recording.stat().st_size > 0

    def finished_cut() -> list[dict[str, Any]] | None:
        entries = [e for e in get_json(http + "status")["finished"] if e["series_id"] == "cut"]
        return entries if len(entries) == 2 else None

    with serving(config, tmp_path / "second") as (second, _):
        http = second.endpoints["http"]
        entries = wait_for(finished_cut, 120, "the checkpoint version and the resumed file in /status")
        assert [e["file"] for e in entries] == ["cut.h5", "cut-1.h5"], entries
        assert all(e["status"] == "recovered" for e in entries), entries
        checkpointed, resumed = (read_final(e["path"]) for e in entries)
        taken_over = int(resumed["attrs"]["resumed_from_iteration"])
        assert taken_over == min(checkpointed["attrs"]["checkpoint_iterations"]) >= 10
        assert str(resumed["attrs"]["resumed_from_recording"]).startswith("record.zmqdump.")
        assert resumed["attrs"]["iterations"] >= taken_over + 8  # 8 more once every frame was back
        assert resumed["received"].all() and np.isfinite(resumed["object"]).all()
        wait_for(lambda: not list(state.glob("*.npz*")), 10, "the checkpoints and snapshots to be removed")

    def per_frame(final: dict[str, Any], iteration: int) -> float:
        return float(final["loss"][iteration] / max(final["frames_used"][iteration], 1))

    # It went on from the checkpoints, not from vacuum: its first iteration already fits the frames better than
    # the first run's second iteration did, and it ends below the checkpoint version.
    assert per_frame(resumed, taken_over) < per_frame(checkpointed, 1), (resumed["loss"], resumed["frames_used"])
    assert per_frame(resumed, -1) < per_frame(checkpointed, -1)


def checkpoint_iterations(state: Path) -> list[int]:
    """Iterations of every readable checkpoint in ``state`` (one being replaced is skipped)."""
    found = []
    for path in state.glob("*.ckpt.npz"):
        try:
            found.append(int(read_checkpoint(path).final.header["iterations"]))
        except ValueError:
            continue
    return found
