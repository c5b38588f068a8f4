"""What a worker reports to rank 0 in its heartbeats: cumulative counters over every series, new
iteration durations, memory. Rank 0 turns them into Prometheus metrics (:mod:`ptylive.daemon.service.metrics`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ptylive.daemon.engine.exchange.consensus import Consensus
from ptylive.daemon.engine.memory_plan import gpu_memory_bytes, host_memory_bytes
from ptylive.daemon.service.messages import WorkerReport
from ptylive.daemon.worker.refine import StreamRun

logger = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    """Counters of finished series plus the running one; ``report`` sends only new iteration durations."""

    backend: str = "numpy"
    finished: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("iterations", "exchange_bytes", "exchange_wait_s", "consensus_wait_s", "busy_s", "series"), 0.0))
    rejected: dict[str, int] = field(default_factory=dict)  # frames dropped on this worker, finished series
    checkpoint_failures: int = 0  # checkpoint writes that failed, all series (rank 0 shows them: /status, metrics)
    _reported_iterations: int = 0

    @staticmethod
    def _of(run: StreamRun, consensus: Consensus) -> dict[str, float]:
        stats = run.exchanger.stats
        return {"iterations": run.iterations, "exchange_bytes": stats.bytes_sent, "exchange_wait_s": stats.wait_s,
                "consensus_wait_s": consensus.wait_s, "busy_s": sum(run.iteration_s), "series": 0}

    def report(self, run: StreamRun | None, consensus: Consensus | None) -> WorkerReport:
        """Heartbeat fields: ``totals`` (cumulative), ``iteration_s`` (new since the last report), gauges, and
        ``checkpoint_failures`` (cumulative)."""
        current = self._of(run, consensus) if run is not None and consensus is not None else {}
        totals = {k: v + current.get(k, 0.0) for k, v in self.finished.items()}
        new: list[float] = []
        if run is not None:
            new = run.iteration_s[self._reported_iterations:]
            self._reported_iterations = len(run.iteration_s)
        staleness = run.exchanger.stats.staleness[-64:] if run is not None else []
        per_frame = (run.loss_history[-1] / max(run.frames_history[-1], 1)
                     if run is not None and run.loss_history else None)
        busy = totals["busy_s"]
        rejected = dict(self.rejected)
        for reason, count in (run.store.rejected.items() if run is not None else ()):
            rejected[reason] = rejected.get(reason, 0) + count
        return {"totals": totals, "iteration_s": new, "loss_per_frame": per_frame, "frames_rejected": rejected,
                "staleness_max": max(staleness, default=0),
                "wait_fraction": (totals["exchange_wait_s"] + totals["consensus_wait_s"]) / busy if busy else 0.0,
                "memory_host_bytes": host_memory_bytes(), "memory_gpu_bytes": gpu_memory_bytes(self.backend),
                "checkpoint_failures": self.checkpoint_failures}

    def finish(self, run: StreamRun, consensus: Consensus) -> None:
        """Fold a finished series into the totals (call after its last report)."""
        for key, value in self._of(run, consensus).items():
            self.finished[key] += value
        self.finished["series"] += 1
        for reason, count in run.store.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        self._reported_iterations = 0
