"""Rank 0's side of the checkpoints under a faulty state folder: counted, logged, never a dead collector.

Removing a series' checkpoints runs on the collector thread once its file is written; an ``OSError`` there
(read-only or vanished state folder) used to end that thread, and with it every later preview and file.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.checkpoints import (
    CheckpointFolder,
    checkpoint_path,
    read_checkpoint,
    recovered_job,
    write_checkpoint,
)
from ptylive.daemon.service.final_writer import FinalOutcome
from ptylive.daemon.service.metrics import DaemonMetrics
from tests.daemon.checkpoint_data import START, checkpoint
from tests.daemon.test_metrics import snapshot

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md


def _written(folder: Path, geometry: SeriesGeometry) -> FinalOutcome:
    path = checkpoint_path(folder, START.series_id, 0)
    write_checkpoint(path, checkpoint(geometry, 0, 1j))
    return FinalOutcome(recovered_job([read_checkpoint(path)]), folder.parent / "written.h5")


def test_a_checkpoint_that_cannot_be_removed_is_counted_logged_and_kept(
        tmp_path: Path, geometry: SeriesGeometry, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    folder = CheckpointFolder(tmp_path / "state", on_failure=metrics.count_checkpoint_failure)
    outcome = _written(folder.folder, geometry)
    blocker = checkpoint_path(folder.folder, START.series_id, 1)
    blocker.mkdir()  # unlink fails on it, even for root (a chmod'ed folder does not stop root)
    (blocker / "inside").write_bytes(b"x")
    with caplog.at_level(logging.ERROR, logger="ptylive.daemon.service.checkpoints"):
        folder.forget(outcome)  # must not raise: it runs on the collector thread
    assert folder.failures == {"remove": 1}
    assert registry.get_sample_value("ptylive_checkpoint_failures_total", {"kind": "remove"}) == 1
    assert str(blocker) in caplog.text
    assert not checkpoint_path(folder.folder, START.series_id, 0).exists()  # the rest was removed


def test_a_read_only_state_folder_is_counted_not_raised(tmp_path: Path, geometry: SeriesGeometry,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = CheckpointFolder(tmp_path / "state")
    outcome = _written(folder.folder, geometry)

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    folder.forget(outcome)
    assert folder.failures == {"remove": 1}
    monkeypatch.undo()
    assert checkpoint_path(folder.folder, START.series_id, 0).exists()  # kept: the next start finds it


def test_a_vanished_state_folder_is_counted_not_raised(tmp_path: Path, geometry: SeriesGeometry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = CheckpointFolder(tmp_path / "state")
    outcome = _written(folder.folder, geometry)

    def gone(self: Path, pattern: str) -> list[Path]:
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "glob", gone)
    folder.forget(outcome)
    assert folder.failures == {"remove": 1}
