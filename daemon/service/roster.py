"""Rank 0's roster of worker ranks: who said hello (and its pid), who said bye, heartbeats, reported errors.

The collector thread records each worker message (:meth:`Roster.record`); the supervisor and HTTP threads
read copies (:meth:`Roster.snapshot`, :meth:`said_hello`, :meth:`said_bye`, :meth:`heartbeat_ages`). Any
message from a worker counts as a sign of life; a ``heartbeat`` also replaces that worker's report and is
passed to the ``on_heartbeat`` hook (metrics), on the collector thread and outside the roster's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptylive.daemon.service.messages import RankMessage

logger = logging.getLogger(__name__)

HeartbeatHook = Callable[[int, dict[str, Any]], None]


class Roster:
    """Thread-safe record of every worker rank.

    Parameters
    ----------
    on_heartbeat : callable, optional
        ``on_heartbeat(worker, report)`` for each heartbeat (e.g. :meth:`DaemonMetrics.observe_report`).
    clock : callable
        Monotonic seconds (injected by tests).
    n_workers : int or None
        Workers are ``0 … n_workers − 1``; a message naming another is counted in :attr:`foreign` and ignored
        (one fake heartbeat for "worker 7" once stopped the watchdog's pings for good). None: any.
    """

    MAX_ERRORS = 100  # worker errors kept for /status (the newest)

    def __init__(self, on_heartbeat: HeartbeatHook | None = None, clock: Callable[[], float] = time.monotonic,
                 n_workers: int | None = None) -> None:
        self._on_heartbeat, self._clock, self.n_workers = on_heartbeat, clock, n_workers
        self.foreign = 0
        self._pids: dict[int, int] = {}
        self._byes: set[int] = set()
        self._reports: dict[int, dict[str, Any]] = {}
        self._seen_s: dict[int, float] = {}
        self._errors: deque[dict[str, Any]] = deque(maxlen=self.MAX_ERRORS)
        self._lock = threading.Lock()

    def record(self, message: RankMessage) -> None:
        """Note ``message``'s worker as alive; keep what a ``hello``, ``heartbeat``, ``bye`` or ``error`` says."""
        try:
            worker = int(message.header.get("worker", -1))
        except (TypeError, ValueError):
            worker = -1
        if self.n_workers is not None and not 0 <= worker < self.n_workers:
            with self._lock:
                self.foreign += 1
            logger.warning("message %r from unknown worker %r ignored", message.htype, message.header.get("worker"))
            return
        with self._lock:
            self._seen_s[worker] = self._clock()
            if message.htype == "heartbeat":
                report: dict[str, Any] = dict(message.header)
                self._reports[worker] = report
            elif message.htype == "hello":
                self._pids[worker] = int(message.header["pid"])
            elif message.htype == "bye":
                self._byes.add(worker)
            elif message.htype == "error":
                error: dict[str, Any] = dict(message.header)
                self._errors.append(error)
                logger.error("worker %d reports: %s", worker, message.header.get("error"))
        if message.htype == "heartbeat" and self._on_heartbeat is not None:
            self._on_heartbeat(worker, report)

    def said_hello(self) -> dict[int, int]:
        """Worker → pid of every worker that said hello."""
        with self._lock:
            return dict(self._pids)

    def said_bye(self) -> set[int]:
        with self._lock:
            return set(self._byes)

    def messages_taken(self, worker: int) -> int | None:
        """Messages ``worker`` had taken from the ingest at its last heartbeat; None before its first."""
        with self._lock:
            report = self._reports.get(worker)
        taken = None if report is None else report.get("messages_taken")
        return taken if isinstance(taken, int) else None

    def heartbeat_ages(self) -> dict[int, float]:
        """Worker → seconds since its last message."""
        now = self._clock()
        with self._lock:
            return {w: now - t for w, t in self._seen_s.items()}

    def snapshot(self) -> dict[str, Any]:
        """The roster's part of ``/status``."""
        now = self._clock()
        with self._lock:
            return {"workers_up": sorted(self._pids), "worker_pids": dict(self._pids),
                    "worker_reports": {w: dict(r) for w, r in self._reports.items()},
                    "heartbeat_age_s": {w: now - t for w, t in self._seen_s.items()},
                    "worker_errors": list(self._errors)}


def process_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` runs on this host; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


class DeathWatch:
    """Names each worker whose process died, once: its worker index, MPI rank and pid (from its hello).

    Rank 0 calls :meth:`check` every tenth of a second; a worker that dies takes the MPI job down within about
    two seconds (mpiexec ends every rank), so the log line is written first where it can be. The ranks run on
    rank 0's host (the internal sockets are loopback), so the pid is looked up in its ``/proc``; without one
    (not Linux) nothing is checked.
    """

    def __init__(self, roster: Roster, alive: Callable[[int], bool] = process_alive,
                 proc: Path = Path("/proc")) -> None:
        self.roster, self._alive = roster, alive
        self.enabled = (proc / "self").exists()
        self.dead: dict[int, int] = {}  # worker -> pid of each one reported dead

    def check(self) -> list[tuple[int, int]]:
        """``(worker, pid)`` of workers found dead since the last call (a worker that said bye has stopped)."""
        if not self.enabled:
            return []
        byes = self.roster.said_bye()
        found = [(worker, pid) for worker, pid in sorted(self.roster.said_hello().items())
                 if worker not in self.dead and worker not in byes and not self._alive(pid)]
        for worker, pid in found:
            self.dead[worker] = pid
            logger.error("worker %d (MPI rank %d, pid %d) died; its tile is lost unless it has a checkpoint",
                         worker, worker + 1, pid)
        return found
