"""Worker checkpoints and the files rank 0 recovers from them (no MPI, no sockets): atomic writes, stitching with
a missing worker, what recovery leaves behind, and the death watch's pid check."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service import checkpoints
from ptylive.daemon.service.checkpoints import (
    CheckpointFolder,
    checkpoint_path,
    read_checkpoint,
    recovered_job,
    write_checkpoint,
)
from ptylive.daemon.service.final_writer import FinalOutcome
from ptylive.daemon.service.results import write_final
from ptylive.daemon.service.roster import DeathWatch, Roster, process_alive
from tests.daemon.checkpoint_data import START, checkpoint

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md

def test_a_checkpoint_reads_back_as_written(tmp_path: Path, geometry: SeriesGeometry) -> None:
    written = checkpoint(geometry, 1, 2 + 1j)
    path = checkpoint_path(tmp_path, START.series_id, 1)
    write_checkpoint(path, written)
    back = read_checkpoint(path)
    assert back.start == written.start and back.start.overrides == START.overrides
    assert (back.n_workers, back.upsampling, back.worker) == (2, 1, 1)
    for ours, theirs in zip(written.final.arrays, back.final.arrays, strict=True):
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype
    assert back.final.header["scale"] == 2.5 and back.final.header["stats"]["bytes_sent"] == 7
    assert back.final.header["received"] == written.final.header["received"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, geometry: SeriesGeometry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint_path(tmp_path, START.series_id, 0)
    write_checkpoint(path, checkpoint(geometry, 0, 1 + 0j, iterations=3))

    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(path, checkpoint(geometry, 0, 5 + 0j, iterations=9))
    assert read_checkpoint(path).final.header["iterations"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoint_names_are_bounded_and_distinct(tmp_path: Path) -> None:
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    names = {checkpoint_path(tmp_path, s, 0).name for s in (long_a, long_b, "../../etc", "a b")}
    assert len(names) == 4 and all(len(n) < 80 and "/" not in n for n in names)


def test_recovery_stitches_the_present_tiles_and_fills_a_missing_worker_with_vacuum(
        tmp_path: Path, geometry: SeriesGeometry) -> None:
    job = recovered_job([checkpoint(geometry, 1, 2 + 1j)])  # worker 0 died before its first checkpoint
    assert job.extra_attrs["missing_workers"].tolist() == [0]
    path = write_final(tmp_path, job.start, job.geometry, job.finals, job.extra_attrs)
    with h5py.File(path) as f:
        volume, probe, attrs = f["object"][...], f["probe"][...], dict(f.attrs)
        positions, received = f["positions_px"][...], f["received"][...]
    assert volume.shape == (2, *geometry.object_shape)
    for worker, expected in ((0, 1.0), (1, 2 + 1j)):
        t = geometry.domains[worker].tile
        np.testing.assert_array_equal(volume[:, t.row0:t.row1, t.col0:t.col1], expected)
    assert probe.shape == (16, 16)  # a present worker's probe, not the missing worker 0's (none)
    np.testing.assert_array_equal(probe, 2 + 1j)
    assert attrs["status"] == "recovered" and attrs["series_id"] == START.series_id
    assert attrs["missing_workers"].tolist() == [0] and attrs["recovered_workers"].tolist() == [1]
    assert attrs["checkpoint_iterations"].tolist() == [0, 3] and attrs["detector_scale"] == 2.5
    ones = [int(i) for i in geometry.domains[1].positions]
    assert received[ones].all() and received.sum() == len(ones)
    np.testing.assert_allclose(positions[ones], geometry.positions_px[ones] + 0.25)


def test_the_folder_recovers_each_interrupted_series_once_then_forgets_it(tmp_path: Path,
                                                                          geometry: SeriesGeometry) -> None:
    state, results = tmp_path / "state", tmp_path / "results"
    results.mkdir()
    folder = CheckpointFolder(state)
    for worker, value in ((0, 1 + 1j), (1, 3 + 0j)):
        write_checkpoint(checkpoint_path(state, START.series_id, worker), checkpoint(geometry, worker, value))
    (state / "left-over.w0.ckpt.npz.tmp").write_bytes(b"half a write")
    (state / "broken.w0.ckpt.npz").write_bytes(b"not a checkpoint")
    [job] = folder.recover(results)
    assert job.extra_attrs["missing_workers"].tolist() == [] and {m.header["status"] for m in job.finals} == {
        "recovered"}
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith("crashed")) == [
        "broken.w0.ckpt.npz.unreadable"]
    path = write_final(results, job.start, job.geometry, job.finals, job.extra_attrs)
    folder.forget(FinalOutcome(job, path))
    assert sorted(p.name for p in state.iterdir()) == ["broken.w0.ckpt.npz.unreadable"]
    assert folder.recover(results) == []


def test_a_file_that_failed_everywhere_keeps_its_checkpoints(tmp_path: Path, geometry: SeriesGeometry) -> None:
    folder = CheckpointFolder(tmp_path)
    write_checkpoint(checkpoint_path(tmp_path, START.series_id, 0), checkpoint(geometry, 0, 1j))
    [job] = folder.recover(tmp_path)
    folder.forget(FinalOutcome(job, None, "disk full"))
    assert len(folder.recover(tmp_path)) == 1


def test_a_final_written_after_the_last_checkpoint_is_not_written_again(tmp_path: Path,
                                                                        geometry: SeriesGeometry) -> None:
    """A crash between writing the final file and removing the checkpoints."""
    state, results = tmp_path / "state", tmp_path / "results"
    results.mkdir()
    folder = CheckpointFolder(state)
    write_checkpoint(checkpoint_path(state, START.series_id, 0), checkpoint(geometry, 0, 1j))
    job = recovered_job([read_checkpoint(checkpoint_path(state, START.series_id, 0))])
    stale = write_final(results, job.start, job.geometry, job.finals, {})
    old = time.time() - 3600
    os.utime(stale, (old, old))  # a file of the same series from before: it does not count
    assert len(folder.recover(results)) == 1
    write_final(results, job.start, job.geometry, job.finals, {})  # now newer than the checkpoint
    assert folder.recover(results) == [] and not list(state.iterdir())


def test_process_alive_sees_a_zombie_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(child.pid):  # a zombie until waited for
            assert time.monotonic() < deadline, "a killed child still looks alive"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_the_death_watch_names_each_dead_worker_once(caplog: pytest.LogCaptureFixture) -> None:
    from ptylive.daemon.service.messages import ByeMessage, HelloMessage

    roster = Roster(n_workers=3)
    for worker, pid in ((0, 100), (1, 101), (2, 102)):
        roster.record(HelloMessage({"worker": worker, "pid": pid}))
    roster.record(ByeMessage({"worker": 2}))  # stopped cleanly: not a death
    alive = {100: True, 101: False, 102: False}
    watch = DeathWatch(roster, alive=lambda pid: alive[pid])
    assert watch.check() == [(1, 101)]
    assert "worker 1 (MPI rank 2, pid 101) died" in caplog.text
    assert watch.check() == []
    alive[100] = False
    assert watch.check() == [(0, 100)]
