"""Recordings of ZeroMQ traffic in the widely used dump format: ``[int64 little-endian length][part]`` repeated.

The format (that of LiberTEM-live's DECTRIS simulator and its ``zmqdump`` files) has no marker between
messages: its replayer sends every part as a message of its own, and readers re-derive the boundaries from
the protocol. ptylive keeps the file byte-for-byte in that format, so recordings go both ways, and writes the
boundaries beside it: ``<recording>.parts`` holds one little-endian uint32 per message, its number of parts.
Reading uses the sidecar when it is there (boundaries exactly as received) and otherwise re-derives them
(:func:`group_messages`): ptylive stream v1 by its headers (a ``frame`` has 2 parts), DECTRIS v1 by its start
parts (``dheader``, ``dimage``, ``dseries_end`` open a message), DECTRIS v2 one part per message.

:class:`Recorder` is the ingest's side: parts are queued (as the received ``zmq.Frame`` objects, no copy) and
written by a thread of its own, so the ingest never waits for the disk unless the queue holds more than
``max_queued_bytes``; a write error stops the recording (logged, kept in :meth:`Recorder.snapshot`), never the
ingest.
"""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

logger = logging.getLogger(__name__)

LENGTH = struct.Struct("<q")
COUNT = struct.Struct("<I")
SIDECAR_SUFFIX = ".parts"
CBOR_SELF_DESCRIBED = b"\xd9\xd9\xf7"
DECTRIS_V1_STARTS = (b"dheader-1.0", b"dimage-1.0", b"dseries_end-1.0")


class RecordingError(ValueError):
    """A file that is not a readable recording; the message says where it breaks."""


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def kept_name(path: Path, when: float) -> Path:
    """``<name>.<UTC time>`` beside ``path``, with a counter where that name is taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    candidate, n = path.with_name(f"{path.name}.{stamp}"), 1
    while candidate.exists() or sidecar(candidate).exists():
        candidate, n = path.with_name(f"{path.name}.{stamp}-{n}"), n + 1
    return candidate


def keep_previous(path: Path) -> Path | None:
    """Rename a non-empty recording at ``path`` (and its sidecar) out of the way; returns its new name, or None."""
    try:
        if path.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    target = kept_name(path, path.stat().st_mtime)
    path.rename(target)
    if sidecar(path).exists():
        sidecar(path).rename(sidecar(target))
    return target


class RecordingWriter:
    """Writes messages to ``path`` (and their part counts to the sidecar); a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data: BinaryIO = self.path.open("wb")
        self._counts: BinaryIO = sidecar(self.path).open("wb")
        self.messages = self.parts = self.bytes = 0

    def write(self, parts: Iterable[Any]) -> None:
        count = 0
        for part in parts:
            view = memoryview(part).cast("B")
            self._data.write(LENGTH.pack(view.nbytes))
            self._data.write(view)
            count += 1
            self.bytes += LENGTH.size + view.nbytes
        self._counts.write(COUNT.pack(count))
        self.messages += 1
        self.parts += count

    def flush(self) -> None:
        """Hand what is buffered to the OS (a process killed after this loses none of it; a power cut may)."""
        self._data.flush()
        self._counts.flush()

    def close(self) -> None:
        self._data.close()
        self._counts.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_parts(path: str | Path) -> Iterator[bytes]:
    """Every recorded part in order (read as it is needed, so a recording may be larger than memory)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as stream:
        offset = 0
        while offset < size:
            head = stream.read(LENGTH.size)
            if len(head) < LENGTH.size:
                raise RecordingError(f"{path}: {len(head)} stray bytes at offset {offset}")
            (length,) = LENGTH.unpack(head)
            if length < 0 or offset + LENGTH.size + length > size:
                raise RecordingError(f"{path}: part of {length} bytes at offset {offset} runs past the end "
                                     f"({size} bytes)")
            yield stream.read(length)
            offset += LENGTH.size + length


def detect_format(first_part: Any) -> str:
    """``ptylive``, ``dectris_v1`` or ``dectris_v2`` from a recording's first part."""
    head = bytes(memoryview(first_part)[:64])
    if head.startswith(CBOR_SELF_DESCRIBED) or (head and 0xa0 <= head[0] <= 0xbf):  # CBOR map
        return "dectris_v2"
    if head.lstrip().startswith(b"{"):
        return "dectris_v1"
    return "ptylive"


