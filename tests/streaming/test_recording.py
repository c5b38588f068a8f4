"""Recordings in the ZeroMQ dump format: byte layout, recorded message boundaries, boundaries re-derived from
each protocol when the sidecar is missing, the ingest's background recorder."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming import dectris_v2 as v2
from ptylive.streaming.protocol import SeriesStart, encode_frame, encode_series_end, encode_series_start
from ptylive.streaming.recording import (
    Recorder,
    RecordingError,
    RecordingWriter,
    detect_format,
    group_messages,
    read_counts,
    read_parts,
    sidecar,
)

START = SeriesStart("s", (2, 2), (1.0, 1.0), (4, 4), "uint16", 300e3, 20.0, 0.0, 1.0)
PIXELS = np.arange(16, dtype=np.uint16).reshape(4, 4)


def ptylive_messages() -> list[list[bytes]]:
    frames = [[bytes(p) for p in encode_frame("s", k, PIXELS + k)] for k in range(4)]
    return [encode_series_start(START), *frames, encode_series_end("s", 4)]


def dectris_v1_messages() -> list[list[bytes]]:
    return [v1.header_message(5, "all"), *(v1.image_message(5, k, PIXELS + k) for k in range(3)),
            v1.image_message(5, 3, PIXELS) + [b"appendix"], v1.end_message(5)]


def dectris_v2_messages() -> list[list[bytes]]:
    return [[v2.start_message(5, ["t1"], (4, 4), 2)], [v2.image_message(5, 0, {"t1": PIXELS})], [v2.end_message(5)]]


def write(path: Path, messages: list[list[bytes]]) -> None:
    with RecordingWriter(path) as writer:
        for message in messages:
            writer.write(message)


def test_the_file_is_the_plain_dump_format(tmp_path: Path) -> None:
    path = tmp_path / "r.zmq"
    write(path, [[b"abc", b""], [b"\x00" * 300]])
    assert path.read_bytes() == (struct.pack("<q", 3) + b"abc" + struct.pack("<q", 0)
                                 + struct.pack("<q", 300) + b"\x00" * 300)
    assert sidecar(path).read_bytes() == struct.pack("<II", 2, 1)
    assert list(read_parts(path)) == [b"abc", b"", b"\x00" * 300] and read_counts(path) == [2, 1]


@pytest.mark.parametrize("make", [ptylive_messages, dectris_v1_messages, dectris_v2_messages])
def test_boundaries_come_back_with_or_without_the_sidecar(tmp_path: Path, make: object) -> None:
    messages = make()  # type: ignore[operator]
    path = tmp_path / "r.zmq"
    write(path, messages)
    format = detect_format(next(read_parts(path)))
    assert format == make.__name__.removesuffix("_messages")  # type: ignore[attr-defined]
    assert list(group_messages(read_parts(path), format, read_counts(path))) == messages
    sidecar(path).unlink()
    assert read_counts(path) is None
    assert list(group_messages(read_parts(path), format)) == messages


def test_a_truncated_recording_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "r.zmq"
    write(path, [[b"x" * 100]])
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RecordingError, match="offset 0"):
        list(read_parts(path))
    path.write_bytes(struct.pack("<q", 1) + b"x" + b"\x01\x02")
    with pytest.raises(RecordingError, match="stray"):
        list(read_parts(path))
    sidecar(path).write_bytes(b"\x01\x02\x03")
    with pytest.raises(RecordingError, match="uint32"):
        read_counts(path)


def test_the_recorder_writes_from_its_own_thread_and_waits_when_full(tmp_path: Path) -> None:
    path = tmp_path / "r.zmq"
    recorder = Recorder(path, max_queued_bytes=1000)
    messages = [[bytes([k]) * 400, b"h"] for k in range(50)]
    for message in messages:
        recorder.write(message)
    recorder.close()
    assert list(group_messages(read_parts(path), "ptylive", read_counts(path))) == messages
    snapshot = recorder.snapshot()
    assert snapshot["messages"] == 50 and snapshot["queued_bytes"] == 0 and snapshot["error"] is None
    assert Recorder.open("") is None


@pytest.mark.chaos
def test_a_failing_disk_stops_the_recording_not_the_caller(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "r.zmq")
    recorder.writer._data.close()  # the next write fails as a full disk would
    recorder.write([b"lost"])
    recorder.close()
    recorder.write([b"after"])
    assert recorder.snapshot()["error"] is not None and recorder.dropped == 1


@pytest.mark.chaos
def test_a_restart_keeps_the_last_runs_recording(tmp_path: Path) -> None:
    """The daemon's recorder opens ``record_to`` at every start: a crashed run's recording (the frames of the
    series it interrupted) is renamed aside with its sidecar, never overwritten; twice in the same second too."""
    path = tmp_path / "r.zmq"
    runs = [[[b"first run", b"h"]], [[b"second run", b"h"], [b"x", b"y"]], [[b"third", b"h"]]]
    for messages in runs:
        recorder = Recorder.open(path)
        assert recorder is not None
        for message in messages:
            recorder.write(message)
        recorder.close()
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("r.zmq.") and not p.name.endswith(".parts"))
    assert len(kept) == 2
    found = [list(group_messages(read_parts(p), "ptylive", read_counts(p))) for p in kept]
    assert sorted(map(str, found)) == sorted(map(str, runs[:2]))  # both earlier runs, boundaries and all
    assert all(sidecar(p).exists() for p in kept)
    assert list(group_messages(read_parts(path), "ptylive", read_counts(path))) == runs[2]
    empty = tmp_path / "empty.zmq"
    empty.touch()
    Recorder.open(empty).close()  # an empty file holds nothing to keep: reused, not renamed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("empty.zmq.") and p != sidecar(empty)]
