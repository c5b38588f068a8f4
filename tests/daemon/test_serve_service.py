"""The daemon as a service: sd_notify, a hung worker, backpressure, memory budget, finish_now, SIGTERM.

One daemon for the module, configured like a service: a fake ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``,
short worker queues (4 messages, 64 KiB socket buffers), a 32 MiB memory budget per worker and
``on_new_start = "finish_now"``. The SIGTERM test stops it and runs last.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from ptylive.daemon.service.config import IngestConfig, ServiceConfig, WorkersConfig
from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming import protocol
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource
from tests.daemon.serve_harness import (
    ANY_PORT,
    PreviewListener,
    daemon_config,
    get_json,
    read_final,
    registry_series,
    series_count,
    stop_by_sigterm,
    wait_for,
)
from tests.daemon.test_serve import group_sizes

pytestmark = pytest.mark.mpi

WATCHDOG_USEC = 1_000_000  # systemd's timeout: 1 s; the daemon pings every 0.5 s
HEARTBEAT_TIMEOUT_S = 2.0  # workers send a heartbeat every second
STOP_S = 4.0
BUDGET_BYTES = 32 * 2**20


class FakeSystemd:
    """An AF_UNIX datagram socket standing in for systemd's notify socket; records (time, state)."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="ptynotify", dir="/tmp")  # short: socket paths max 107 bytes
        self.path = os.path.join(self.folder, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            self.received.extend((time.monotonic(), line) for line in data.decode().splitlines())

    def times(self, state: str) -> list[float]:
        return [t for t, s in self.received if s == state]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, PreviewListener, FakeSystemd]]:
    folder = tmp_path_factory.mktemp("service")
    (folder / "results").mkdir()
    config = daemon_config(folder / "results", final_iterations=10)
    config = dataclasses.replace(
        config, ingest=IngestConfig(endpoint=ANY_PORT, queue_messages=4, socket_buffer_bytes=65536,
                                                     on_new_start="finish_now"),
        workers=WorkersConfig(ranks=2, memory_budget_bytes=BUDGET_BYTES),
        service=ServiceConfig(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S))
    systemd = FakeSystemd()
    process = ServeProcess(config, folder, env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    context = zmq.Context()
    try:
        listener = PreviewListener(context, process.start()["preview"])
        yield process, listener, systemd
        listener.close()
    finally:
        process.stop()
        context.term()
        systemd.close()


def test_ready_once_every_rank_is_up_then_watchdog_pings(service: tuple[ServeProcess, PreviewListener,
                                                                        FakeSystemd]) -> None:
    process, _, systemd = service
    assert [s for _, s in systemd.received][0] == "READY=1" and len(systemd.times("READY=1")) == 1
    assert get_json(process.endpoints["http"] + "status")["workers_up"] == [0, 1]
    wait_for(lambda: len(systemd.times("WATCHDOG=1")) >= 4, 10, "watchdog pings")
    pings = systemd.times("WATCHDOG=1")
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert min(gaps) >= 0.9 * WATCHDOG_USEC / 2e6  # not more often than half the systemd timeout
    assert max(gaps) < WATCHDOG_USEC / 1e6  # and often enough that systemd would never have killed it


@pytest.mark.chaos
def test_a_series_over_the_memory_budget_is_refused_before_any_frame_is_lost(
        service: tuple[ServeProcess, PreviewListener, FakeSystemd], dosed_scan: Path) -> None:
    process, _, _ = service
    url = process.endpoints["http"]
    big = dataclasses.replace(ScanSource.from_file(dosed_scan).start, series_id="too-big", dtype="uint16",
                              positions_A=None, scan_shape=(200, 200), scan_step_A=(0.5, 0.5))
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(process.endpoints["ingest"])
        push.send_multipart(protocol.encode_series_start(big))
        pixels = protocol.np.zeros(big.detector_shape, protocol.np.uint16)
        for i in range(5):
            push.send_multipart(protocol.encode_frame("too-big", i, pixels))
        wait_for(lambda: series_count(url, "too-big", "rejected", "refused_series") == 5, 10, "refused frames")
    record = registry_series(get_json(url + "status"), "too-big")
    assert record["end_cause"] == "refused" and record["received"] == 0
    assert "budget" in record["refusal"] and "GiB" in record["refusal"]


def _stream_in_thread(process: ServeProcess, source: ScanSource, context: zmq.Context,
                      **options: object) -> FakeDetector:
    detector = FakeDetector(source, FakeDetectorOptions(**options), process.endpoints["ingest"],  # type: ignore[arg-type]
                            bind=False, context=context)
    detector.start()
    return detector


@pytest.mark.chaos
def test_a_stopped_worker_blocks_ingest_without_loss_and_stops_the_watchdog(
        service: tuple[ServeProcess, PreviewListener, FakeSystemd], dosed_scan: Path) -> None:
    process, listener, systemd = service
    url = process.endpoints["http"]
    source = ScanSource.from_file(dosed_scan)
    worker_pid = int(get_json(url + "status")["worker_pids"]["1"])
    with zmq.Context() as context:
        detector = _stream_in_thread(process, source, context, series_id="slowed", rate_hz=400.0)
        with detector:
            wait_for(lambda: series_count(url, "slowed", "received") > 20, 30, "frames flowing")
            os.kill(worker_pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                status = wait_for(lambda: (s := get_json(url + "status"))["ingest"]["workers"][1]["blocked_s"] > 0
                                  and s, 10, "the ingest to wait for the stopped worker")
                time.sleep(max(0.0, stopped_at + STOP_S - time.monotonic()))
            finally:
                os.kill(worker_pid, signal.SIGCONT)
                resumed_at = time.monotonic()
            detector.join(60)
        final = listener.wait_final("slowed")
    assert status["ingest"]["workers"][1]["queue_depth"] is not None  # visible to operators
    result = read_final(final["path"])
    assert final["status"] == "complete" and result["received"].all()
    assert list(result["ranks/frames_received"]) == group_sizes(source, "slowed")
    window = [t for t in systemd.times("WATCHDOG=1") if stopped_at + HEARTBEAT_TIMEOUT_S + 0.6 < t < resumed_at]
    assert window == [], "the watchdog kept pinging while a worker was hung"
    assert any(t > resumed_at for t in systemd.times("WATCHDOG=1")) or wait_for(
        lambda: any(t > resumed_at for t in systemd.times("WATCHDOG=1")), 5, "pings after the worker resumed")


def test_finish_now_ends_the_running_series_when_a_new_one_starts(
        service: tuple[ServeProcess, PreviewListener, FakeSystemd], dosed_scan: Path) -> None:
    process, listener, _ = service
    url = process.endpoints["http"]
    source = ScanSource.from_file(dosed_scan)
    with zmq.Context() as context:
        first = _stream_in_thread(process, source, context, series_id="old", rate_hz=60.0)
        with first:
            wait_for(lambda: series_count(url, "old", "received") >= 40, 30, "the first series to run")
            with _stream_in_thread(process, source, context, series_id="new") as second:
                second.join(60)
                final_new = listener.wait_final("new")
        final_old = listener.wait_final("old")
    assert registry_series(get_json(url + "status"), "old")["end_cause"] == "superseded"
    assert final_old["status"] == "superseded" and read_final(final_old["path"])["attrs"]["status"] == "superseded"
    assert final_new["status"] == "complete" and read_final(final_new["path"])["received"].all()


@pytest.mark.chaos
def test_sigterm_mid_series_stops_every_process_and_keeps_the_partial_result(
        service: tuple[ServeProcess, PreviewListener, FakeSystemd], dosed_scan: Path) -> None:
    process, listener, systemd = service
    url = process.endpoints["http"]
    status = get_json(url + "status")
    pids = [int(p) for p in status["worker_pids"].values()] + [int(process.endpoints["pid"])]
    with zmq.Context() as context:
        detector = _stream_in_thread(process, ScanSource.from_file(dosed_scan), context, series_id="cut",
                                     rate_hz=60.0)
        with detector:
            wait_for(lambda: series_count(url, "cut", "received") >= 40, 30, "frames of the series to be cut")
            code, elapsed = stop_by_sigterm(process, 10)
    assert code == 0 and elapsed < 10, (code, elapsed, process.log_tail())
    assert systemd.times("STOPPING=1"), "no STOPPING=1"
    final = listener.log.finals.get("cut")
    assert final is not None and final["status"] == "interrupted", listener.log.finals
    assert read_final(final["path"])["attrs"]["status"] == "interrupted"
    alive = [pid for pid in pids if _alive(pid)]
    assert alive == [], f"processes left behind: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie awaiting its parent counts as gone
        return stat.read().split()[2] != "Z"
