"""The sender of ``ptylive bench ingest``: a process of its own that sends ptylive stream v1 frames on command.

Shared by :mod:`ptylive.tools.bench_ingest` and :mod:`ptylive.tools.bench_ingest_cpu` (so neither imports the
other's internals). The parent drives it over its stdin and stdout with length-prefixed msgpack (nothing is
pickled); it records ``time.monotonic()``, one clock for all processes on Linux.
"""

from __future__ import annotations

import select
import struct
import subprocess
import sys
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from ptylive.streaming.protocol import SeriesStart, encode_frame, encode_series_end, encode_series_start

N_WORKERS = 2
SERIES_ID = "bench-ingest"
STEP_A = 1.0
SEND_TIMEOUT_S = 60.0  # no case should get close: a hung receiver makes the run fail, not hang


def _scan_shape(n_frames: int) -> tuple[int, int]:
    cols = 100
    return (n_frames + cols - 1) // cols, cols


def _series_start(side: int, n_frames: int) -> SeriesStart:
    return SeriesStart(series_id=SERIES_ID, scan_shape=_scan_shape(n_frames), scan_step_A=(STEP_A, STEP_A),
                       detector_shape=(side, side), dtype="uint16", energy_eV=300e3,
                       convergence_semiangle_mrad=20.0, defocus_A=100.0, detector_pixel_mrad=1.0)


# --------------------------------------------------------------------------------------------------- sender


def _write(stream: Any, obj: Any) -> None:
    """Length-prefixed msgpack on a pipe (the benchmark's own control channel; nothing is pickled)."""
    data = msgpack.packb(obj, use_bin_type=True)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def _read(stream: Any) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    return msgpack.unpackb(stream.read(struct.unpack("<I", head)[0]), raw=False)


def _sender_main() -> None:
    """Sender process: for each command ``(endpoint, side, n, rate, series)`` read from stdin, send the
    frames and answer ``(t_first, t_last, send_times or None, error or None)`` on stdout; ``None`` ends it."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    context = zmq.Context()
    try:
        while True:
            try:
                command = _read(stdin)
            except EOFError:
                return
            if command is None:
                return
            try:
                answer = _send(context, *command)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the case
                answer = (0.0, 0.0, None, f"{type(exc).__name__}: {exc}")
            t_first, t_last, send_times, error = answer
            _write(stdout, (t_first, t_last, None if send_times is None else send_times.tolist(), error))
    finally:
        context.term()


def _send(context: zmq.Context, endpoint: str, side: int, n: int, rate: float | None, series: bool,
          bind: bool = False, peers_wait_s: float = 0.0) -> tuple[float, float, np.ndarray | None, str | None]:
    rng = np.random.default_rng(side)
    pixels = rng.integers(0, 1000, size=(side, side), dtype=np.uint16)
    messages = [encode_frame(SERIES_ID, k, pixels) for k in range(n)]  # encoded before the clock starts
    send_times = np.zeros(n) if rate else None
    push = context.socket(zmq.PUSH)
    push.linger = int(SEND_TIMEOUT_S * 1000)
    push.sndtimeo = int(SEND_TIMEOUT_S * 1000)  # zmq.Again instead of a hang if nobody receives
    try:
        if bind:  # several receivers connect, as to a SIMPLON v2 detector: PUSH round-robins over them
            push.bind(endpoint)
            time.sleep(peers_wait_s)
        else:
            push.connect(endpoint)
        if series:
            push.send_multipart(encode_series_start(_series_start(side, n)))
        t_first = time.monotonic()
        for k, message in enumerate(messages):
            if send_times is not None and rate:
                wait = t_first + k / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                send_times[k] = time.monotonic()
            push.send_multipart(message, copy=False)
        t_last = time.monotonic()
        if series:
            push.send_multipart(encode_series_end(SERIES_ID, n))
    finally:
        push.close()
    return t_first, t_last, send_times, None


class Sender:
    """The sender process (a fresh interpreter, started once), driven over its stdin and stdout."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from ptylive.tools.bench_sender import _sender_main; _sender_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, endpoint: str, side: int, n: int, rate: float | None = None, series: bool = False,
              bind: bool = False, peers_wait_s: float = 0.0) -> None:
        assert self._process.stdin is not None
        _write(self._process.stdin, (endpoint, side, n, rate, series, bind, peers_wait_s))

    def result(self, timeout_s: float = SEND_TIMEOUT_S + 10) -> tuple[float, float, np.ndarray | None]:
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"the sender did not answer within {timeout_s} s")
        try:
            t_first, t_last, send_times, error = _read(self._process.stdout)
        except EOFError:
            raise RuntimeError(f"the sender exited (code {self._process.poll()})") from None
        if error is not None:
            raise RuntimeError(f"sender failed: {error}")
        return t_first, t_last, None if send_times is None else np.asarray(send_times)

    def close(self) -> None:
        try:
            if self._process.stdin is not None:
                self._process.stdin.close()  # EOF ends the sender
        except OSError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        if self._process.stdout is not None:
            self._process.stdout.close()


def _split_columns(n_frames: int) -> Any:
    """``owner_of`` that gives each worker an equal band of scan columns (frames alternate between workers)."""
    cols = _scan_shape(n_frames)[1]

    def owner_of(positions_A: np.ndarray) -> np.ndarray:
        col = np.rint(positions_A[:, 1] / STEP_A)
        return np.clip((col * N_WORKERS) // cols, 0, N_WORKERS - 1).astype(np.int32)

    return owner_of
