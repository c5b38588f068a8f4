"""CPU per frame at the ingest against a bare receive, per stage, and with several ingest processes.

Sections 1a–1c of ``ptylive bench ingest``. On a shared machine wall-clock rates say more about the neighbours
than about the code, so the headline is CPU time per frame, each receiver in a process of its own:

* **bare**: a PULL that takes the frames (``recv`` per part, ``copy=False``) and does nothing else;
* **ingest**: :class:`~ptylive.streaming.ingest.Ingest` (decode, validate, count, route, forward zero-copy to
  ``N_WORKERS`` PUSH sockets); the workers are PULL sinks in the benchmark process, not counted.

CPU is the receiver process's user + system time (``time.process_time``, so ZeroMQ's I/O thread is included)
from before the first frame to after the last, divided by the frames. Ratio = bare / ingest (aim ≥ 0.7).

The stage table times the ingest's per-frame steps one at a time in one thread (``time.thread_time``) on frames
already queued on an inproc socket: receive, decode (``protocol.decode``), route (``SeriesBook.route``: registry
and router), forward (``send`` of both parts, in batches as the ingest sends a full drain). Their sum is the
ingest thread's share; 1a also gives that thread's own CPU in a real run (the rest is ZeroMQ's I/O thread).

Scale: ``k`` ingest processes, each with its own PULL connected to one PUSH that binds (as several clients of a
SIMPLON v2 detector: ZeroMQ round-robins the frames). Each process is given the series start directly, as rank 0
would share it with them (docs/daemon.md, "Several ingest processes"); frames/s is the aggregate, sender's first
frame to the sinks' last, so on a machine with fewer free cores than ``k`` + 2 it shows the machine, not the code.
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import zmq

from ptylive.streaming.inbox import encode_batch_header
from ptylive.streaming.ingest import BATCH_FRAMES, Ingest, IngestSockets
from ptylive.streaming.protocol import decode, encode_frame
from ptylive.streaming.router import Router
from ptylive.streaming.series import SeriesRegistry
from ptylive.tools.bench_sender import N_WORKERS, SEND_TIMEOUT_S, Sender, _read, _series_start, _split_columns, _write

CPU_CASES = [(64, 20000), (96, 20000), (128, 10000), (256, 3000), (512, 1000)]
QUICK_CPU_CASES = [(64, 5000), (96, 5000)]
STAGE_FRAMES = 5000
REPEATS = 3
SCALE_SIDE, SCALE_FRAMES = 96, 20000
TARGETS = [(96, 120_000.0), (512, 10_000.0)]  # (detector side, frames/s): ARINA-class, and a 512² camera


# ------------------------------------------------------------------------------------------- receiver process


def _receiver_main() -> None:
    """Receiver process: one command on stdin, ``("bare" | "ingest", side, n, connect_to)``; answers its
    endpoints, waits for ``"go"``, receives, answers ``(frames, cpu_s, note)``."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    mode, side, n, connect_to = _read(stdin)
    context = zmq.Context()
    try:
        if mode == "bare":
            _bare_receiver(context, n, stdin, stdout)
        else:
            _ingest_receiver(context, side, n, connect_to, stdin, stdout)
    finally:
        context.term()


def _bare_receiver(context: zmq.Context, n: int, stdin: Any, stdout: Any) -> None:
    pull = context.socket(zmq.PULL)
    pull.linger = 0
    pull.bind("tcp://127.0.0.1:0")
    _write(stdout, (pull.getsockopt_string(zmq.LAST_ENDPOINT), []))
    _read(stdin)  # go
    received, deadline = 0, time.monotonic() + SEND_TIMEOUT_S
    began = time.process_time()
    while received < n and time.monotonic() < deadline:
        if not pull.poll(100, zmq.POLLIN):
            continue
        while True:
            try:
                part = pull.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            while part.more:
                part = pull.recv(zmq.NOBLOCK, copy=False)
            received += 1
    _write(stdout, (received, time.process_time() - began, ""))
    pull.close()


