"""``ptylive bench ingest``: frames per second through the ingest, as a ratio to bare ZeroMQ.

The machine may be shared and noisy, so the number that matters is a ratio against a reference measured in
the same run, interleaved with it (median of repeats):

1. Reference: a bare pyzmq PUSH → PULL over loopback TCP of the same ``[msgpack header, pixel buffer]``
   messages (``send_multipart`` / ``recv_multipart`` with ``copy=False``).
2. The same messages, framed by a series start and end, through :class:`~ptylive.streaming.ingest.Ingest`
   (a thread) to ``R`` :class:`~ptylive.streaming.inbox.WorkerInbox` es (polled round-robin by the main
   thread; ``WORKER_THREADS = True`` gives each its own thread, about as fast), with an
   ``owner_of`` that splits the scan columns between workers. Every frame must arrive.

Rates run from the first frame sent to the last frame received. The sender is a separate process (started
once, driven over pipes); it records ``time.monotonic()``, which on Linux is one clock for all processes,
so per-frame latency of a paced run is receive time (worker) minus send time (sender).
Target: ingest / bare ≥ 0.7.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from ptylive.streaming.inbox import WorkerInbox
from ptylive.streaming.ingest import Ingest, IngestSockets
from ptylive.streaming.protocol import (
    Frame,
    SeriesEnd,
)
from ptylive.streaming.router import Router
from ptylive.tools import bench_ingest_cpu
from ptylive.tools.bench_sender import N_WORKERS, Sender, _split_columns

FULL_CASES = [(64, 20000), (128, 8000), (256, 3000)]  # (detector side, frames): ~1-2 s each
QUICK_CASES = [(64, 5000)]
REPEATS = 3
WORKER_THREADS = False  # workers round-robin in the main thread: fewer threads contending for the GIL
LATENCY_RATE, LATENCY_FRAMES = 2000.0, 2000  # paced run for latency
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    fps: float
    received: int
    sent: int
    delivered: bool
    latency: np.ndarray | None = None
    note: str = ""


def _deadline(n: int, rate: float | None) -> float:
    return time.monotonic() + 20.0 + (n / rate if rate else n / 1000.0)


def bare_run(context: zmq.Context, sender: Sender, side: int, n: int, rate: float | None = None) -> RunResult:
    """Sender process → PULL in this thread; frames per second (and latencies when paced)."""
    pull = context.socket(zmq.PULL)
    pull.linger = 0
    try:
        pull.bind("tcp://127.0.0.1:0")
        sender.start(pull.getsockopt_string(zmq.LAST_ENDPOINT), side, n, rate)
        recv_times = np.zeros(n)
        received, deadline, t_last = 0, _deadline(n, rate), 0.0
        while received < n and time.monotonic() < deadline:
            if not pull.poll(100, zmq.POLLIN):
                continue
            pull.recv_multipart(copy=False)
            t_last = recv_times[received] = time.monotonic()
            received += 1
        t_first, _, send_times = sender.result()
    finally:
        pull.close()
    fps = received / (t_last - t_first) if received and t_last > t_first else 0.0
    latency = (recv_times - send_times) * 1e3 if send_times is not None and received == n else None
    return RunResult(fps, received, n, received == n, latency)


def _record(messages: list[Any], w: int, recv_times: np.ndarray, counts: list[int], last: list[float]) -> bool:
    """Note the arrival of worker ``w``'s frames; True once its series end has arrived."""
    now = time.monotonic()
    ended = False
    for message in messages:
        if isinstance(message, Frame):
            recv_times[message.frame_index] = now
            counts[w] += 1
            last[w] = now
        elif isinstance(message, SeriesEnd):
            ended = True
    return ended


def _worker_loop(inbox: WorkerInbox, recv_times: np.ndarray, counts: list[int], w: int, deadline: float,
                 last: list[float]) -> None:
    """Receive until the series end (it follows this worker's last frame) or the deadline."""
    while time.monotonic() < deadline:
        messages = inbox.poll(timeout_ms=100, max_messages=256)
        if not messages:
            continue
        if _record(messages, w, recv_times, counts, last):
            return


