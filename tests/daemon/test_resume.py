"""Resuming a recovered series from the recording, piece by piece (no MPI, no daemon): which series rank 0
resumes and why not, what it re-streams, the snapshots, and the state a worker takes over.

The whole path through two ``ptylive serve`` runs is ``test_serve_recovery.py``'s second test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.checkpoints import (
    CheckpointFolder,
    checkpoint_path,
    recovered_job,
    resume_path,
    write_checkpoint,
)
from ptylive.daemon.service.config import DaemonConfig, IngestConfig, ReconstructionConfig, ServiceConfig
from ptylive.daemon.service.final_writer import FinalJob, FinalOutcome
from ptylive.daemon.service.messages import FinalMessage
from ptylive.daemon.service.resume import plan_resumes, resume_feed
from ptylive.daemon.worker.resume import load_resume
from ptylive.streaming import protocol
from ptylive.streaming.protocol import SeriesEnd, SeriesStart, encode_frame, encode_series_end, encode_series_start
from ptylive.streaming.recording import RecordingWriter
from tests.daemon.checkpoint_data import START, checkpoint

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md


def config(tmp_path: Path, **service: object) -> DaemonConfig:
    """Two workers, two slices (the checkpoints' own), recording on."""
    return DaemonConfig(ingest=IngestConfig(record_to=str(tmp_path / "record.zmqdump")),
                        reconstruction=ReconstructionConfig(n_slices=2, slice_thickness_A=1.5),
                        service=ServiceConfig(**service))  # type: ignore[arg-type]


def job(geometry: SeriesGeometry) -> FinalJob:
    return recovered_job([checkpoint(geometry, 0, 1 + 0j, iterations=4), checkpoint(geometry, 1, 2 + 0j)])


def record(path: Path, start: SeriesStart, frames: range, end: bool = True, other: bool = True) -> Path:
    """A ptylive stream v1 recording of ``start`` with ``frames`` (and another series' traffic in between)."""
    pixels = np.ones((16, 16), np.uint16)
    with RecordingWriter(path) as writer:
        writer.write(encode_series_start(start))
        for index in frames:
            writer.write(encode_frame(start.series_id, index, pixels))
            if other and index == 3:
                writer.write(encode_frame("someone-else", 0, pixels))
        if end:
            writer.write(encode_series_end(start.series_id, len(frames)))
    return path


def test_a_complete_recording_of_the_same_start_is_resumed_from_the_fewest_iterations(
        tmp_path: Path, geometry: SeriesGeometry) -> None:
    recording = record(tmp_path / "kept", START, range(16))
    [plan] = plan_resumes([job(geometry)], recording, config(tmp_path)).values()
    assert (plan.series_id, plan.starts_seen, plan.ended, plan.frames) == (START.series_id, 1, True, 16)
    assert plan.from_iteration == 3  # worker 1's checkpoint had 3, worker 0's 4
    assert plan.result_attrs() == {"resumed_from_iteration": 3, "resumed_from_recording": "kept"}
    messages = [protocol.decode(parts) for parts in resume_feed([plan])]
    assert messages[0] == START and isinstance(messages[-1], SeriesEnd) and messages[-1].n_frames == 16
    assert [m.frame_index for m in messages[1:-1]] == list(range(16))  # the other series' frame is not sent


def test_a_recording_without_the_end_is_resumed_and_ended_by_the_feed(tmp_path: Path,
                                                                       geometry: SeriesGeometry) -> None:
    recording = record(tmp_path / "kept", START, range(16), end=False)
    [plan] = plan_resumes([job(geometry)], recording, config(tmp_path)).values()
    assert not plan.ended
    *_, last = resume_feed([plan])
    end = protocol.decode(last)
    assert isinstance(end, SeriesEnd) and end.n_frames == 16


@pytest.mark.parametrize("case", ["cut_short", "missing_frame", "other_start", "no_recording", "off", "dectris",
                                  "other_split", "other_slices"])
def test_a_series_that_cannot_be_resumed_is_written_from_its_checkpoints_only(
        tmp_path: Path, geometry: SeriesGeometry, case: str, caplog: pytest.LogCaptureFixture) -> None:
    recording: Path | None = record(tmp_path / "kept", START, range(16))
    settings = config(tmp_path)
    if case == "cut_short":  # a crash mid-write: the file ends inside frame 9's payload
        assert recording is not None
        data = recording.read_bytes()
        whole = record(tmp_path / "upto9", START, range(9), end=False, other=False).stat().st_size
        recording.write_bytes(data[:whole + 300])
    elif case == "missing_frame":  # frame 5 was received by a worker but never reached the disk
        recording = record(tmp_path / "kept", START, [i for i in range(16) if i != 5])  # type: ignore[arg-type]
    elif case == "other_start":
        recording = record(tmp_path / "kept", dataclasses.replace(START, defocus_A=10.0), range(16))
    elif case == "no_recording":
        recording = None
    elif case == "off":
        settings = config(tmp_path, resume_from_recording=False)
    elif case == "dectris":
        settings = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, format="dectris_v2"))
    elif case == "other_split":
        settings = dataclasses.replace(settings, workers=dataclasses.replace(settings.workers, ranks=3))
    elif case == "other_slices":
        settings = dataclasses.replace(settings, reconstruction=ReconstructionConfig(n_slices=3, slice_thickness_A=1.5))
    caplog.set_level("INFO")
    assert plan_resumes([job(geometry)], recording, settings) == {}
    assert "not refined further" in caplog.text


