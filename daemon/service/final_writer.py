"""Final files written off the collector thread: one writer thread, a queue of jobs, outcomes handed back.

Writing a series' HDF5 file takes as long as the disk does; previews of the next series must not wait
for it. The collector submits a :class:`FinalJob` and goes on; the writer thread writes it with
:func:`~ptylive.daemon.service.results.write_final` and queues the :class:`FinalOutcome`, which the
collector takes on its next turn and publishes (its sockets stay on its own thread)::

    collector thread ──submit(job)──► jobs ──► writer thread: write(folder, job) ──► outcomes
           ▲                                                                            │
           └──────────────────────── take_done() ◄──────────────────────────────────────┘

A write that fails is logged with its traceback and comes back as an outcome with ``path`` None and
the ``error`` named, which ``/status`` (``finished``) and the ``series_end`` event show; the writer goes
on with the next job. :meth:`FinalWriter.close` writes what is queued (within its timeout) before it stops.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.messages import FinalMessage
from ptylive.daemon.service.results import write_final
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

WriteFinal = Callable[[Path, SeriesStart, SeriesGeometry, list[FinalMessage], dict[str, Any]], Path]


@dataclass(frozen=True, eq=False)
class FinalJob:
    """One series' file to write: its start, geometry and every worker's ``final`` message."""

    start: SeriesStart
    geometry: SeriesGeometry
    finals: list[FinalMessage]


@dataclass(frozen=True, eq=False)
class FinalOutcome:
    """What became of a job: the file written, or None and why not."""

    job: FinalJob
    path: Path | None
    error: str | None = None


class FinalWriter:
    """Writes :class:`FinalJob` files into ``folder`` on its own thread, in submission order.

    Parameters
    ----------
    folder : Path
    write : callable
        ``write(folder, start, geometry, finals, extra_attrs)`` → path; :func:`write_final` unless a test injects
        another.
    """

    def __init__(self, folder: Path, write: WriteFinal = write_final) -> None:
        self.folder, self._write = folder, write
        self._jobs: queue.SimpleQueue[FinalJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[FinalOutcome] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet written (or failed)."""
        with self._lock:
            return self._pending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ptylive-final-writer", daemon=True)
        self._thread.start()

    def submit(self, job: FinalJob) -> None:
        """Queue ``job``; never blocks."""
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def take_done(self) -> list[FinalOutcome]:
        """Every outcome ready since the last call, in the order the jobs were submitted."""
        outcomes = []
        while True:
            try:
                outcomes.append(self._done.get_nowait())
            except queue.Empty:
                return outcomes

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                outcome = self._outcome(job)
                with self._lock:
                    self._pending -= 1
                self._done.put(outcome)
        except BaseException as exc:  # kept for close(), never swallowed silently
            logger.exception("final writer thread failed")
            self._error = exc

    def _outcome(self, job: FinalJob) -> FinalOutcome:
        try:
            return FinalOutcome(job, self._write(self.folder, job.start, job.geometry, job.finals, {}))
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the files of the next ones
            logger.exception("series %r: final file not written", job.start.series_id)
            return FinalOutcome(job, None, f"{type(exc).__name__}: {exc}")

    def close(self, timeout_s: float = 30.0) -> list[FinalOutcome]:
        """Write what is queued (waiting at most ``timeout_s``), stop the thread; the outcomes not yet taken.

        Jobs still unwritten at the deadline are logged as errors (their files are lost).
        """
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("final writer still busy after %.0f s; %d final files not written", timeout_s,
                             self.pending)
        elif self.pending:
            logger.error("final writer never started; %d final files not written", self.pending)
        if self._error is not None:
            logger.error("final writer error: %r", self._error)
        return self.take_done()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every submitted job is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
