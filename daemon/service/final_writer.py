"""Final files written off the collector thread: one writer thread, a queue of jobs, outcomes handed back.

Writing a series' HDF5 file takes as long as the disk does; previews of the next series must not wait
for it. The collector submits a :class:`FinalJob` and goes on; the writer thread writes it with
:func:`~ptylive.daemon.service.results.write_final` and queues the :class:`FinalOutcome`, which the
collector takes on its next turn and publishes (its sockets stay on its own thread)::

    collector thread ──submit(job)──► jobs ──► writer thread: write(folder, job) ──► outcomes
           ▲                                     │    ▲                                  │
           │                          failed: retries (due times; other jobs go first)   │
           └──────────────────────── take_done() ◄───────────────────────────────────────┘

A volume is not lost to a failing results folder (disk full, read-only, gone). A write that fails is
logged and tried again :data:`RETRY_DELAYS_S` later (3 attempts over 2.5 s by default); the thread
writes other series' files meanwhile, so one failing series holds up no other. After the last attempt the
file goes to the fallback folder (``[output] fallback_folder``, else :func:`default_fallback_folder`):
the outcome then has the fallback ``path``, ``fallback`` True and the results folder's ``error``. Only
when the fallback fails too is ``path`` None (``write_failed`` in ``/status`` and the ``series_end``
event). :meth:`FinalWriter.close` writes what is queued (within its timeout) before it stops; a job
already failed once then goes to the fallback at once, without waiting out its retries.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.messages import FinalMessage
from ptylive.daemon.service.results import write_final
from ptylive.daemon.service.virtual_mosaic import VirtualSnapshot
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

WriteFinal = Callable[..., Path]  # (folder, start, geometry, finals, extra_attrs[, virtual=]) -> path: write_final's

#: Waits before the 2nd, 3rd ... attempt in the results folder; after the last, the fallback folder.
RETRY_DELAYS_S = (0.5, 2.0)
#: Outcomes counted in :meth:`FinalWriter.counts` (the ``outcome`` label of ``ptylive_final_writes_total``).
WRITE_OUTCOMES = ("written", "fallback", "failed")


def default_fallback_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """The fallback folder when ``[output] fallback_folder`` is unset.

    systemd's ``$RUNTIME_DIRECTORY`` (``/run/ptylive`` for the unit), else ``$XDG_RUNTIME_DIR``, else the
    temporary folder, with a ``ptylive-fallback`` subfolder (``ptylive-fallback-<uid>`` in the shared
    temporary folder). These are on another file system than the results, so a full or read-only results
    disk does not take the fallback with it; but they are in memory and cleared when the service stops:
    copy a file from there before a restart, or set ``fallback_folder`` to a disk that keeps it.
    """
    for variable in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        base = environ.get(variable, "").split(":")[0]  # RUNTIME_DIRECTORY lists one per RuntimeDirectory=
        if base:
            return Path(base) / "ptylive-fallback"
    return Path(tempfile.gettempdir()) / f"ptylive-fallback-{os.getuid()}"


@dataclass(frozen=True, eq=False)
class FinalJob:
    """One series' file to write: its start, geometry, every worker's ``final`` message, attributes beyond
    :func:`write_final`'s own (a recovered series': which workers' tiles were missing), and the series' virtual
    images when workers sent any (the file's ``virtual/`` group)."""

    start: SeriesStart
    geometry: SeriesGeometry
    finals: list[FinalMessage]
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    virtual: VirtualSnapshot | None = None
    keep_checkpoints: bool = False  # a recovered series refined on after this file: its checkpoints stay


@dataclass(frozen=True, eq=False)
class FinalOutcome:
    """What became of a job: the file written (in the fallback folder if ``fallback``), or None.

    ``error`` says why the results folder failed (also when the fallback then took the file).
    """

    job: FinalJob
    path: Path | None
    error: str | None = None
    fallback: bool = False


@dataclass(eq=False)
class _Attempts:
    """A job and how its attempts in the results folder went (writer thread only)."""

    job: FinalJob
    failed: int = 0
    error: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class FinalWriter:
    """Writes :class:`FinalJob` files into ``folder`` on its own thread, retrying, else into a fallback folder.

    Parameters
    ----------
    folder : Path
        The results folder.
    write : callable
        ``write(folder, start, geometry, finals, extra_attrs)`` → path, given ``virtual=`` (a
        :class:`~ptylive.daemon.service.virtual_mosaic.VirtualSnapshot`) too for a job with virtual images;
        :func:`write_final` unless a test injects another. It must leave no partial file when it raises
        (:func:`write_final` does not).
    fallback_folder : Path, optional
        Where a file goes once every attempt in ``folder`` failed (created, mode 0700, when first needed);
        :func:`default_fallback_folder` if None. Must not be ``folder``.
    retry_delays_s : tuple of float
        Waits before each further attempt in ``folder`` (:data:`RETRY_DELAYS_S`; ``()``: one attempt).
    """

    def __init__(self, folder: Path, write: WriteFinal = write_final, *, fallback_folder: Path | None = None,
                 retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.folder, self._write = folder, write
        self.fallback_folder = fallback_folder if fallback_folder is not None else default_fallback_folder()
        if os.path.abspath(self.fallback_folder) == os.path.abspath(folder):
            raise ValueError(f"the fallback folder {self.fallback_folder} is the results folder; expected another")
        self.retry_delays_s = tuple(retry_delays_s)
        self._jobs: queue.SimpleQueue[FinalJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[FinalOutcome] = queue.SimpleQueue()
        self._retries: list[tuple[float, int, _Attempts]] = []  # (due, tie-break, attempts): writer thread only
        self._order = itertools.count()
        self._pending = 0
        self._counts = dict.fromkeys((*WRITE_OUTCOMES, "retries"), 0)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet written (or failed), retries included."""
        with self._lock:
            return self._pending

    def counts(self) -> dict[str, int]:
        """Final files by outcome (:data:`WRITE_OUTCOMES`) and ``retries`` (further attempts in the results
        folder), since the start: ``/status``' ``final_writes`` and the metrics."""
        with self._lock:
            return dict(self._counts)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ptylive-final-writer", daemon=True)
        self._thread.start()

    def submit(self, job: FinalJob) -> None:
        """Queue ``job``; never blocks."""
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def take_done(self) -> list[FinalOutcome]:
        """Every outcome ready since the last call, in the order they were reached (a retried job comes after
        the jobs written during its wait)."""
        outcomes = []
        while True:
            try:
                outcomes.append(self._done.get_nowait())
            except queue.Empty:
                return outcomes

    def _run(self) -> None:
        try:
            closing = False
            while not closing or self._retries:
                if not closing:
                    closing = self._take_next_job()
                self._retry_due(closing)
        except BaseException as exc:  # kept for close(), never swallowed silently
            logger.exception("final writer thread failed")
            self._error = exc

    def _take_next_job(self) -> bool:
        """Wait for a job (at most until the next retry is due) and make its first attempt; True once closing."""
        wait_s = None if not self._retries else max(self._retries[0][0] - time.monotonic(), 0.0)
        try:
            job = self._jobs.get(timeout=wait_s)
        except queue.Empty:  # a retry is due
            return False
        if job is None:
            return True
        self._attempt(_Attempts(job), closing=False)
        return False

    def _retry_due(self, closing: bool) -> None:
        """Attempt each retry that is due (every one when closing: straight to the fallback)."""
        while self._retries and (closing or self._retries[0][0] <= time.monotonic()):
            self._attempt(heapq.heappop(self._retries)[2], closing)

    def _attempt(self, attempts: _Attempts, closing: bool) -> None:
        """One attempt in the results folder (none once closing after a failure), then a retry or the fallback."""
        job = attempts.job
        if not (closing and attempts.failed):
            if attempts.failed:
                with self._lock:
                    self._counts["retries"] += 1
            try:
                path = self._write_job(self.folder, job)
            except Exception as exc:  # noqa: BLE001 - one bad series must not stop the files of the next ones
                attempts.failed, attempts.error = attempts.failed + 1, _describe(exc)
                logger.warning("series %r: final file not written in %s (attempt %d of %d): %s", job.start.series_id,
                               self.folder, attempts.failed, len(self.retry_delays_s) + 1, attempts.error,
                               exc_info=attempts.failed == 1)  # the traceback once
            else:
                self._finish(FinalOutcome(job, path), "written")
                return
        if attempts.failed <= len(self.retry_delays_s) and not closing:
            due_s = time.monotonic() + self.retry_delays_s[attempts.failed - 1]
            heapq.heappush(self._retries, (due_s, next(self._order), attempts))
            return
        self._to_fallback(attempts)

    def _write_job(self, folder: Path, job: FinalJob) -> Path:
        """``write(folder, start, geometry, finals, extra_attrs)``, with ``virtual=`` only when the job has virtual
        images (so a writer that takes none still serves the jobs without)."""
        extra = {"virtual": job.virtual} if job.virtual is not None else {}
        return self._write(folder, job.start, job.geometry, job.finals, job.extra_attrs, **extra)

    def _to_fallback(self, attempts: _Attempts) -> None:
        job, series_id = attempts.job, attempts.job.start.series_id
        logger.error("series %r: final file not written in %s after %d attempts (%s); writing it to the fallback "
                     "folder %s", series_id, self.folder, attempts.failed, attempts.error, self.fallback_folder)
        try:
            self.fallback_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._write_job(self.fallback_folder, job)
        except Exception as exc:  # noqa: BLE001 - as above
            logger.exception("series %r: final file not written: not in %s, nor in the fallback folder %s; "
                             "the reconstruction is lost", series_id, self.folder, self.fallback_folder)
            error = f"{attempts.error}; fallback folder: {_describe(exc)}"
            self._finish(FinalOutcome(job, None, error), "failed")
            return
        logger.error("series %r: final file written to the fallback folder, as %s: move it to %s", series_id, path,
                     self.folder)
        self._finish(FinalOutcome(job, path, attempts.error, fallback=True), "fallback")

    def _finish(self, outcome: FinalOutcome, counted: str) -> None:
        self._done.put(outcome)  # before pending drops, so that take_done() after wait_idle() has it
        with self._lock:
            self._pending -= 1
            self._counts[counted] += 1

    def close(self, timeout_s: float = 30.0) -> list[FinalOutcome]:
        """Write what is queued (waiting at most ``timeout_s``), stop the thread; the outcomes not yet taken.

        A job that already failed in the results folder goes to the fallback at once. Jobs still unwritten at
        the deadline are logged as errors (their files are lost).
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
