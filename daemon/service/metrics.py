"""Prometheus metrics of the daemon, exported once by rank 0 at ``/metrics``.

Workers never serve metrics: they report in their heartbeats (:mod:`ptylive.daemon.worker.stats`)
and rank 0 exposes everything from one injected :class:`~prometheus_client.CollectorRegistry`.
Most series are read at scrape time from the same snapshot ``/status`` serves (a custom
collector), so no count is kept twice; the two histograms are observed as events happen.

Conventions: ``ptylive_`` prefix, base units (seconds, bytes, ratios), counters end in ``_total``,
labels are low-cardinality only: ``rank`` (MPI rank; worker ``w`` is rank ``w + 1``), ``reason``,
``outcome``, ``kind``. Never a series id or a frame index.
"""

from __future__ import annotations

import logging
import platform
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import ptylive
from ptylive.daemon.engine.memory_plan import host_memory_bytes
from ptylive.daemon.http.access import REFUSAL_REASONS
from ptylive.daemon.service.checkpoints import FAILURE_KINDS
from ptylive.daemon.service.final_writer import WRITE_OUTCOMES

logger = logging.getLogger(__name__)

ITERATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class SnapshotCollector(Collector):
    """Turns the daemon's ``/status`` snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot()
        yield from self._ingest(status["ingest"], status.get("coverage_ratio"))
        yield from self._workers(status)
        yield from self._final_writes(status.get("final_writes", {}))
        yield self._threads(status.get("threads", {}))
        failed = _counter("ptylive_worker_messages_failed", "Worker messages rank 0's collector dropped, by reason: "
                          "undecodable, unhandled (handling raised; logged with the traceback).", ["reason"])
        for reason, count in status.get("worker_messages_failed", {}).items():
            failed.add_metric([reason], count)
        yield failed

    @staticmethod
    def _threads(threads: dict[str, str]) -> Metric:
        up = _gauge("ptylive_thread_up", "Rank 0's threads (kind = ingest, collector, http): 1 running, 0 not "
                    "(dead: /status threads says why).", ["kind"])
        for kind, state in threads.items():
            up.add_metric([kind], 1 if state == "running" else 0)
        return up

    @staticmethod
    def _final_writes(counts: dict[str, int]) -> Iterator[Metric]:
        writes = _counter("ptylive_final_writes", "Final files, by outcome: written (results folder), fallback "
                          "(fallback folder), failed (neither: the reconstruction is lost).", ["outcome"])
        for outcome in WRITE_OUTCOMES:
            writes.add_metric([outcome], counts.get(outcome, 0))
        retries = _counter("ptylive_final_write_retries", "Further attempts to write a final file in the results "
                           "folder after one failed.")
        retries.add_metric([], counts.get("retries", 0))
        yield from (writes, retries)

    @staticmethod
    def _ingest(ingest: dict[str, Any], coverage: float | None) -> Iterator[Metric]:
        registry = ingest["registry"]
        frames = _counter("ptylive_ingest_frames", "Distinct valid frames accepted by the ingest.")
        frames.add_metric([], registry["frames"]["accepted"])
        duplicates = _counter("ptylive_ingest_duplicate_frames", "Frames received again (counted, not used).")
        duplicates.add_metric([], registry["frames"]["duplicates"])
        rejected = _counter("ptylive_ingest_rejected", "Messages or frames rejected, by reason.", ["reason"])
        for reason, count in registry["rejected"].items():
            rejected.add_metric([reason], count)
        missing = _counter("ptylive_ingest_missing_frames", "Frames never received, over finished series.")
        missing.add_metric([], registry["missing_total"])
        messages = _counter("ptylive_ingest_messages", "Messages received from detectors.")
        messages.add_metric([], ingest["messages_received"])
        starts = _counter("ptylive_series_starts", "Series starts, by outcome.", ["outcome"])
        for outcome, count in registry["starts"].items():
            starts.add_metric([outcome], count)
        forwarded_bytes = _counter("ptylive_ingest_frame_bytes", "Pixel bytes forwarded to each worker.", ["rank"])
        forwarded = _counter("ptylive_ingest_forwarded_frames", "Frames forwarded to each worker.", ["rank"])
        blocked = _counter("ptylive_ingest_blocked_seconds", "Time the ingest waited for room in a worker's queue.",
                           ["rank"])
        depth = _gauge("ptylive_worker_queue_depth", "Messages waiting for a worker (as of its last heartbeat).",
                       ["rank"])
        for worker in ingest["workers"]:
            rank = str(worker["worker"] + 1)
            forwarded_bytes.add_metric([rank], worker["bytes_forwarded"])
            forwarded.add_metric([rank], worker["forwarded"])
            blocked.add_metric([rank], worker["blocked_s"])
            if worker.get("queue_depth") is not None:
                depth.add_metric([rank], worker["queue_depth"])
        yield from (frames, duplicates, rejected, missing, messages, starts, forwarded_bytes, forwarded, blocked, depth)
        if ingest.get("buffered") is not None:
            buffered = _gauge("ptylive_ingest_buffered_bytes", "Bytes forwarded to the workers and not yet taken by "
                              "them (as of their last heartbeats); bounded by ingest.max_buffered_bytes.")
            buffered.add_metric([], ingest["buffered"]["buffered_bytes"])
            yield buffered
        ratio = _gauge("ptylive_series_coverage_ratio",
                       "Fraction of the frames received, of the current series (between series: the last one).")
        if coverage is not None:
            ratio.add_metric([], coverage)
        yield ratio

    @staticmethod
    def _workers(status: dict[str, Any]) -> Iterator[Metric]:
        up = _gauge("ptylive_workers_up", "Workers whose heartbeat is fresh.")
        up.add_metric([], status.get("workers_fresh", 0))
        yield up
        families = {
            "iterations": _counter("ptylive_iterations", "Iterations run, all series.", ["rank"]),
            "exchange_bytes": _counter("ptylive_exchange_bytes", "Halo exchange bytes sent.", ["rank"]),
            "exchange_wait_s": _counter("ptylive_exchange_wait_seconds", "Time waiting on the halo exchange.",
                                        ["rank"]),
            "consensus_wait_s": _counter("ptylive_consensus_wait_seconds",
                                         "Time waiting on the per-tick consensus reduction.", ["rank"]),
            "busy_s": _counter("ptylive_iteration_seconds", "Time spent in iterations.", ["rank"]),
            "series": _counter("ptylive_series_completed", "Series this worker finished.", ["rank"]),
        }
        gauges = {
            "wait_fraction": _gauge("ptylive_exchange_wait_ratio", "Fraction of iteration time spent waiting.",
                                    ["rank"]),
            "staleness_max": _gauge("ptylive_exchange_staleness_updates",
                                    "Largest staleness of applied neighbour updates, recent.", ["rank"]),
            "loss_per_frame": _gauge("ptylive_loss_per_frame", "Loss per frame of the latest iteration.", ["rank"]),
        }
        dropped = _counter("ptylive_worker_rejected_frames", "Frames a worker could not use, by reason.",
                           ["rank", "reason"])
        memory = _gauge("ptylive_memory_bytes", "Memory per rank.", ["rank", "kind"])
        memory.add_metric(["0", "host"], host_memory_bytes())  # rank 0 itself: ingest, collector, HTTP
        for worker, report in sorted(status.get("worker_reports", {}).items(), key=lambda item: int(item[0])):
            rank = str(int(worker) + 1)
            for key, family in families.items():
                family.add_metric([rank], report.get("totals", {}).get(key, 0.0))
            for key, gauge in gauges.items():
                if report.get(key) is not None:
                    gauge.add_metric([rank], report[key])
            for reason, count in report.get("frames_rejected", {}).items():
                dropped.add_metric([rank, reason], count)
            memory.add_metric([rank, "host"], report.get("memory_host_bytes", 0))
            memory.add_metric([rank, "gpu"], report.get("memory_gpu_bytes", 0))
        yield from (*families.values(), *gauges.values(), dropped, memory)


class DaemonMetrics:
    """The daemon's metrics in ``registry`` (inject a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = registry
        self.iteration_duration = Histogram("ptylive_iteration_duration_seconds", "Duration of one iteration.",
                                            ["rank"], registry=registry, buckets=ITERATION_BUCKETS_S)
        self.preview_latency = Histogram("ptylive_frame_to_preview_latency_seconds",
                                         "From a frame's acceptance by the ingest to the first preview using it.",
                                         registry=registry, buckets=LATENCY_BUCKETS_S)
        self.http_refused = Counter("ptylive_http_refused", "State-changing HTTP requests refused, by reason.",
                                    ["reason"], registry=registry)
        for reason in REFUSAL_REASONS:  # every reason exported from the start, at 0
            self.http_refused.labels(reason)
        self.checkpoint_failures = Counter("ptylive_checkpoint_failures",
                                           "Failed operations on the checkpoint state folder, by kind: remove "
                                           "(rank 0), write (the workers' checkpoints, from their heartbeats).",
                                           ["kind"], registry=registry)
        for kind in FAILURE_KINDS:
            self.checkpoint_failures.labels(kind)
        self._checkpoint_writes_failed: dict[int, int] = {}  # worker -> its heartbeats' count, as last counted
        build = Gauge("ptylive_build_info", "Build information (always 1).", ["version", "python"], registry=registry)
        build.labels(ptylive.__version__, platform.python_version()).set(1)
        registry.register(SnapshotCollector(snapshot))

    def observe_report(self, worker: int, report: dict[str, Any]) -> None:
        """A worker heartbeat: its new iteration durations go into the histogram, its new checkpoint write
        failures into ``ptylive_checkpoint_failures_total{kind="write"}`` (collector thread)."""
        histogram = self.iteration_duration.labels(str(worker + 1))
        for seconds in report.get("iteration_s", ()):
            histogram.observe(float(seconds))
        self._count_checkpoint_writes(worker, int(report.get("checkpoint_failures", 0)))

    def _count_checkpoint_writes(self, worker: int, failed: int) -> None:
        """Add what a worker's cumulative ``checkpoint_failures`` grew by since its previous heartbeat (a count
        that went down is a new worker process: all of it is new)."""
        before = self._checkpoint_writes_failed.get(worker, 0)
        new = failed - before if failed >= before else failed
        self._checkpoint_writes_failed[worker] = failed
        if new > 0:
            self.checkpoint_failures.labels("write").inc(new)

    def count_refused(self, reason: str) -> None:
        """A request the HTTP server refused (HTTP thread); ``reason`` is one of ``access.REFUSAL_REASONS``."""
        self.http_refused.labels(reason).inc()

    def count_checkpoint_failure(self, operation: str) -> None:
        """A failed operation on the state folder (``checkpoints.FOLDER_OPERATIONS``; collector thread)."""
        self.checkpoint_failures.labels(operation).inc()

    def observe_latencies(self, seconds: Iterable[float]) -> None:
        for value in seconds:
            self.preview_latency.observe(float(value))

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PreviewLatency:
    """Frame-to-preview latency: a frame of worker ``w`` shows once ``w``'s tile reports ``frames_used`` covering it.

    A worker uses the frames it received, in the order the ingest accepted them, so the first ``frames_used``
    acceptance times of its probe group are the frames in the preview. What each tile showed is kept for the
    newest ``MAX_TILES`` (series, worker) pairs only: keyed by client series ids, it once grew with every series.
    """

    MAX_TILES = 1024

    def __init__(self) -> None:
        self.shown: OrderedDict[tuple[str, int], int] = OrderedDict()

    def newly_shown(self, header: dict[str, Any], received_s: Any, owner: Any, now: float) -> list[float]:
        """Latencies (s) of the frames this preview shows for the first time.

        Parameters
        ----------
        header : the published preview's header (``series_id``, ``tiles`` with ``worker`` and ``frames_used``)
        received_s : (n,) float64, monotonic acceptance time of each frame (NaN if not received)
        owner : (n,) int, worker of each frame
        """
        import numpy as np

        latencies: list[float] = []
        for tile in header["tiles"]:
            worker, used = int(tile["worker"]), int(tile.get("frames_used") or 0)
            key = (str(header["series_id"]), worker)
            before = self.shown.get(key, 0)
            if used <= before:
                continue
            times = received_s[owner == worker]
            accepted = np.sort(times[np.isfinite(times)])
            latencies.extend((now - accepted[before:used]).tolist())
            self.shown[key] = used
            self.shown.move_to_end(key)
            while len(self.shown) > self.MAX_TILES:
                self.shown.popitem(last=False)
        return latencies
