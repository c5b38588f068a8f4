"""A fake detector: streams a scan as ptylive stream v1 on a ZeroMQ PUSH socket, paced or not, with the
faults an ingest must survive (gaps, duplicates, local reordering, malformed messages) on request."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zmq

from ptylive.streaming import protocol
from ptylive.streaming.scanfile import read_frames, read_metadata, read_positions

if TYPE_CHECKING:
    from ptylive.gpu.simulate import Simulation, SimulationSpec

logger = logging.getLogger(__name__)

CORRUPT_REASONS: dict[str, str] = {  # malformed message kinds, in sending order -> the reject reason each causes
    "truncated_multipart": "parts", "wrong_payload_size": "payload_size", "garbage_header": "not_msgpack",
    "unknown_htype": "unknown_htype", "nan_position": "bad_field"}
CHUNK_BYTES = 32 * 1024 * 1024  # frames are read from the source in chunks of about this many float64 bytes
POLL_MS = 50  # how often a blocked send looks at the stop flag
SEND_HWM_MESSAGES, LINGER_MS = 1000, 2000  # send high-water mark; how long close() lets queued messages go out


class StreamAborted(RuntimeError):
    """:meth:`FakeDetector.close` stopped the stream before ``series_end`` was sent."""


@dataclass(frozen=True)
class FakeDetectorOptions:
    """What to send and which faults to inject.

    ``rate_hz``: valid frame messages per second on a monotonic schedule (None: as fast as possible).
    ``drop_frames`` are never sent (gaps); ``duplicate_frames`` are sent twice in a row (unless dropped).
    ``reorder_window`` N > 1 shuffles frames within consecutive blocks of N indices (RNG ``seed``).
    ``corrupt_every`` k > 0 sends a malformed message after every k-th valid frame (:data:`CORRUPT_REASONS`).
    ``send_position`` puts ``position_A`` in frame headers; frames are sent as ``dtype`` (integers are
    rounded and clipped to the dtype's range).
    """

    rate_hz: float | None = None
    drop_frames: tuple[int, ...] = ()
    duplicate_frames: tuple[int, ...] = ()
    reorder_window: int = 0
    corrupt_every: int = 0
    send_position: bool = False
    series_id: str = "fake"
    seed: int = 0
    dtype: str = "uint16"

    def __post_init__(self) -> None:
        if self.rate_hz is not None and not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f"rate_hz must be a finite positive number or None, got {self.rate_hz!r}")
        if self.dtype not in protocol.DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {protocol.DTYPES}")
        if min(self.reorder_window, self.corrupt_every) < 0:
            raise ValueError(f"reorder_window ({self.reorder_window}) and corrupt_every ({self.corrupt_every}) "
                             "must be >= 0")


@dataclass(frozen=True)
class StreamStats:
    """What one run sent: valid frame messages (duplicates included), distinct indices, bytes (all parts of all
    messages), malformed messages by kind, and seconds from the first frame's slot to ``series_end``."""

    frames_sent: int
    distinct_frames: int
    bytes_sent: int
    corrupt_sent: dict[str, int]
    seconds: float
    achieved_rate_hz: float


@dataclass(frozen=True, eq=False)
class ScanSource:
    """A scan to stream: a template ``series_start`` (explicit ``positions_A``) and a lazy frame reader.

    ``read(indices)`` takes ascending unique (k,) int64 indices and returns (k, rows, cols) real frames.
    The detector fills in the template's series id and dtype."""

    start: protocol.SeriesStart
    read: Callable[[np.ndarray], np.ndarray]

    @property
    def n_frames(self) -> int:
        return self.start.n_positions

    @classmethod
    def from_file(cls, path: str | Path) -> ScanSource:
        """A scan HDF5 file: raster ``(1, n)``, ``positions_A = positions_px * pixel_size_A``, frames on demand."""
        meta = read_metadata(path)
        start = _template(vars(meta), read_positions(path), (meta.detector_px, meta.detector_px))
        return cls(start, functools.partial(read_frames, path, dtype=np.float64))

    @classmethod
    def from_simulation(cls, spec: SimulationSpec, result: Simulation | None = None) -> ScanSource:
        """Simulate ``spec`` in memory (:func:`ptylive.gpu.simulate.simulate`), or stream its ``result`` if given;
        raster ``spec.scan_shape``."""
        if result is None:
            from ptylive.gpu.simulate import simulate
            result = simulate(spec)
        intensities = result.intensities
        start = _template(result.metadata, result.positions_px, intensities.shape[1:], spec.scan_shape,
                          spec.scan_step_px * spec.pixel_size_A)
        return cls(start, lambda indices: intensities[indices])


def _template(metadata: Mapping[str, Any], positions_px: np.ndarray, detector_shape: tuple[int, ...],
              scan_shape: tuple[int, int] | None = None, step_A: float | None = None) -> protocol.SeriesStart:
    """A ``series_start`` to fill in; the nominal step is the median distance between consecutive positions."""
    pixel_A = float(metadata["pixel_size_A"])
    positions_A = np.asarray(positions_px, dtype=np.float64) * pixel_A
    steps_A = np.linalg.norm(np.diff(positions_A, axis=0), axis=1)
    if step_A is None:
        step_A = float(np.median(steps_A[steps_A > 0])) if (steps_A > 0).any() else pixel_A
    optics: dict[str, Any] = {name: float(metadata[name]) for name in
              ("energy_eV", "convergence_semiangle_mrad", "defocus_A", "detector_pixel_mrad")}
    return protocol.SeriesStart(series_id="", scan_shape=scan_shape or (1, len(positions_A)),
                                scan_step_A=(step_A, step_A), detector_shape=(detector_shape[0], detector_shape[1]),
                                dtype="", positions_A=protocol.position_pairs(positions_A), **optics)


def send_order(n_frames: int, options: FakeDetectorOptions) -> np.ndarray:
    """Frame indices (int64) in sending order: shuffled in blocks, gaps removed, duplicates doubled."""
    outside = [i for i in (*options.drop_frames, *options.duplicate_frames) if not 0 <= i < n_frames]
    if outside:
        raise ValueError(f"dropped or duplicated frames {outside} lie outside the scan's {n_frames} frames")
    order = np.arange(n_frames, dtype=np.int64)
    if options.reorder_window > 1:
        rng = np.random.default_rng(options.seed)
        for first in range(0, n_frames, options.reorder_window):
            order[first:first + options.reorder_window] = rng.permutation(order[first:first + options.reorder_window])
    order = order[~np.isin(order, np.array(options.drop_frames, dtype=np.int64))]
    return np.repeat(order, np.where(np.isin(order, np.array(options.duplicate_frames, dtype=np.int64)), 2, 1))


def corrupt_message(kind: str, series_id: str, frame_index: int, pixels: np.ndarray,
                    rng: np.random.Generator) -> list[Any]:
    """A malformed message of ``kind`` (a key of :data:`CORRUPT_REASONS`) made from a valid frame."""
    header = protocol.encode_frame(series_id, frame_index, pixels)[0]
    messages: dict[str, Callable[[], list[Any]]] = {
        "truncated_multipart": lambda: [header],
        "wrong_payload_size": lambda: [header, pixels.tobytes() + b"\0"],
        "garbage_header": lambda: [b"\xc1" + rng.bytes(15)],  # 0xc1 is never used by msgpack
        "unknown_htype": lambda: [msgpack.packb({"htype": "frame_v0", "series_id": series_id})],
        "nan_position": lambda: protocol.encode_frame(series_id, frame_index, pixels, position_A=(math.nan, 0.0)),
    }
    if kind not in messages:
        raise ValueError(f"unknown corrupt kind {kind!r}; expected one of {tuple(CORRUPT_REASONS)}")
    return messages[kind]()


class FakeDetector:
    """Streams one series from ``source`` on a PUSH socket bound (or connected) at ``endpoint``.

    Call :meth:`run` here, or :meth:`start` then :meth:`join`; :meth:`close` (or leaving a ``with`` block)
    aborts a stream in progress. Without ``context`` the detector owns (and terminates) one."""

    def __init__(self, source: ScanSource, options: FakeDetectorOptions, endpoint: str = "tcp://127.0.0.1:0",
                 bind: bool = True, context: zmq.Context | None = None) -> None:
        self.source, self.options = source, options
        self._order = send_order(source.n_frames, options)
        self._stop, self._closed, self._own_context = threading.Event(), False, context is None
        self._thread: threading.Thread | None = None
        self._outcome: StreamStats | Exception | None = None
        self._context: zmq.Context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.sndhwm, self._socket.linger = SEND_HWM_MESSAGES, LINGER_MS
        try:
            (self._socket.bind if bind else self._socket.connect)(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self._endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def endpoint(self) -> str:
        """The actual endpoint, e.g. ``tcp://127.0.0.1:PORT`` after binding port 0."""
        return self._endpoint

    def run(self) -> StreamStats:
        """Send ``series_start``, the frames and ``series_end``; blocks while no peer takes messages."""
        opts, send_position = self.options, self.options.send_position
        period_s = 1.0 / opts.rate_hz if opts.rate_hz else 0.0
        start = dataclasses.replace(self.source.start, series_id=opts.series_id, dtype=opts.dtype)
        start_parts = protocol.encode_series_start(start)
        if len(start_parts[0]) > protocol.MAX_START_BYTES:
            raise ValueError(f"series_start of {self.source.n_frames} positions exceeds the protocol's "
                             f"{protocol.MAX_START_BYTES}-byte limit")
        bytes_sent = self._send(start_parts)
        rng, corrupt, distinct = np.random.default_rng(opts.seed), Counter[str](), set[int]()
        begin = time.monotonic()
        for sent, (index, pixels) in enumerate(self._frames()):
            position = self.source.start.positions_A[index] if send_position else None  # type: ignore[index]
            bytes_sent += self._send(protocol.encode_frame(opts.series_id, index, pixels, position),
                                     due=begin + sent * period_s)
            distinct.add(index)
            if opts.corrupt_every and (sent + 1) % opts.corrupt_every == 0:
                kind = tuple(CORRUPT_REASONS)[corrupt.total() % len(CORRUPT_REASONS)]
                bytes_sent += self._send(corrupt_message(kind, opts.series_id, index, pixels, rng))
                corrupt[kind] += 1
        bytes_sent += self._send(protocol.encode_series_end(opts.series_id, len(distinct)),
                                 due=begin + len(self._order) * period_s)
        seconds = time.monotonic() - begin
        logger.info("fake detector sent %d frames (%d distinct, %d corrupt) to %s in %.3f s", len(self._order),
                    len(distinct), corrupt.total(), self._endpoint, seconds)
        return StreamStats(len(self._order), len(distinct), bytes_sent, dict(corrupt), seconds,
                           len(self._order) / seconds if seconds > 0 else 0.0)

    def start(self) -> None:
        """Run :meth:`run` in a background thread; :meth:`join` returns its stats or raises its error."""
        if self._thread is not None:
            raise RuntimeError("the fake detector was already started")
        self._thread = threading.Thread(target=self._run_in_thread, name="fake-detector", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> StreamStats:
        """Wait for the background run; re-raise its error; TimeoutError while it still runs."""
        if self._thread is None:
            raise RuntimeError("join() before start()")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the fake detector is still streaming after {timeout} s")
        if isinstance(self._outcome, Exception):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def close(self) -> None:
        """Abort a run in progress (it stops within :data:`POLL_MS` or after the chunk it is reading), then close
        the socket; queued messages get :data:`LINGER_MS` to go out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._closed:
            self._closed = True
            self._socket.close()
            if self._own_context:
                self._context.term()

    def __enter__(self) -> FakeDetector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run_in_thread(self) -> None:
        try:
            self._outcome = self.run()
        except Exception as exc:  # stored and re-raised by join(), never swallowed
            self._outcome = exc

    def _frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, pixels) in sending order; the source is read in chunks of unique ascending indices."""
        shape = self.source.start.detector_shape
        chunk = max(1, CHUNK_BYTES // (shape[0] * shape[1] * 8))
        for first in range(0, len(self._order), chunk):
            indices = self._order[first:first + chunk]
            unique = np.unique(indices)
            frames = np.asarray(self.source.read(unique))
            if frames.shape != (len(unique), *shape):
                raise ValueError(f"source gave frames of shape {frames.shape}, expected {(len(unique), *shape)}")
            if (dtype := np.dtype(self.options.dtype)).kind in "iu":  # round and clip to the integer range
                frames = np.clip(np.rint(frames), np.iinfo(dtype).min, np.iinfo(dtype).max)
            frames = np.ascontiguousarray(frames, dtype=dtype)
            for index, row in zip(indices.tolist(), np.searchsorted(unique, indices).tolist(), strict=True):
                yield index, frames[row]

    def _send(self, parts: list[Any], due: float = 0.0) -> int:
        """Send one multipart message without copying, not before monotonic time ``due``; returns its bytes."""
        if due > time.monotonic():
            self._stop.wait(due - time.monotonic())
        while not self._stop.is_set():
            try:
                self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # queue full or no peer yet: wait for room, checking the stop flag
                self._socket.poll(POLL_MS, zmq.POLLOUT)
                continue
            return sum(memoryview(part).nbytes for part in parts)
        raise StreamAborted("the fake detector was closed while streaming")


def stream_scan(path: str | Path, endpoint: str, options: FakeDetectorOptions, bind: bool = True) -> StreamStats:
    """Stream the scan file ``path`` to ``endpoint`` once, in this thread, then close."""
    with FakeDetector(ScanSource.from_file(path), options, endpoint, bind=bind) as detector:
        return detector.run()
