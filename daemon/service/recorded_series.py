"""One series' messages in a recording of ptylive stream v1 (:mod:`ptylive.streaming.recording`), read back.

A resumed series (:mod:`ptylive.daemon.service.resume`) is re-streamed from the recording the last run kept.
Two passes over that file, both reading message headers only and seeking over the pixels of every other
series' frames, so a recording of many series larger than memory costs little:

- :func:`scan_recording` says, per series asked for, what the recording holds of it: its last start, the
  frame indices recorded after that start, and whether its end was recorded;
- :func:`series_messages` yields those very messages (start, frames, end) in recorded order.

Message boundaries are derived from the protocol (a ``frame`` header is followed by its payload part), not read
from the ``.parts`` sidecar: after a SIGKILL the data file and the sidecar may have reached the disk up to
different messages. A recording cut short (a last part that runs past the end of the file) is read up to the cut;
:attr:`RecordedSeries.error` says where it broke.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
import numpy.typing as npt

from ptylive.streaming import protocol
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.recording import LENGTH, RecordingError

logger = logging.getLogger(__name__)


@dataclass
class RecordedSeries:
    """What a recording holds of one series, from its last recorded start on.

    Attributes
    ----------
    start : SeriesStart or None
        The last recorded start of the series (None: none was recorded, or it does not decode).
    starts_seen : int
        Starts of this id recorded (the ``starts_seen``-th is :attr:`start`: :func:`series_messages` counts them).
    frame_set : set of int
        Distinct frame indices recorded after that start and before its end (headers only: payloads are not
        checked here, the ingest checks them again when they are re-streamed); :attr:`frames` sorted.
    ended : bool
        Whether a ``series_end`` of the series was recorded after that start.
    error : str or None
        Where the recording broke, when it is cut short or malformed (what was read before counts).
    """

    start: SeriesStart | None = None
    starts_seen: int = 0
    frame_set: set[int] = field(default_factory=set)
    ended: bool = False
    error: str | None = None

    @property
    def frames(self) -> npt.NDArray[np.int64]:
        return np.array(sorted(self.frame_set), dtype=np.int64)


def _header(part: bytes) -> dict[str, Any] | None:
    """A part's msgpack header, or None when it is not one (malformed traffic is recorded too)."""
    try:
        header = msgpack.unpackb(part, raw=False)
    except Exception:  # noqa: BLE001 - any undecodable part is simply not a header
        return None
    return header if isinstance(header, dict) and isinstance(header.get("series_id"), str) else None


class _Parts:
    """The parts of a dump-format file, each read or skipped on demand; RecordingError where it breaks."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self.stream, self.path = stream, path
        self.size = os.fstat(stream.fileno()).st_size
        self.offset = 0

    def next_length(self) -> int | None:
        """The next part's length (its bytes are next in the stream), or None at the end of the file."""
        if self.offset == self.size:
            return None
        head = self.stream.read(LENGTH.size)
        if len(head) < LENGTH.size:
            raise RecordingError(f"{self.path}: {len(head)} stray bytes at offset {self.offset} (cut short)")
        (length,) = LENGTH.unpack(head)
        if length < 0 or self.offset + LENGTH.size + length > self.size:
            raise RecordingError(f"{self.path}: part of {length} bytes at offset {self.offset} runs past the end "
                                 f"({self.size} bytes; cut short)")
        self.offset += LENGTH.size + length
        return int(length)

    def read(self, length: int) -> bytes:
        return self.stream.read(length)

    def skip(self, length: int) -> None:
        self.stream.seek(length, os.SEEK_CUR)


def _messages(path: Path, wanted: Collection[str], payloads: bool) -> Iterator[tuple[dict[str, Any], list[bytes]]]:
    """``(header, parts)`` of every recorded message of the ``wanted`` series; a frame's payload is read only
    with ``payloads`` (otherwise its part is ``b""``). Raises RecordingError where the file breaks."""
    with path.open("rb") as stream:
        parts = _Parts(stream, path)
        while (length := parts.next_length()) is not None:
            head = parts.read(length)
            header = _header(head)
            if header is None:
                continue
            is_frame = header.get("htype") == "frame"
            keep = header["series_id"] in wanted
            if not is_frame:
                if keep:
                    yield header, [head]
                continue
            payload_length = parts.next_length()
            if payload_length is None:
                raise RecordingError(f"{path}: a frame header at the end, without its payload (cut short)")
            if keep and payloads:
                yield header, [head, parts.read(payload_length)]
                continue
            parts.skip(payload_length)
            if keep:
                yield header, [head, b""]


def scan_recording(path: Path, series_ids: Collection[str]) -> dict[str, RecordedSeries]:
    """What the recording at ``path`` holds of each of ``series_ids`` (every id has an entry).

    A start that does not decode counts as none. Reading stops where the file breaks (each entry's
    :attr:`~RecordedSeries.error` then says where); an unreadable file is an error of every entry.
    """
    found = {series_id: RecordedSeries() for series_id in series_ids}
    try:
        for header, parts in _messages(path, found.keys(), payloads=False):
            entry, htype = found[header["series_id"]], header.get("htype")
            if htype == "series_start":
                try:
                    start = protocol.decode(parts)
                except protocol.ProtocolError as exc:
                    logger.warning("recording %s: a start of series %r does not decode (%s)", path,
                                   header["series_id"], exc)
                    start = None
                found[header["series_id"]] = RecordedSeries(start if isinstance(start, SeriesStart) else None,
                                                            entry.starts_seen + 1)
            elif htype == "frame" and isinstance(header.get("frame_index"), int) and entry.start is not None \
                    and not entry.ended:
                entry.frame_set.add(int(header["frame_index"]))
            elif htype == "series_end" and entry.start is not None:
                entry.ended = True
    except (OSError, RecordingError) as exc:
        for entry in found.values():
            entry.error = str(exc)
    return found


def series_messages(path: Path, series_id: str, starts_seen: int) -> Iterator[tuple[dict[str, Any], list[bytes]]]:
    """``(header, parts)`` of the series' messages from its ``starts_seen``-th recorded start up to its first end
    after it (both included), in recorded order; RecordingError or OSError where the file breaks."""
    seen = 0
    for header, parts in _messages(path, (series_id,), payloads=True):
        htype = header.get("htype")
        if htype == "series_start":
            seen += 1
        if seen < starts_seen:
            continue
        if seen > starts_seen:
            return
        yield header, parts
        if htype == "series_end":
            return