def test_snapshots_survive_the_checkpoint_versions_file_and_go_with_the_resumed_one(
        tmp_path: Path, geometry: SeriesGeometry) -> None:
    folder = CheckpointFolder(tmp_path / "state")
    for worker in (0, 1):
        write_checkpoint(checkpoint_path(folder.folder, START.series_id, worker), checkpoint(geometry, worker, 1j))
    folder.snapshot(START.series_id, [0, 1])
    snapshots = [resume_path(folder.folder, START.series_id, w) for w in (0, 1)]
    assert all(p.exists() for p in snapshots)
    version = dataclasses.replace(job(geometry), keep_checkpoints=True)
    folder.forget(FinalOutcome(version, tmp_path / "crashed_1.h5"))
    assert len(list(folder.folder.iterdir())) == 4  # the checkpoint version kept everything
    write_checkpoint(checkpoint_path(folder.folder, START.series_id, 0), checkpoint(geometry, 0, 5j))  # resumed run
    assert read_checkpoint_value(snapshots[0]) == 1j  # a hard link: the atomic replace leaves the snapshot alone
    folder.forget(FinalOutcome(job(geometry), tmp_path / "crashed_1-1.h5"))
    assert list(folder.folder.iterdir()) == []


def test_a_stale_snapshot_is_removed_at_the_next_recovery(tmp_path: Path, geometry: SeriesGeometry) -> None:
    folder = CheckpointFolder(tmp_path / "state")
    write_checkpoint(checkpoint_path(folder.folder, START.series_id, 0), checkpoint(geometry, 0, 1j))
    folder.snapshot(START.series_id, [0])
    [recovered] = folder.recover(tmp_path / "results")
    assert recovered.start == START
    assert not resume_path(folder.folder, START.series_id, 0).exists()


def read_checkpoint_value(path: Path) -> complex:
    from ptylive.daemon.service.checkpoints import read_checkpoint

    return complex(read_checkpoint(path).final.arrays[0].flat[0])


def test_a_worker_takes_its_extended_tile_from_every_snapshot_that_overlaps_it(
        tmp_path: Path, geometry: SeriesGeometry) -> None:
    for worker, value in ((0, 1 + 1j), (1, 2 + 2j)):
        write_checkpoint(resume_path(tmp_path, START.series_id, worker),
                         checkpoint(geometry, worker, value, iterations=3 + worker))
    domain = geometry.domains[0]
    index = np.asarray(domain.positions, dtype=np.int64)
    point = load_resume(tmp_path, START, geometry, 0, index)
    assert point is not None
    assert point.volume.shape == (2, *domain.extended.shape)
    for other, value in ((0, 1 + 1j), (1, 2 + 2j)):  # each voxel from the worker whose own tile holds it
        overlap = geometry.domains[other].tile.intersect(domain.extended)
        assert overlap is not None
        rows, cols = overlap.relative_to(domain.extended)
        assert np.all(point.volume[:, rows, cols] == value)
    assert point.iterations == 3 and len(point.loss_history) == 3 and point.frames_history == [len(index)] * 3
    np.testing.assert_array_equal(point.positions_px, geometry.positions_px[index] + 0.25)  # the corrected ones
    np.testing.assert_array_equal(point.probe, np.full((16, 16), 1 + 1j, np.complex64))  # worker 0's


def test_no_snapshot_or_another_starts_snapshot_means_a_fresh_start(tmp_path: Path,
                                                                    geometry: SeriesGeometry) -> None:
    index = np.asarray(geometry.domains[1].positions, dtype=np.int64)
    assert load_resume(tmp_path, START, geometry, 1, index) is None
    assert load_resume(None, START, geometry, 1, index) is None
    other = dataclasses.replace(START, defocus_A=5.0)
    write_checkpoint(resume_path(tmp_path, START.series_id, 0), checkpoint(geometry, 0, 1j))
    assert load_resume(tmp_path, other, geometry, 1, index) is None


def test_a_damaged_snapshot_is_skipped_not_raised_into_the_worker(tmp_path: Path, geometry: SeriesGeometry,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot that reads but does not fit (positions not matching its received frames, a tile of another
    shape) is skipped with an error: the worker starts from vacuum, and a restart does not die on it again."""
    broken = checkpoint(geometry, 0, 1j)
    arrays = (broken.final.arrays[0], broken.final.arrays[1], broken.final.arrays[2][:-1], broken.final.arrays[3])
    write_checkpoint(resume_path(tmp_path, START.series_id, 0),
                     dataclasses.replace(broken, final=FinalMessage(broken.final.header, arrays)))
    other = checkpoint(geometry, 1, 2j)
    arrays = (other.final.arrays[0][:, :-1], *other.final.arrays[1:])
    write_checkpoint(resume_path(tmp_path, START.series_id, 1),
                     dataclasses.replace(other, final=FinalMessage(other.final.header, arrays)))
    index = np.asarray(geometry.domains[0].positions, dtype=np.int64)
    assert load_resume(tmp_path, START, geometry, 0, index) is None
    assert "frames received but" in caplog.text and "its tile is" in caplog.text