def _ingest_receiver(context: zmq.Context, side: int, n: int, connect_to: str, stdin: Any, stdout: Any) -> None:
    owner_of = _split_columns(n)
    config = IngestSockets(endpoint=connect_to or "tcp://127.0.0.1:0", bind=not connect_to,
                           worker_endpoints=("tcp://127.0.0.1:0",) * N_WORKERS, send_hwm=100_000)
    ingest = Ingest(config, lambda start: Router(owner_of, N_WORKERS), SeriesRegistry(), context)
    if connect_to:  # one of several: the start is shared with it (by rank 0 in the daemon), not received
        ingest.book.start(_series_start(side, n))
    _write(stdout, (ingest.endpoint, list(ingest.worker_endpoints)))
    _read(stdin)  # go: the sinks are connected
    deadline = time.monotonic() + SEND_TIMEOUT_S
    began = time.process_time()
    ingest.start()
    expected = n if not connect_to else None
    while time.monotonic() < deadline:
        time.sleep(0.005)
        forwarded = sum(ingest.forwarded)
        if expected is not None and forwarded >= expected:
            break
        if expected is None and _read_ready(stdin):
            _read(stdin)  # stop: the sinks have every frame
            break
    thread = ingest._thread
    thread_cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) if thread and thread.ident else 0.0
    ingest.join(timeout=10)
    cpu = time.process_time() - began
    ingest.close()
    _write(stdout, (sum(ingest.forwarded), cpu, f"{thread_cpu:.9f}"))


def _read_ready(stream: Any) -> bool:
    return bool(select.select([stream], [], [], 0)[0])


class Receiver:
    """A receiver process (bare or ingest), driven over its stdin and stdout."""

    def __init__(self, mode: str, side: int, n: int, connect_to: str = "") -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from ptylive.tools.bench_ingest_cpu import _receiver_main; _receiver_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._in, self._out = self._process.stdin, self._process.stdout
        _write(self._in, (mode, side, n, connect_to))
        self.endpoint, self.worker_endpoints = _read(self._out)

    def go(self) -> None:
        _write(self._in, "go")

    def stop(self) -> None:
        _write(self._in, "stop")

    def result(self) -> tuple[int, float, str]:
        ready, _, _ = select.select([self._out], [], [], SEND_TIMEOUT_S + 20)
        if not ready:
            raise TimeoutError("the receiver did not answer")
        frames, cpu_s, note = _read(self._out)
        return int(frames), float(cpu_s), str(note)

    def close(self) -> None:
        self._in.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        self._out.close()


def _sinks(context: zmq.Context, endpoints: list[str]) -> tuple[zmq.Poller, list[zmq.Socket]]:
    """The workers' stand-ins: a PULL on every endpoint, registered with one poller (the caller closes them)."""
    pulls, poller = [], zmq.Poller()
    for endpoint in endpoints:
        pull = context.socket(zmq.PULL)
        pull.linger, pull.rcvhwm = 0, 100_000
        pull.connect(endpoint)
        poller.register(pull, zmq.POLLIN)
        pulls.append(pull)
    return poller, pulls


def _drain_sinks(poller: zmq.Poller, n: int) -> tuple[int, float]:
    """Take frames until ``n`` or the deadline; (frames, last arrival). Starts and ends are skipped."""
    frames, last, deadline = 0, 0.0, time.monotonic() + SEND_TIMEOUT_S
    while frames < n and time.monotonic() < deadline:
        for pull, _ in poller.poll(100):
            while True:
                try:
                    parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(parts) == 2 or len(parts) >= 5:  # a frame, or a batch of (parts - 1) / 2
                    frames, last = frames + len(parts) // 2, time.monotonic()
    return frames, last


# ------------------------------------------------------------------------------------------------ 1a. CPU


def cpu_run(context: zmq.Context, sender: Sender, mode: str, side: int,
            n: int) -> tuple[float, float, bool, float]:
    """One run: (µs CPU per frame of the receiver process, frames/s, every frame arrived, µs of it in the ingest
    thread: 0 for bare)."""
    receiver = Receiver(mode, side, n)
    try:
        if mode == "bare":
            receiver.go()
            sender.start(receiver.endpoint, side, n)
            frames, cpu_s, _ = receiver.result()
            t_first, t_last, _ = sender.result()
            return cpu_s / max(frames, 1) * 1e6, frames / max(t_last - t_first, 1e-9), frames == n, 0.0
        return _ingest_cpu_run(context, sender, receiver, side, n)
    finally:
        receiver.close()


def _ingest_cpu_run(context: zmq.Context, sender: Sender, receiver: Receiver, side: int,
                    n: int) -> tuple[float, float, bool, float]:
    poller, pulls = _sinks(context, receiver.worker_endpoints)
    try:
        time.sleep(0.1)  # the sinks connect before the start is broadcast
        receiver.go()
        sender.start(receiver.endpoint, side, n, series=True)
        got, t_last = _drain_sinks(poller, n)
        frames, cpu_s, thread_s = receiver.result()  # the sinks stay open for the series end
        t_first, _, _ = sender.result()
    finally:
        for pull in pulls:
            pull.close()
    return (cpu_s / max(frames, 1) * 1e6, got / max(t_last - t_first, 1e-9), got == n == frames,
            float(thread_s) / max(frames, 1) * 1e6)