def _workers_in_main(inboxes: list[WorkerInbox], recv_times: np.ndarray, counts: list[int], deadline: float,
                     last: list[float]) -> None:
    """All workers in this thread, round-robin, until each saw the series end or the deadline."""
    done = [False] * len(inboxes)
    idle = False
    while not all(done) and time.monotonic() < deadline:
        idle_now = True
        for w, inbox in enumerate(inboxes):
            if done[w]:
                continue
            messages = inbox.poll(timeout_ms=1 if idle else 0, max_messages=256)
            if not messages:
                continue
            idle_now = False
            done[w] = _record(messages, w, recv_times, counts, last)
        idle = idle_now


def ingest_run(context: zmq.Context, sender: Sender, side: int, n: int, rate: float | None = None,
               n_workers: int = N_WORKERS) -> RunResult:
    """Sender process → Ingest (thread) → ``n_workers`` WorkerInboxes (main thread or threads)."""
    owner_of = _split_columns(n)
    config = IngestSockets(endpoint="tcp://127.0.0.1:0", worker_endpoints=("tcp://127.0.0.1:0",) * n_workers)
    ingest = Ingest(config, lambda start: Router(owner_of, n_workers), context=context)
    inboxes: list[WorkerInbox] = []
    threads: list[threading.Thread] = []
    recv_times = np.zeros(n)
    counts, last = [0] * n_workers, [0.0] * n_workers
    t_first, deadline, error = 0.0, _deadline(n, rate), None
    try:
        inboxes = [WorkerInbox(endpoint, context=context) for endpoint in ingest.worker_endpoints]
        if WORKER_THREADS:
            threads = [threading.Thread(target=_worker_loop, args=(inbox, recv_times, counts, w, deadline, last),
                                        name=f"bench-worker-{w}", daemon=True) for w, inbox in enumerate(inboxes)]
        for thread in threads:
            thread.start()
        ingest.start()
        time.sleep(0.05)  # let the workers connect before the series start is broadcast
        sender.start(ingest.endpoint, side, n, rate, series=True)
        if not WORKER_THREADS:
            _workers_in_main(inboxes, recv_times, counts, deadline, last)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        t_first, _, send_times = sender.result()
    finally:
        try:
            ingest.join(timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            error = f"ingest: {type(exc).__name__}: {exc}"
        for thread in threads:  # they end at their deadline at the latest
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        snapshot = ingest.snapshot()
        ingest.close()
        for inbox in inboxes:
            inbox.close()
    received = sum(counts)
    t_last = max(last)
    fps = received / (t_last - t_first) if received and t_last > t_first else 0.0
    problems = [error] if error else []
    if snapshot["routing_errors"] or snapshot["unsent_on_stop"]:
        problems.append(f"routing_errors {snapshot['routing_errors']}, unsent {snapshot['unsent_on_stop']}")
    if sum(w["forwarded"] for w in snapshot["workers"]) != n:
        problems.append(f"forwarded {[w['forwarded'] for w in snapshot['workers']]}")
    if min(counts) == 0:
        problems.append(f"a worker got nothing: {counts}")
    delivered = received == n and not problems
    latency = (recv_times - send_times) * 1e3 if send_times is not None and received == n else None
    note = f"per worker {counts}" + (f"; {'; '.join(problems)}" if problems else "")
    return RunResult(fps, received, n, delivered, latency, note)


# --------------------------------------------------------------------------------------------------- tables


def throughput_table(context: zmq.Context, sender: Sender, cases: list[tuple[int, int]]) -> list[str]:
    lines = ["| frame | frames | bare fps | ingest fps | ratio (ingest/bare) | all frames delivered | "
             "bare MB/s | ingest per worker (last run) |",
             "|---|---|---|---|---|---|---|---|"]
    for side, n in cases:
        bare_run(context, sender, side, min(n, 1000))  # warm-up: connections, allocator
        bare, through = [], []
        for _ in range(REPEATS):  # interleaved
            bare.append(bare_run(context, sender, side, n))
            through.append(ingest_run(context, sender, side, n))
        bare_fps = statistics.median(r.fps for r in bare)
        ingest_fps = statistics.median(r.fps for r in through)
        ratios = [t.fps / b.fps if b.fps else 0.0 for b, t in zip(bare, through, strict=True)]
        delivered = all(r.delivered for r in bare + through)
        received = " / ".join(f"{r.received}" for r in through)
        ratio = ingest_fps / bare_fps if bare_fps else 0.0
        lines.append(f"| {side}² uint16 | {n} | {bare_fps:,.0f} | {ingest_fps:,.0f} | **{ratio:.2f}** "
                     f"(runs {', '.join(f'{x:.2f}' for x in ratios)}) | {'yes' if delivered else 'NO'} "
                     f"(received {received}) | {bare_fps * side * side * 2 / 1e6:,.0f} | {through[-1].note} |")
    return lines


def latency_table(context: zmq.Context, sender: Sender, sides: list[int]) -> list[str]:
    lines = ["| frame | path | median ms | p99 ms | max ms | all frames delivered |", "|---|---|---|---|---|---|"]
    for side in sides:
        for name, run in (("bare", bare_run), ("ingest", ingest_run)):
            r = run(context, sender, side, LATENCY_FRAMES, LATENCY_RATE)
            if r.latency is None:
                lines.append(f"| {side}² | {name} | – | – | – | {'yes' if r.delivered else 'NO'} "
                             f"({r.received}/{r.sent}) |")
                continue
            lat = r.latency
            lines.append(f"| {side}² | {name} | {np.median(lat):.3f} | {np.percentile(lat, 99):.3f} | "
                         f"{lat.max():.3f} | {'yes' if r.delivered else 'NO'} |")
    return lines


def main(quick: bool = False) -> int:
    """Run the ingest benchmarks and print markdown tables; 0 if every frame arrived, else 1."""
    cases = QUICK_CASES if quick else FULL_CASES
    print(f"# ptylive bench ingest ({'quick' if quick else 'full'}), {CORES} cores, pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}, R = {N_WORKERS} workers, load average at start "
          f"{os.getloadavg()[0]:.2f}\n")
    print(f"Sender (a process), ingest (a thread) and workers ({N_WORKERS} inboxes polled "
          f"{'in threads' if WORKER_THREADS else 'round-robin by the main thread'} of the benchmark process) "
          f"share the machine's {CORES} cores; loopback TCP; the bare reference is sender process → one PULL "
          f"in the main thread. Rates: first frame sent → last frame received; medians of {REPEATS} "
          f"interleaved runs. Aim: ratio ≥ 0.7.\n")
    context = zmq.Context()
    sender = Sender()
    try:
        cpu_lines, ingest_us = bench_ingest_cpu.main(context, sender, quick)
        print("\n## 1. Throughput: bare PUSH→PULL vs through the ingest, wall clock, workers in this process\n")
        throughput = throughput_table(context, sender, cases)
        print("\n".join(throughput))
        throughput += cpu_lines
        print(f"\n## 2. Frame-to-worker latency, paced at {LATENCY_RATE:.0f} fps for {LATENCY_FRAMES} frames\n")
        print("Send time per frame index (sender) to receive time in the worker (after decode), one clock.\n")
        latency = latency_table(context, sender, [side for side, _ in cases])
        print("\n".join(latency))
        from ptylive.tools.bench_decode import main as decode_benchmark
        from ptylive.tools.bench_preview import frame_to_preview_latency, latency_lines

        print("\n## 3. Frame-to-preview latency through `ptylive serve` (2 workers), 48² frames\n")
        print("Scheduled send time of each frame to the arrival of the first preview whose tile used it; the "
              "reference is the preview interval (2 Hz).\n")
        print("\n".join(latency_lines(frame_to_preview_latency(scan_shape=(16, 16) if quick else (24, 24)))))
        decode_us = decode_benchmark(quick)  # §4: DECTRIS decode on workers
        print("\n## 5. Cores needed: frames/s × µs CPU per frame (1a at the ingest, 4 on the workers)\n")
        print("\n".join(bench_ingest_cpu.cores_lines(ingest_us, decode_us)))
        print(f"\nload average: {os.getloadavg()[0]:.2f}")
    finally:
        sender.close()
        context.term()
    ok = not any("| NO" in line for line in throughput + latency)
    print(f"\nall frames delivered in every run: {'yes' if ok else 'NO'}")
    return 0 if ok else 1
