"""Metrics: names and units by Prometheus conventions, values from the snapshot, latency bookkeeping."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ptylive.daemon.service.metrics import DaemonMetrics, PreviewLatency
from ptylive.streaming.protocol import REJECT_REASONS
from ptylive.streaming.series import INGEST_REJECT_REASONS

DASHBOARD = Path(__file__).resolve().parents[2] / "systemd" / "grafana" / "ptylive-dashboard.json"
ALLOWED_LABELS = {"rank", "reason", "outcome", "kind", "le", "version", "python"}
BASE_UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_updates", "_info")
DIMENSIONLESS_GAUGES = {"ptylive_loss_per_frame", "ptylive_workers_up", "ptylive_worker_queue_depth",  # counts, loss
                        "ptylive_thread_up"}  # 1 or 0


def snapshot() -> dict[str, Any]:
    """A /status-shaped snapshot: 2 workers, a few counts of everything."""
    rejected = {reason: i for i, reason in enumerate(REJECT_REASONS + INGEST_REJECT_REASONS)}
    registry = {"frames": {"accepted": 300, "duplicates": 2}, "rejected": rejected, "missing_total": 7,
                "starts": {"current": 2, "queued": 1, "duplicate_id": 0, "queue_full": 0, "refused": 1}}
    workers = [{"worker": w, "forwarded": 150, "bytes_forwarded": 150 * 4608, "blocked_s": 0.5 * w,
                "queue_depth": 3 * w} for w in range(2)]
    reports = {w: {"totals": {"iterations": 10 + w, "exchange_bytes": 1e6, "exchange_wait_s": 0.2,
                              "consensus_wait_s": 0.01, "busy_s": 2.0, "series": 1},
                   "wait_fraction": 0.105, "staleness_max": 3, "loss_per_frame": 0.01,
                   "memory_host_bytes": 2**28, "memory_gpu_bytes": 0, "iteration_s": [0.1, 0.2]} for w in range(2)}
    buffered = {"max_bytes": 2**30, "buffered_bytes": 5 * 2**20, "peak_bytes": 6 * 2**20, "waits": 2,
                "per_worker_bytes": [2**20, 4 * 2**20]}
    return {"ingest": {"registry": registry, "workers": workers, "messages_received": 320, "buffered": buffered},
            "worker_reports": reports, "workers_fresh": 2, "coverage_ratio": 0.9375,
            "threads": {"ingest": "running", "collector": "dead: ValueError: tile outside the object",
                        "http": "running"},
            "worker_messages_failed": {"undecodable": 4, "unhandled": 1}}


def exposition(metrics: DaemonMetrics) -> dict[str, Any]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def test_snapshot_values_reach_the_exposition_with_rank_labels() -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    metrics.observe_report(1, snapshot()["worker_reports"][1])
    value = registry.get_sample_value
    assert value("ptylive_ingest_frames_total") == 300
    assert value("ptylive_ingest_rejected_total", {"reason": "non_finite"}) == (
        (REJECT_REASONS + INGEST_REJECT_REASONS).index("non_finite"))
    assert value("ptylive_ingest_missing_frames_total") == 7
    assert value("ptylive_worker_queue_depth", {"rank": "2"}) == 3  # worker 1 is MPI rank 2
    assert value("ptylive_ingest_blocked_seconds_total", {"rank": "2"}) == 0.5
    assert value("ptylive_ingest_buffered_bytes") == 5 * 2**20
    assert value("ptylive_exchange_wait_ratio", {"rank": "1"}) == pytest.approx(0.105)
    assert value("ptylive_memory_bytes", {"rank": "1", "kind": "host"}) == 2**28
    assert value("ptylive_memory_bytes", {"rank": "0", "kind": "host"}) > 10 * 2**20  # this process, measured
    assert value("ptylive_series_coverage_ratio") == 0.9375
    assert value("ptylive_thread_up", {"kind": "ingest"}) == 1
    assert value("ptylive_thread_up", {"kind": "collector"}) == 0
    assert value("ptylive_worker_messages_failed_total", {"reason": "undecodable"}) == 4
    assert value("ptylive_worker_messages_failed_total", {"reason": "unhandled"}) == 1
    assert value("ptylive_iteration_duration_seconds_count", {"rank": "2"}) == 2
    assert value("ptylive_iteration_duration_seconds_sum", {"rank": "2"}) == pytest.approx(0.3)
    assert value("ptylive_build_info", {"version": __import__("ptylive").__version__,
                                        "python": __import__("platform").python_version()}) == 1


def test_every_metric_follows_the_naming_conventions() -> None:
    families = exposition(DaemonMetrics(CollectorRegistry(), snapshot))
    for name, family in families.items():
        if name.endswith("_created"):  # prometheus_client's creation timestamps of counters and histograms
            continue
        assert name.startswith("ptylive_"), name
        assert not re.search(r"_(ms|milliseconds|mib|gib|kb|mb|percent)(_|$)", name), name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (name, sample.labels)
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
        if family.type == "gauge":
            assert name.endswith(BASE_UNIT_SUFFIXES) or name in DIMENSIONLESS_GAUGES, f"{name}: name its base unit"


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(ptylive_[a-z0-9_]+)", expr))
    return names


def exported_sample_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    metrics = DaemonMetrics(CollectorRegistry(), snapshot)
    metrics.observe_report(0, snapshot()["worker_reports"][0])
    metrics.observe_latencies([0.4])
    exported = exported_sample_names(metrics.exposition()[0].decode())
    missing = dashboard_metric_names() - exported
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def exported_labels() -> dict[str, set[str]]:
    """The labels of each exported sample name (the snapshot's metrics, one report and one latency observed)."""
    metrics = DaemonMetrics(CollectorRegistry(), snapshot)
    metrics.observe_report(0, snapshot()["worker_reports"][0])
    metrics.observe_latencies([0.4])
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.exposition()[0].decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


SELECTOR = re.compile(r"\b(ptylive_[a-z0-9_]+)(\{[^}]*\})?")


def test_the_dashboard_has_instance_and_rank_variables_over_exported_labels() -> None:
    """Template variables: ``instance`` (Prometheus' target label) and ``rank``, each multi-valued with All."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["instance", "rank"]
    labels = exported_labels()
    for name, variable in variables.items():
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "ptylive-prometheus"
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        query = variable["query"]["query"]
        assert query == variable["definition"]
        match = re.fullmatch(r"label_values\((ptylive_[a-z0-9_]+)(\{[^}]*\})?, (\w+)\)", query)
        assert match is not None and match.group(3) == name, query
        assert match.group(1) in labels, f"{name}: {match.group(1)} is not exported"
        if name == "rank":
            assert "rank" in labels[match.group(1)] and match.group(2) == '{instance=~"$instance"}', query


def test_every_dashboard_query_follows_the_variables() -> None:
    """Every metric in every panel filters ``instance``, and ``rank`` where the metric has that label."""
    dashboard = json.loads(DASHBOARD.read_text())
    labels = exported_labels()
    unfiltered = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for match in SELECTOR.finditer(target["expr"]):
                name, selector = match.group(1), match.group(2) or ""
                wanted = ['instance=~"$instance"'] + (['rank=~"$rank"'] if "rank" in labels[name] else [])
                if not all(term in selector for term in wanted):
                    unfiltered.append(f"{panel['title']}: {match.group(0)} (wants {', '.join(wanted)})")
    assert not unfiltered, "queries that ignore the variables:\n  " + "\n  ".join(unfiltered)


def test_preview_latency_counts_each_frame_once_in_acceptance_order() -> None:
    owner = np.array([0, 0, 1, 0, 1])
    received_s = np.array([1.0, 2.0, 1.5, 3.0, np.nan])
    latency = PreviewLatency()
    first = latency.newly_shown({"series_id": "s", "tiles": [{"worker": 0, "frames_used": 2},
                                                             {"worker": 1, "frames_used": 1}]}, received_s, owner, 10.0)
    assert sorted(first) == [8.0, 8.5, 9.0]  # worker 0's two earliest frames, worker 1's only received one
    again = latency.newly_shown({"series_id": "s", "tiles": [{"worker": 0, "frames_used": 3},
                                                             {"worker": 1, "frames_used": 1}]}, received_s, owner, 11.0)
    assert again == [8.0]  # only worker 0's third frame is new


@pytest.mark.chaos
def test_preview_latency_keeps_a_bounded_record_of_series() -> None:
    """Keyed by client series ids: 10 000 series keep the newest MAX_TILES (series, worker) pairs only."""
    latency = PreviewLatency()
    owner, received_s = np.array([0, 1]), np.array([1.0, 2.0])
    for k in range(10_000):
        header = {"series_id": f"s-{k}", "tiles": [{"worker": 0, "frames_used": 1}, {"worker": 1, "frames_used": 1}]}
        assert len(latency.newly_shown(header, received_s, owner, 5.0)) == 2
    assert len(latency.shown) == PreviewLatency.MAX_TILES and ("s-9999", 1) in latency.shown