def cpu_table(context: zmq.Context, sender: Sender, cases: list[tuple[int, int]]) -> tuple[list[str], dict[int, float]]:
    """Markdown rows, and the ingest's µs per frame by detector side (for the cores estimate)."""
    lines = ["| frame | frames | bare µs CPU/frame | ingest µs CPU/frame (its Python thread) | ratio bare/ingest "
             "(aim ≥ 0.7) | bare fps | ingest fps | all delivered |", "|---|---|---|---|---|---|---|---|"]
    per_frame: dict[int, float] = {}
    for side, n in cases:
        bare, ingest = [], []
        for _ in range(REPEATS):  # interleaved
            bare.append(cpu_run(context, sender, "bare", side, n))
            ingest.append(cpu_run(context, sender, "ingest", side, n))
        bare_us, ingest_us = (statistics.median(r[0] for r in runs) for runs in (bare, ingest))
        ratios = [b[0] / i[0] for b, i in zip(bare, ingest, strict=True)]
        per_frame[side] = ingest_us
        thread_us = statistics.median(r[3] for r in ingest)
        lines.append(f"| {side}² uint16 | {n} | {bare_us:.1f} | {ingest_us:.1f} ({thread_us:.1f}) | "
                     f"**{bare_us / ingest_us:.2f}** "
                     f"(runs {', '.join(f'{r:.2f}' for r in ratios)}) | {statistics.median(r[1] for r in bare):,.0f} "
                     f"| {statistics.median(r[1] for r in ingest):,.0f} | "
                     f"{'yes' if all(r[2] for r in bare + ingest) else 'NO'} |")
    return lines, per_frame


# --------------------------------------------------------------------------------------------- 1b. stages


def _queued(context: zmq.Context, messages: list[list[Any]], name: str) -> tuple[zmq.Socket, zmq.Socket]:
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.sndhwm = pull.rcvhwm = 0
    pull.bind(f"inproc://{name}")
    push.connect(f"inproc://{name}")
    for message in messages:
        push.send_multipart(message, copy=False)
    return push, pull


def stage_us(context: zmq.Context, side: int, n: int = STAGE_FRAMES) -> dict[str, float]:
    """µs of thread CPU per frame for each step of the ingest's hot path (see the module docstring)."""
    pixels = np.random.default_rng(side).integers(0, 1000, size=(side, side), dtype=np.uint16)
    messages = [encode_frame("bench-ingest", k, pixels) for k in range(n)]  # one pixel buffer, shared
    push, pull = _queued(context, messages, f"stages-{side}")
    out, sink = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    out.sndhwm = sink.rcvhwm = 0
    sink.bind(f"inproc://stages-out-{side}")
    out.connect(f"inproc://stages-out-{side}")
    workers = tuple(f"inproc://stages-w{w}-{side}" for w in range(N_WORKERS))  # bound, never sent to here
    config = IngestSockets(endpoint=f"inproc://stages-unused-{side}", worker_endpoints=workers)
    ingest = Ingest(config, lambda start: Router(_split_columns(n), N_WORKERS), SeriesRegistry(), context)
    ingest.book.start(_series_start(side, n))
    try:
        began, received = time.thread_time(), []
        for _ in range(n):
            part = pull.recv(copy=False)
            parts = [part]
            while part.more:
                part = pull.recv(copy=False)
                parts.append(part)
            received.append(parts)
        timings = {"receive": time.thread_time() - began}
        began = time.thread_time()
        frames = [decode(parts) for parts in received]
        timings["decode"] = time.thread_time() - began
        began = time.thread_time()
        for frame in frames:
            ingest.book.route(frame)  # type: ignore[arg-type]
        timings["route"] = time.thread_time() - began
        began = time.thread_time()
        for first in range(0, n, BATCH_FRAMES):  # as the ingest forwards a full drain: batches to one worker
            batch = received[first:first + BATCH_FRAMES]
            out.send(encode_batch_header(len(batch)), zmq.SNDMORE)
            for parts in batch[:-1]:
                out.send(parts[0], zmq.SNDMORE, copy=False)
                out.send(parts[1], zmq.SNDMORE, copy=False)
            out.send(batch[-1][0], zmq.SNDMORE, copy=False)
            out.send(batch[-1][1], copy=False)
        timings["forward"] = time.thread_time() - began
    finally:
        ingest.close()
        for sock in (push, pull, out, sink):
            sock.close(linger=0)
    return {stage: seconds / n * 1e6 for stage, seconds in timings.items()}