def _ptylive_parts(part: Any) -> int:
    try:
        header = msgpack.unpackb(part, raw=False)
    except Exception:  # noqa: BLE001 - a recorded malformed message: one part
        return 1
    return 2 if isinstance(header, dict) and header.get("htype") == "frame" else 1


def _dectris_v1_start(part: Any) -> bool:
    view = memoryview(part)
    if view.nbytes > 65536 or view.nbytes < 2 or view[0] != ord("{"):
        return False
    try:
        header = json.loads(view.tobytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and header.get("htype", "").encode() in DECTRIS_V1_STARTS


def group_messages(parts: Iterable[Any], format: str, counts: Iterable[int] | None = None) -> Iterator[list[Any]]:
    """Recorded ``parts`` as messages: by ``counts`` (the sidecar) if given, else by the rules of ``format``."""
    parts = iter(parts)
    if counts is not None:
        for count in counts:
            yield [next(parts) for _ in range(count)]
        return
    if format == "dectris_v2":
        yield from ([part] for part in parts)
        return
    if format == "ptylive":
        for part in parts:
            yield [part, next(parts, b"")] if _ptylive_parts(part) == 2 else [part]
        return
    message: list[Any] = []
    for part in parts:
        if message and _dectris_v1_start(part):
            yield message
            message = []
        message.append(part)
    if message:
        yield message


def read_counts(path: str | Path) -> list[int] | None:
    """The sidecar's part counts, or None when the recording has none."""
    side = sidecar(path)
    if not side.is_file():
        return None
    data = side.read_bytes()
    if len(data) % COUNT.size:
        raise RecordingError(f"{side}: {len(data)} bytes is not a whole number of uint32 counts")
    return [count for (count,) in COUNT.iter_unpack(data)]


class Recorder:
    """The ingest's recorder: :meth:`write` queues a message, a thread writes it (see the module docstring)."""

    def __init__(self, path: str | Path, max_queued_bytes: int = 256 * 2**20) -> None:
        self.writer = RecordingWriter(path)
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes, self.blocked_s, self.dropped = 0, 0.0, 0
        self.error: BaseException | None = None
        self.previous: Path | None = None  # the last run's recording, kept by open() under a new name
        self._room = threading.Condition()
        self._queue: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ptylive-recorder", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | Path | None) -> Recorder | None:
        """A recorder for ``path``; None for an empty path (no recording).

        A recording already at ``path`` (the last run's, perhaps of a series a crash interrupted) is kept:
        it and its sidecar are renamed to :func:`kept_name` first, never overwritten; :attr:`previous` names it.
        """
        if not path:
            return None
        kept = keep_previous(Path(path))
        if kept is not None:
            logger.warning("recording %s existed: kept as %s", path, kept)
        recorder = cls(path)
        recorder.previous = kept
        return recorder

    def write(self, parts: list[Any]) -> None:
        """Queue one message; waits while more than ``max_queued_bytes`` are queued. After an error: dropped."""
        if self.error is not None:
            self.dropped += 1
            return
        size = sum(memoryview(part).nbytes for part in parts)
        with self._room:
            if self.queued_bytes + size > self.max_queued_bytes:
                began = time.monotonic()
                self._room.wait_for(lambda: self.queued_bytes + size <= self.max_queued_bytes
                                    or self.queued_bytes == 0 or self.error is not None)
                self.blocked_s += time.monotonic() - began
            self.queued_bytes += size
        self._queue.put(parts)

    def _run(self) -> None:
        while (parts := self._queue.get()) is not None:
            size = sum(memoryview(part).nbytes for part in parts)
            try:
                if self.error is None:
                    self.writer.write(parts)
                    if self._queue.empty():  # a burst written: a SIGKILL now loses nothing of it
                        self.writer.flush()
            except (OSError, ValueError) as exc:  # a full disk, a closed file: stop recording, keep ingesting
                self.error = exc
                logger.error("recording to %s stopped: %s", self.writer.path, exc)
            with self._room:
                self.queued_bytes -= size
                self._room.notify_all()

    def close(self) -> None:
        """Write what is queued, then close the files."""
        self._queue.put(None)
        self._thread.join()
        self.writer.close()

    def snapshot(self) -> dict[str, Any]:
        w = self.writer
        return {"path": str(w.path), "messages": w.messages, "parts": w.parts, "bytes": w.bytes,
                "queued_bytes": self.queued_bytes, "blocked_s": self.blocked_s, "dropped": self.dropped,
                "error": None if self.error is None else str(self.error)}
