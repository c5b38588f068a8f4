"""Rank 0's collector: one thread reads every worker's messages and hands each to the piece it concerns.

A PULL socket (bound) receives what every worker pushes (:mod:`ptylive.daemon.service.messages`)::

                       ┌─► Roster        hello, heartbeat, bye, error            (roster.py)
    workers ─► PULL ───┼─► SeriesViews   preview, virtual, pattern, final → mosaics (series_views.py)
          (this thread)│      └─ every final in ─► FinalWriter thread ─► file     (final_writer.py)
                       └─► Publisher     previews and virtual images ≤ rate_hz,   (publisher.py)
                                         series start / end, on the preview PUB and as SSE events

The thread polls the PULL, publishes the latest series' mosaic when it changed and a preview is due (its
virtual images likewise, on their own clock), and publishes each final file the writer finished (so both
sockets stay on this thread). HTTP threads
read the roster and the views directly; they never wait on this thread or on a file being written.

What the collector needs of rank 0 comes in :class:`CollectorHooks`, fixed at construction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.final_writer import FinalOutcome, FinalWriter
from ptylive.daemon.service.publisher import Publisher
from ptylive.daemon.service.roster import HeartbeatHook, Roster
from ptylive.daemon.service.series_views import SeriesLookup, SeriesViews
from ptylive.streaming.ingest import binds_every_interface
from ptylive.streaming.series_book import SeriesProgress

logger = logging.getLogger(__name__)

POLL_MS = 50


def _ignore(*_: Any) -> None:
    """The default hook: nothing to report to."""


@dataclass(frozen=True)
class CollectorHooks:
    """Rank 0's answers and listeners, called on the collector thread.

    Attributes
    ----------
    series : callable
        ``series(series_id)`` → ``(start, geometry)`` of an admitted series, or None; once per series.
    progress : callable
        ``progress(series_id)`` → the ingest's :class:`SeriesProgress` (with its arrays) or None; once per
        published preview, for its ``frames_received``.
    on_heartbeat : callable
        ``on_heartbeat(worker, report)`` for each worker heartbeat (metrics).
    on_preview : callable
        ``on_preview(header, progress, geometry)`` after each published preview (frame-to-preview latency).
    on_finished : callable
        ``on_finished(outcome)`` after each final file's outcome is announced (its checkpoints are removed).
    final_attrs : callable
        ``final_attrs(series_id)`` → attributes of the series' result file beyond the workers' (a DECTRIS series'
        scan source, detector count and ``count_mismatch``); once per series, when every final is in.
    """

    series: SeriesLookup
    progress: Callable[[str], SeriesProgress | None]
    on_heartbeat: HeartbeatHook = _ignore
    on_preview: Callable[[dict[str, Any], SeriesProgress | None, SeriesGeometry], None] = _ignore
    on_finished: Callable[[FinalOutcome], None] = _ignore
    final_attrs: Callable[[str], dict[str, Any]] = lambda _: {}


class Collector:
    """Collects worker messages on ``pull_endpoint`` (bound) and publishes on ``pub_endpoint`` (bound).

    Parameters
    ----------
    hooks : CollectorHooks
    output_folder : Path
        Where final files are written.
    n_workers : int
    rate_hz : float
        Most previews published per second.
    writer : FinalWriter, optional
        Writes the final files (a :class:`FinalWriter` into ``output_folder`` unless a test injects one).

    Attributes
    ----------
    roster : Roster
    views : SeriesViews
    publisher : Publisher
    writer : FinalWriter
    bad_messages : int
        Worker messages that did not decode (logged).
    failed_messages : int
        Decoded worker messages whose handling raised (logged with the traceback; the thread goes on). The
        thread ends only on a failure outside one message's handling (its sockets): ``thread_state`` says so.
    """

    def __init__(self, context: zmq.Context, pull_endpoint: str, pub_endpoint: str, hooks: CollectorHooks,
                 output_folder: Path, n_workers: int, rate_hz: float = 2.0, writer: FinalWriter | None = None,
                 history: int = 16) -> None:
        self.hooks = hooks
        self._pull, self._pub = context.socket(zmq.PULL), context.socket(zmq.PUB)
        self._pull.linger, self._pub.linger = 0, 1000
        self._pull.bind(pull_endpoint)
        self._pub.bind(pub_endpoint)
        self.pull_endpoint = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if binds_every_interface(self.pub_endpoint):
            logger.warning("preview PUB bound to every interface (%s): whoever reaches this machine reads every "
                           "preview and each final file's path; bind one address (preview.endpoint) or firewall "
                           "the port", self.pub_endpoint)
        self.roster = Roster(hooks.on_heartbeat, n_workers=n_workers)
        self.views = SeriesViews(hooks.series, n_workers, history, final_attrs=hooks.final_attrs)
        self.publisher = Publisher(self._pub, rate_hz)
        self.writer = writer if writer is not None else FinalWriter(output_folder)
        self.events = self.publisher.events  # the viewer's server-sent events
        self.bad_messages = self.failed_messages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self.writer.start()
        self._thread = threading.Thread(target=self._run, name="ptylive-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._pull.poll(POLL_MS):
                    while True:
                        try:
                            parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(parts)
                self._maybe_publish()
                self._maybe_publish_virtual()
                self._publish_finished()
        except BaseException as exc:  # kept for close(), never swallowed silently
            logger.exception("collector thread failed")
            self._error = exc

    def thread_state(self) -> tuple[bool, BaseException | None]:
        """Whether the collector thread runs, and the exception that ended it (None: none)."""
        return self._thread is not None and self._thread.is_alive(), self._error

    def _handle(self, parts: list[Any]) -> None:
        try:
            message = rank_messages.decode(parts)
        except (ValueError, msgpack.UnpackException) as exc:
            self.bad_messages += 1
            logger.error("undecodable message from a worker: %s", exc)
            return
        try:
            self._apply(message)
        except Exception:  # one message's fault (a tile outside its object, ...): counted, logged, never fatal
            self.failed_messages += 1
            logger.exception("a %s message of worker %s about series %r could not be handled (%d so far); the "
                             "collector goes on", message.htype, message.header.get("worker"),
                             message.header.get("series_id"), self.failed_messages)

    def _apply(self, message: rank_messages.RankMessage) -> None:
        self.roster.record(message)
        if (message.htype != "preview" and message.htype != "virtual" and message.htype != "pattern"
                and message.htype != "final"):
            return
        update = self.views.handle(message)
        if update.started is not None:
            self.publisher.series_started(update.started)
        if update.final_job is not None:
            self.writer.submit(update.final_job)

    def _maybe_publish(self) -> None:
        if not self.publisher.due():
            return
        pending = self.views.take_preview()
        if pending is None:
            return
        progress = self.hooks.progress(pending.series_id)
        header = pending.header(progress.received if progress is not None else None)
        self.publisher.preview(header, pending.image, pending.extra)
        self.hooks.on_preview(header, progress, pending.geometry)

    def _maybe_publish_virtual(self) -> None:
        if not self.publisher.virtual_due():
            return
        snapshot = self.views.take_virtual()
        if snapshot is not None:
            self.publisher.virtual(snapshot)
        pattern = self.views.take_pattern()  # the mean diffraction pattern and probe: an event, on the same clock
        if pattern is not None:
            self.publisher.events.publish("diffraction", pattern)

    def _publish_finished(self) -> None:
        for outcome in self.writer.take_done():
            self._announce(outcome)

    def _announce(self, outcome: FinalOutcome) -> None:
        """A series ended: its final file (or none) on the PUB and as an event, one INFO line, the hook."""
        entry, coverage = self.views.finished(outcome)
        where = ("no final file written" if entry["path"] is None
                 else f"final file {entry['path']}" + (" (in the fallback folder)" if entry["fallback"] else ""))
        # the journal's line first: whoever acts on the event (a test, an operator's script) finds it logged
        logger.info("series %r ended: %s after %d iterations; %s", entry["series_id"], entry["status"],
                    entry["iterations"], where)
        pending = self.views.take_virtual()  # the latest virtual images go out before the series' end
        if pending is not None:
            self.publisher.virtual(pending)
        pattern = self.views.take_pattern()
        if pattern is not None:
            self.publisher.events.publish("diffraction", pattern)
        self.publisher.series_ended(entry, coverage)
        self.hooks.on_finished(outcome)

    def status(self) -> dict[str, Any]:
        """The collector's part of ``/status``: roster, latest series, finished files, counters (``final_writes``:
        final files by outcome, and retries; ``worker_messages_failed``: worker messages that did not decode, and
        those whose handling raised)."""
        return {**self.roster.snapshot(), **self.views.status(), "previews_published": self.publisher.published,
                "finals_pending": self.writer.pending, "final_writes": self.writer.counts(),
                "worker_messages_failed": {"undecodable": self.bad_messages, "unhandled": self.failed_messages}}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, write and announce the final files still queued, close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._error is not None:
            logger.error("collector error: %r", self._error)
        outcomes = self.writer.close()
        if self._thread is not None and self._thread.is_alive():
            logger.error("collector thread did not stop within %.0f s; %d final files not announced", timeout_s,
                         len(outcomes))
        else:
            for outcome in outcomes:  # this thread is now the sockets' only user
                self._announce(outcome)
        self.publisher.close()
        self._pull.close()
        self._pub.close()