def stage_table(context: zmq.Context, sides: list[int]) -> list[str]:
    lines = [f"| frame | receive | decode | route | forward (batches of {BATCH_FRAMES}) | sum (ingest thread) |",
             "|---|---|---|---|---|---|"]
    for side in sides:
        runs = [stage_us(context, side) for _ in range(REPEATS)]
        median = {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
        lines.append(f"| {side}² | " + " | ".join(f"{median[s]:.1f}" for s in median) +
                     f" | {sum(median.values()):.1f} |")
    return lines


# ---------------------------------------------------------------------------------------------- 1c. scale


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def scale_run(context: zmq.Context, sender: Sender, k: int, side: int, n: int) -> tuple[float, float, bool]:
    """``k`` ingest processes behind one binding PUSH: (aggregate frames/s, mean µs CPU per frame, delivered)."""
    endpoint = _free_endpoint()
    receivers = [Receiver("ingest", side, n, connect_to=endpoint) for _ in range(k)]
    poller, pulls = _sinks(context, [e for receiver in receivers for e in receiver.worker_endpoints])
    try:
        for receiver in receivers:
            receiver.go()
        sender.start(endpoint, side, n, bind=True, peers_wait_s=0.5)
        got, t_last = _drain_sinks(poller, n)
        for receiver in receivers:
            receiver.stop()
        results = [receiver.result() for receiver in receivers]
        t_first, _, _ = sender.result()
    finally:
        for receiver in receivers:
            receiver.close()
        for pull in pulls:
            pull.close()
    cpu_us = sum(r[1] for r in results) / max(got, 1) * 1e6
    return got / max(t_last - t_first, 1e-9), cpu_us, got == n and sum(r[0] for r in results) == n


def scale_table(context: zmq.Context, sender: Sender, counts: list[int]) -> list[str]:
    lines = ["| ingest processes | frames | aggregate fps | vs 1 process | µs CPU/frame (all processes) | "
             "all delivered |", "|---|---|---|---|---|---|"]
    base = 0.0
    for k in counts:
        runs = [scale_run(context, sender, k, SCALE_SIDE, SCALE_FRAMES) for _ in range(REPEATS)]
        fps = statistics.median(r[0] for r in runs)
        base = base or fps
        lines.append(f"| {k} | {SCALE_FRAMES} of {SCALE_SIDE}² | {fps:,.0f} | {fps / base:.2f}× | "
                     f"{statistics.median(r[1] for r in runs):.1f} | {'yes' if all(r[2] for r in runs) else 'NO'} |")
    return lines


def cores_lines(ingest_us: dict[int, float], decode_us: dict[int, float]) -> list[str]:
    """Cores for the target rates: rate × µs per frame, at the ingest (rank 0's side) and for decoding."""
    lines = ["| target | ingest µs/frame | ingest cores | bslz4 decode µs/frame (workers) | decode cores |",
             "|---|---|---|---|---|"]
    for side, rate in TARGETS:
        ingest = ingest_us.get(side)
        decode_cost = decode_us.get(side)
        cells = [f"{rate:,.0f} fps of {side}²",
                 "–" if ingest is None else f"{ingest:.1f}", "–" if ingest is None else f"{rate * ingest / 1e6:.1f}",
                 "–" if decode_cost is None else f"{decode_cost:.1f}",
                 "–" if decode_cost is None else f"{rate * decode_cost / 1e6:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(context: zmq.Context, sender: Sender, quick: bool = False) -> tuple[list[str], dict[int, float]]:
    """Print sections 1a–1c; return their table lines (checked for "NO") and the ingest µs per frame by side."""
    cases = QUICK_CPU_CASES if quick else CPU_CASES
    print("## 1a. CPU per frame: bare receive vs the ingest (each in a process of its own)\n")
    cpu, per_frame = cpu_table(context, sender, cases)
    print("\n".join(cpu))
    print("\n## 1b. The ingest's steps, µs of thread CPU per frame (one thread, frames queued inproc)\n")
    stages = stage_table(context, [side for side, _ in cases])
    print("\n".join(stages))
    cores = len(os.sched_getaffinity(0))
    counts = [1, 2] if quick else list(range(1, max(2, min(4, cores)) + 1))
    print(f"\n## 1c. Frames/s vs number of ingest processes ({SCALE_SIDE}², one sender, {cores} cores)\n")
    scale = scale_table(context, sender, counts)
    print("\n".join(scale))
    return cpu + scale, per_frame


if __name__ == "__main__":
    context = zmq.Context()
    sender = Sender()
    try:
        main(context, sender, quick="--quick" in sys.argv)
    finally:
        sender.close()
        context.term()
    print(f"\nload average: {os.getloadavg()[0]:.2f}")
