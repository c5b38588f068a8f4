"""A rank-0 thread that dies is reported: ``/status`` ``threads`` and ``ok``, the metric, the log, no more
watchdog pings (issue 12, series lifecycle). Rank 0 runs in this process, without workers or MPI; the
exception is injected into one step of the thread's loop once the daemon was healthy."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry

from ptylive.daemon.service.config import ReconstructionConfig, loopback_config
from ptylive.daemon.service.notify import Watchdog
from ptylive.daemon.service.supervisor import Rank0
from tests.daemon.serve_harness import get_json, wait_for

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md

#: thread -> (the part of Rank0 that owns it, a method its loop calls every pass)
LOOP_STEPS = {"ingest": ("ingest", "_end_idle"), "collector": ("collector", "_publish_finished"),
              "http": ("http", "_server.service_actions")}


@pytest.fixture
def rank0(tmp_path: Path) -> Iterator[Rank0]:
    context = zmq.Context()
    running = Rank0(loopback_config(tmp_path, 2, ReconstructionConfig()), context, CollectorRegistry())
    try:
        yield running
    finally:
        try:
            running.close()
        except ValueError:  # the ingest's injected error, re-raised by its join
            pass
        context.term()


def inject(rank0: Rank0, thread: str, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make ``thread``'s loop raise ``ValueError`` once the returned event is set."""
    owner: Any = getattr(rank0, LOOP_STEPS[thread][0])
    *path, name = LOOP_STEPS[thread][1].split(".")
    for attribute in path:
        owner = getattr(owner, attribute)
    step: Callable[..., Any] = getattr(owner, name)
    trigger = threading.Event()

    def failing(*args: Any) -> Any:
        if trigger.is_set():
            raise ValueError(f"injected into the {thread} thread")
        return step(*args)

    monkeypatch.setattr(owner, name, failing)
    return trigger


@pytest.mark.parametrize("thread", list(LOOP_STEPS))
def test_a_dead_thread_shows_in_status_and_stops_the_watchdog(
        rank0: Rank0, thread: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(rank0.collector.roster, "heartbeat_ages", lambda: {0: 0.1, 1: 0.1})  # workers fine
    pings: list[str] = []
    watchdog = Watchdog(1.0, rank0.healthy, send=lambda state: pings.append(state) is None)
    trigger = inject(rank0, thread, monkeypatch)
    for part in (rank0.ingest, rank0.collector, rank0.http):
        part.start()
    wait_for(lambda: all(s == "running" for s in rank0.threads().values()), 5.0, "every thread running")
    status = get_json(rank0.http.url + "status")
    assert status["ok"] is True and set(status["threads"].values()) == {"running"}
    assert watchdog.maybe_ping(0.0) and pings == ["WATCHDOG=1"]

    trigger.set()
    wait_for(lambda: rank0.threads()[thread].startswith("dead"), 5.0, f"the {thread} thread to die")
    status = rank0.status() if thread == "http" else get_json(rank0.http.url + "status")
    assert status["threads"][thread] == f"dead: ValueError: injected into the {thread} thread"
    assert {name: state for name, state in status["threads"].items() if name != thread} == {
        name: "running" for name in LOOP_STEPS if name != thread}
    assert status["ok"] is False
    assert not watchdog.maybe_ping(10.0) and not watchdog.maybe_ping(20.0) and pings == ["WATCHDOG=1"]
    assert rank0.metrics.registry.get_sample_value("ptylive_thread_up", {"kind": thread}) == 0
    assert rank0.metrics.registry.get_sample_value("ptylive_thread_up", {"kind": "collector" if thread != "collector"
                                                                          else "ingest"}) == 1
    with caplog.at_level(logging.ERROR, logger="ptylive.daemon.service.supervisor"):
        rank0.report_dead_threads()
        rank0.report_dead_threads()  # once per thread
    said = [r.getMessage() for r in caplog.records if r.name == "ptylive.daemon.service.supervisor"]
    assert said == [f"rank 0's {thread} thread died (ValueError: injected into the {thread} thread); WATCHDOG=1 "
                    f"withheld from now on, so systemd restarts the service"]


def test_threads_before_start_are_stopped_and_not_ok(rank0: Rank0) -> None:
    assert rank0.threads() == {"ingest": "stopped", "collector": "stopped", "http": "stopped"}
    assert rank0.status()["ok"] is False
