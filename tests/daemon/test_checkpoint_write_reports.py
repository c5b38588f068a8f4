"""Workers' failed checkpoint writes, from the worker's counter through its heartbeat to rank 0's ``/status``
and metric (no sockets; the real daemon's path is ``test_serve_checkpoint_write_faults.py``)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ptylive.daemon.service import messages
from ptylive.daemon.service.checkpoints import FAILURE_KINDS, FOLDER_OPERATIONS, checkpoint_status
from ptylive.daemon.service.metrics import DaemonMetrics
from ptylive.daemon.service.roster import Roster
from ptylive.daemon.worker.stats import WorkerStats
from tests.daemon.test_metrics import snapshot

pytestmark = pytest.mark.chaos  # issue 12: the "state folder turns read-only" row of docs/operations.md


def heartbeat(worker: int, stats: WorkerStats) -> messages.HeartbeatMessage:
    """What a worker between series sends, through the wire format."""
    header: messages.HeartbeatHeader = {"worker": worker, "series_id": None, "messages_taken": 0,
                                        "unknown_frames": 0, **stats.report(None, None)}
    decoded = messages.decode(messages.encode("heartbeat", header))
    assert isinstance(decoded, messages.HeartbeatMessage)
    return decoded


def write_failures(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("ptylive_checkpoint_failures_total", {"kind": "write"})


def test_a_workers_failed_writes_reach_status_and_the_metric_through_its_heartbeats() -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    roster = Roster(on_heartbeat=metrics.observe_report, n_workers=2)
    stats = [WorkerStats(), WorkerStats()]
    assert write_failures(registry) == 0  # exported from the start
    for worker in (0, 1):
        roster.record(heartbeat(worker, stats[worker]))
    stats[1].checkpoint_failures += 2
    roster.record(heartbeat(1, stats[1]))
    roster.record(heartbeat(1, stats[1]))  # the same cumulative count again: nothing new
    stats[0].checkpoint_failures += 1
    roster.record(heartbeat(0, stats[0]))
    status = checkpoint_status({"remove": 4}, roster.snapshot()["worker_reports"])
    assert status == {"failures": {"remove": 4, "write": 3}, "write_failures": {0: 1, 1: 2}}
    assert write_failures(registry) == 3
    assert registry.get_sample_value("ptylive_checkpoint_failures_total", {"kind": "remove"}) == 0


def test_a_count_that_goes_down_is_a_new_worker_process_and_counts_whole() -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    for failed in (5, 1, 3):  # 5, then a restarted worker's 1, then 2 more
        metrics.observe_report(0, {"checkpoint_failures": failed})
    assert write_failures(registry) == 5 + 1 + 2


def test_status_lists_only_workers_heard_from_and_rank_0s_kinds() -> None:
    assert checkpoint_status(dict.fromkeys(FOLDER_OPERATIONS, 0), {}) == {
        "failures": {"remove": 0, "write": 0}, "write_failures": {}}
    assert set(FAILURE_KINDS) == {*FOLDER_OPERATIONS, "write"}
