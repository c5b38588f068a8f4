"""Recovery at start looks for an already written final file in the fallback folder too.

A final file that the results disk refused went to ``[output] fallback_folder``; a crash before its checkpoints
were removed must not make the next start write the series a second time, as ``recovered``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.checkpoints import (
    CheckpointFolder,
    checkpoint_path,
    read_checkpoint,
    recovered_job,
    write_checkpoint,
)
from ptylive.daemon.service.results import write_final
from tests.daemon.checkpoint_data import START, checkpoint

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md


def test_a_final_in_the_fallback_folder_is_not_written_again_as_recovered(tmp_path: Path,
                                                                         geometry: SeriesGeometry) -> None:
    state, results, fallback = tmp_path / "state", tmp_path / "results", tmp_path / "fallback"
    results.mkdir()
    fallback.mkdir()
    folder = CheckpointFolder(state)
    write_checkpoint(checkpoint_path(state, START.series_id, 0), checkpoint(geometry, 0, 1j))
    job = recovered_job([read_checkpoint(checkpoint_path(state, START.series_id, 0))])
    time.sleep(0.01)  # the file's mtime after the checkpoint's
    write_final(fallback, job.start, job.geometry, job.finals, {})  # the results disk had failed
    assert folder.recover(results, fallback) == []
    assert not list(state.iterdir())  # the checkpoints are gone: the series is done
    assert list(results.iterdir()) == []


def test_without_a_final_anywhere_the_series_is_recovered(tmp_path: Path, geometry: SeriesGeometry) -> None:
    state, results, fallback = tmp_path / "state", tmp_path / "results", tmp_path / "fallback"
    results.mkdir()
    folder = CheckpointFolder(state)
    write_checkpoint(checkpoint_path(state, START.series_id, 0), checkpoint(geometry, 0, 1j))
    assert len(folder.recover(results, fallback)) == 1  # the fallback folder need not exist
