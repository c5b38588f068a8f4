"""``ptylive replay``: send a recorded or stored scan to a running daemon, paced or as fast as it takes it.

SOURCE is one of:

- a scan file (HDF5, ``docs/scanfile.md``): sent as ptylive stream v1 with its explicit positions;
- a 4-D array, ``.npy`` or an HDF5 dataset ``[scan rows, scan cols, det rows, det cols]`` (or 3-D with
  ``--scan-shape``): sent as ptylive stream v1 on a raster of ``--step-A`` with the optics given as options;
- a recording in the ZeroMQ dump format (:mod:`ptylive.streaming.recording`), replayed exactly as recorded:
  every part, in order, with the recorded message boundaries (or, with ``--single-parts``, every part as a
  message of its own, as the dump format's usual replayer does).

``--rate`` paces frame messages (images, for DECTRIS recordings); other messages go out at once. A PUSH socket
cannot hear a refusal, so with ``--status-url`` the replay asks the daemon's ``/status`` after sending whether
it refused any series it sent (exit status 3), or found that a DECTRIS series' image count and its scan
disagree (``count_mismatch``: exit status 4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import zmq

from ptylive.streaming import protocol
from ptylive.streaming.recording import detect_format, group_messages, read_counts, read_parts

logger = logging.getLogger(__name__)

EXIT_REFUSED = 3
EXIT_COUNT_MISMATCH = 4
LINGER_MS = 30_000
CONNECT_TIMEOUT_S = 10.0  # the first message waits this long for a connected peer; then "nothing listens"
PROGRESS_S = 0.2


@dataclass
class Source:
    """Messages to send, each ``(parts, is_frame)``; ``total`` frames (arrays) or bytes (recordings)."""

    messages: Iterator[tuple[list[Any], bool]]
    total: int
    unit: str
    series_ids: set[str] = field(default_factory=set)


def _start(series_id: str, scan_shape: tuple[int, int], step_A: float, detector: tuple[int, int], dtype: str,
           args: argparse.Namespace, positions_A: np.ndarray | None = None) -> protocol.SeriesStart:
    return protocol.SeriesStart(series_id=series_id, scan_shape=scan_shape, scan_step_A=(step_A, step_A),
                                detector_shape=detector, dtype=dtype, energy_eV=args.energy_eV,
                                convergence_semiangle_mrad=args.convergence_mrad, defocus_A=args.defocus_A,
                                detector_pixel_mrad=args.detector_pixel_mrad,
                                positions_A=None if positions_A is None else protocol.position_pairs(positions_A))


def _frames(start: protocol.SeriesStart, frames: Any, encoding: str) -> Iterator[tuple[list[Any], bool]]:
    """Start, every frame (read lazily, converted to the start's dtype), end."""
    yield protocol.encode_series_start(start), False
    dtype = np.dtype(start.dtype)
    for index in range(len(frames)):
        pixels = np.asarray(frames[index])
        if dtype.kind in "iu":
            pixels = np.clip(np.rint(pixels), np.iinfo(dtype).min, np.iinfo(dtype).max)
        yield protocol.encode_frame(start.series_id, index, pixels.astype(dtype), encoding=encoding), True
    yield protocol.encode_series_end(start.series_id, len(frames)), False


def scan_file_source(path: Path, args: argparse.Namespace) -> Source:
    """Our scan HDF5: explicit positions (``positions_px × pixel_size_A``), optics from the file."""
    from ptylive.streaming.fake_detector import ScanSource

    template = ScanSource.from_file(path).start  # validates the file
    start = dataclasses.replace(template, series_id=args.series_id or path.stem, dtype=args.dtype)
    frames = h5py.File(path, "r")["intensities"]  # read one frame at a time; closed with the process
    return Source(_frames(start, frames, args.encoding), len(frames), "frames", {start.series_id})


def array_source(path: Path, args: argparse.Namespace) -> Source:
    """A 4-D (or 3-D with ``--scan-shape``) array: raster positions, optics from the options."""
    if path.suffix == ".npy":
        data: Any = np.load(path, mmap_mode="r")
    else:
        handle = h5py.File(path, "r")
        names: list[str] = []
        handle.visititems(lambda name, node: names.append(name)
                          if isinstance(node, h5py.Dataset) and node.ndim in (3, 4) else None)
        name = args.dataset or (names[0] if names else None)
        if name is None or name not in handle:
            raise ValueError(f"{path}: no 3-D or 4-D dataset{f' named {args.dataset!r}' if args.dataset else ''}")
        data = handle[name]
    if data.ndim == 4:
        scan_shape = (int(data.shape[0]), int(data.shape[1]))
        if args.scan_shape and tuple(args.scan_shape) != scan_shape:
            raise ValueError(f"--scan-shape {args.scan_shape} does not match the array's {scan_shape}")
        frames: Any = _Flat(data)
    elif data.ndim == 3 and args.scan_shape:
        scan_shape, frames = (args.scan_shape[0], args.scan_shape[1]), data
        if scan_shape[0] * scan_shape[1] != len(data):
            raise ValueError(f"--scan-shape {scan_shape} has {scan_shape[0] * scan_shape[1]} positions, "
                             f"the array {len(data)} frames")
    else:
        raise ValueError(f"{path}: expected a 4-D array, or 3-D with --scan-shape; got shape {data.shape}")
    if not (args.energy_eV and args.convergence_mrad and args.detector_pixel_mrad and args.step_A):
        raise ValueError("an array needs --energy-eV, --convergence-mrad, --detector-pixel-mrad and --step-A")
    detector = (int(data.shape[-2]), int(data.shape[-1]))
    start = _start(args.series_id or path.stem, scan_shape, args.step_A, detector, args.dtype, args)
    return Source(_frames(start, frames, args.encoding), len(frames), "frames", {start.series_id})


class _Flat:
    """A 4-D array indexed as 3-D (scan positions in raster order), read one frame at a time."""

    def __init__(self, data: Any) -> None:
        self.data, self.cols = data, data.shape[1]

    def __len__(self) -> int:
        return int(self.data.shape[0] * self.data.shape[1])

    def __getitem__(self, index: int) -> Any:
        return self.data[index // self.cols, index % self.cols]


def _series_and_frame(parts: list[Any], format: str) -> tuple[str | None, bool]:
    """(series id of a start/header message or None, whether the message carries an image)."""
    first = bytes(memoryview(parts[0])[:65536]) if memoryview(parts[0]).nbytes <= 65536 else b""
    if format == "ptylive":
        try:
            header = msgpack.unpackb(first, raw=False)
        except Exception:  # noqa: BLE001 - malformed recorded traffic is replayed as it is
            return None, False
        if not isinstance(header, dict):
            return None, False
        started = header.get("htype") == "series_start" and "series_id" in header
        return (str(header["series_id"]) if started else None), header.get("htype") == "frame"
    if format == "dectris_v1":
        if not first.startswith(b"{"):
            return None, False
        try:
            header = json.loads(first)
        except ValueError:
            return None, False
        htype = header.get("htype") if isinstance(header, dict) else None
        series = str(header["series"]) if htype in ("dheader-1.0", "dimage-1.0") and "series" in header else None
        return series, htype == "dimage-1.0"
    head = bytes(memoryview(parts[0])[:64])
    if b"\x64type\x65image" in head:
        return None, True
    if b"\x64type\x65start" in head:
        import cbor2

        message = cbor2.loads(bytes(memoryview(parts[0])))
        message = getattr(message, "value", message)
        return str(message.get("series_id")), False
    return None, False


def recording_source(path: Path, args: argparse.Namespace) -> Source:
    """A dump-format recording, replayed with its recorded boundaries (or part by part)."""
    first = next(read_parts(path), None)
    if first is None:
        raise ValueError(f"{path}: the recording is empty")
    format = args.format if args.format != "auto" else detect_format(first)
    counts = read_counts(path)
    series_ids: set[str] = set()

    def messages() -> Iterator[tuple[list[Any], bool]]:
        for message in group_messages(read_parts(path), format, counts):
            series, is_frame = _series_and_frame(message, format)
            if series is not None:
                series_ids.add(series)
            if args.single_parts:
                for part in message:
                    yield [part], is_frame and part is message[0]
            else:
                yield message, is_frame

    logger.info("replaying %s as %s (%s boundaries)", path, format, "recorded" if counts is not None else "derived")
    return Source(messages(), path.stat().st_size, "bytes", series_ids)


def open_source(path: Path, args: argparse.Namespace) -> Source:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npy":
        return array_source(path, args)
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as handle:
            is_scan = "intensities" in handle and "positions_px" in handle
        return scan_file_source(path, args) if is_scan and not args.dataset else array_source(path, args)
    return recording_source(path, args)


@dataclass
class Stats:
    frames: int = 0
    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def rate_hz(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _progress(stats: Stats, done: int, total: int, unit: str, began: float) -> None:
    fraction = min(done / total, 1.0) if total else 1.0
    bar = "#" * int(30 * fraction)
    elapsed = time.monotonic() - began
    print(f"\r[{bar:<30}] {fraction:6.1%}  {stats.frames} frames  {stats.bytes / 1e6:,.1f} MB  "
          f"{stats.frames / elapsed if elapsed > 0 else 0.0:,.1f} fps", end="", file=sys.stderr, flush=True)


def send(source: Source, endpoint: str, rate_hz: float | None, bind: bool = False, progress: bool = True,
         connect_timeout_s: float | None = None) -> Stats:
    """Send every message of ``source``; frame messages no faster than ``rate_hz`` (None: as fast as taken).

    Messages queue only on a completed connection (``ZMQ_IMMEDIATE``): when no peer has connected within
    ``connect_timeout_s`` (None: :data:`CONNECT_TIMEOUT_S`) of the first message, :class:`NobodyListening`
    is raised (a replay to an endpoint where nothing listened once printed "sent 320 frames" and exited 0).
    """
    stats, period = Stats(), 1.0 / rate_hz if rate_hz else 0.0
    connect_timeout_s = CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger, push.sndhwm, push.immediate = LINGER_MS, 1000, True
        push.sndtimeo = max(1, int(connect_timeout_s * 1000))
        (push.bind if bind else push.connect)(endpoint)
        began = shown = time.monotonic()
        for parts, is_frame in source.messages:
            if is_frame and period:
                wait = began + stats.frames * period - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            try:
                push.send_multipart(parts, copy=False)
            except zmq.Again:
                push.linger = 0
                raise NobodyListening(f"nothing is listening at {endpoint}: no connection within "
                                      f"{connect_timeout_s:g} s ({stats.messages} messages sent)") from None
            if stats.messages == 0:
                push.sndtimeo = -1  # connected: from here on wait for room as long as it takes
            stats.messages += 1
            stats.frames += int(is_frame)
            stats.bytes += sum(memoryview(part).nbytes for part in parts)
            if progress and time.monotonic() - shown > PROGRESS_S:
                shown = time.monotonic()
                _progress(stats, stats.frames if source.unit == "frames" else stats.bytes, source.total, source.unit,
                          began)
        stats.seconds = time.monotonic() - began
        if progress:
            _progress(stats, source.total, source.total, source.unit, began)
            print(file=sys.stderr)
    return stats


class NobodyListening(OSError):
    """No peer connected to the replay's endpoint in time (the CLI prints one ``error:`` line, exit 2)."""


def registered(status_url: str, series_ids: set[str], timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """The daemon's registry record of each series among ``series_ids``; waits up to ``timeout_s`` until it has
    seen them all (those it has not are left out, logged)."""
    url = status_url.rstrip("/") + "/status"
    deadline, found = time.monotonic() + timeout_s, dict[str, Any]()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                registry = json.loads(response.read())["ingest"]["registry"]
        except (OSError, ValueError, KeyError) as exc:  # URLError is an OSError
            raise ValueError(f"cannot read the daemon's status at {url}: {exc}") from None
        records = [registry["current"], *registry["queued"], *registry["finished"]]
        found = {r["series_id"]: r for r in records if r is not None and r["series_id"] in series_ids}
        if set(found) >= series_ids or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    missing = series_ids - set(found)
    if missing:
        logger.warning("the daemon has not registered series %s (yet)", sorted(missing))
    return found


def refusals(status_url: str, series_ids: set[str], timeout_s: float = 10.0) -> dict[str, str]:
    """Series among ``series_ids`` the daemon refused, with its reason; waits until it has seen them all."""
    return {sid: r["refusal"] for sid, r in registered(status_url, series_ids, timeout_s).items() if r.get("refusal")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="scan HDF5, 4-D .npy/HDF5 array, or a ZeroMQ dump recording")
    p.add_argument("--endpoint", required=True, help="the daemon's ingest, e.g. tcp://127.0.0.1:5555")
    pace = p.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=float, help="frames per second (or --max-rate)")
    pace.add_argument("--max-rate", action="store_true", help="as fast as the daemon takes them (or --rate)")
    p.add_argument("--bind", action="store_true",
                   help="bind the endpoint, for a daemon with ingest.bind = false (default: connect)")
    p.add_argument("--status-url", help="the daemon's HTTP root, e.g. http://127.0.0.1:8080/: exit 3 when it refused "
                                        "a series, 4 when a series' image count and its scan disagree (default: "
                                        "none, neither read)")
    p.add_argument("--format", choices=("auto", "ptylive", "dectris_v1", "dectris_v2"), default="auto",
                   help="of a recording; auto: from its first part (default: %(default)s)")
    p.add_argument("--single-parts", action="store_true",
                   help="recording: send every part as its own message (default: as recorded)")
    p.add_argument("--series-id", default="", help="arrays and scan files (default: the file name)")
    p.add_argument("--dtype", choices=protocol.DTYPES, default="uint16",
                   help="arrays and scan files: pixel type on the wire (default: %(default)s)")
    p.add_argument("--encoding", choices=("raw", "bslz4", "lz4"), default="raw",
                   help="arrays and scan files: frame compression (default: %(default)s)")
    p.add_argument("--dataset", default="", help="HDF5 array: the dataset (default: the first 3-D or 4-D one)")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="arrays: raster of a 3-D array, required for one (default: a 4-D array's first two axes)")
    p.add_argument("--step-A", type=float, default=None, help="arrays: scan step in Å (required)")
    p.add_argument("--energy-eV", type=float, default=None, help="arrays: beam energy in eV (required)")
    p.add_argument("--convergence-mrad", type=float, default=None,
                   help="arrays: probe convergence semi-angle in mrad (required)")
    p.add_argument("--defocus-A", type=float, default=0.0, help="arrays: probe defocus in Å (default: %(default)s)")
    p.add_argument("--detector-pixel-mrad", type=float, default=None,
                   help="arrays: detector pixel in mrad (required)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: progress on stderr)")


def run(args: argparse.Namespace) -> int:
    """Replay ``args.source``; print the summary; 3 if the daemon refused a series, 4 if a series' image count
    and its scan disagree (the daemon's ``count_mismatch``), else 0."""
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise ValueError(f"--rate must be a positive number of frames per second, got {args.rate}")
    source = open_source(args.source, args)
    stats = send(source, args.endpoint, None if args.max_rate else args.rate, args.bind, not args.quiet)
    print(f"sent {stats.frames} frames ({stats.messages} messages, {stats.bytes / 1e6:,.2f} MB) in "
          f"{stats.seconds:.2f} s: {stats.rate_hz:,.1f} frames/s")
    if args.status_url:
        records = registered(args.status_url, source.series_ids)
        refused = {sid: r["refusal"] for sid, r in records.items() if r.get("refusal")}
        mismatched = {sid: r["count_mismatch"] for sid, r in records.items()
                      if r.get("count_mismatch") and sid not in refused}
        for series_id, reason in sorted(refused.items()):
            print(f"error: the daemon refused series {series_id!r}: {reason}", file=sys.stderr)
        for series_id, what in sorted(mismatched.items()):
            print(f"error: series {series_id!r}: the detector's image count and the scan disagree: {what}",
                  file=sys.stderr)
        if refused:
            return EXIT_REFUSED
        if mismatched:
            return EXIT_COUNT_MISMATCH
    return 0
