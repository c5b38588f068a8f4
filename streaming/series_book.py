"""The ingest's bookkeeping, apart from its sockets: admission, the series registry and one router per series.

:class:`~ptylive.streaming.ingest.Ingest` owns the sockets and the thread; it asks a :class:`SeriesBook` what
to do with each decoded message. Every method takes the book's lock, and every read returns a copy
(:meth:`SeriesBook.snapshot`, :meth:`SeriesBook.find`, :meth:`SeriesBook.latest`), so HTTP and collector
threads read while the ingest thread changes the registry. Read the registry through these, never through
:attr:`SeriesBook.registry` itself from another thread.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ptylive.streaming.ownership import NotPlaceable
from ptylive.streaming.protocol import Frame, SeriesEnd, SeriesStart
from ptylive.streaming.router import Router
from ptylive.streaming.scan_plan import ScanDecision
from ptylive.streaming.series import SeriesRegistry, SeriesState

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SeriesProgress:
    """One series' counters as they were under the book's lock; safe to keep and read on any thread.

    Attributes
    ----------
    start : SeriesStart
    received, n_expected : int
        Distinct frames accepted so far; frames of the scan.
    coverage : (n_expected,) bool or None
        Copy of which frames were accepted (None unless asked for).
    received_s : (n_expected,) float64 or None
        Copy of each frame's monotonic acceptance time, NaN until then (None unless asked for).
    """

    start: SeriesStart
    received: int
    n_expected: int
    coverage: npt.NDArray[np.bool_] | None = None
    received_s: npt.NDArray[np.float64] | None = None

    @property
    def series_id(self) -> str:
        return self.start.series_id

    @property
    def coverage_fraction(self) -> float:
        return self.received / self.n_expected if self.n_expected else 1.0

    @classmethod
    def of(cls, state: SeriesState, arrays: bool) -> SeriesProgress:
        """Copy ``state`` (its arrays too when ``arrays``); the caller holds the lock that guards it."""
        if not arrays:
            return cls(state.start, state.received, state.n_expected)
        return cls(state.start, state.received, state.n_expected, state.coverage.copy(), state.received_s.copy())


class SeriesBook:
    """Admission, counting and routing of series and frames for ``n_workers`` workers.

    Parameters
    ----------
    router_factory : callable
        Builds a series' :class:`Router` from its start; its ``n_workers`` must equal ``n_workers``.
    registry : SeriesRegistry
    admit : callable or None
        ``admit(start)`` → None to accept, or the reason to refuse (see :class:`~ptylive.streaming.ingest.Ingest`).
    scan_of : callable or None
        ``scan_of(series_id)`` → the :class:`~ptylive.streaming.scan_plan.ScanDecision` the decoder made for a
        DECTRIS series as it began (None: the series carries its own scan). A decision's refusal refuses the
        series before admission; its source, count and ``count_mismatch`` go into the series' record.
    used : callable or None
        ``used(series_id)`` → whether the daemon still holds a series of that id beyond the registry (rank 0's
        view of it, or its file among the finished ones: a series recovered at start); a start of such an id is
        a ``duplicate_id``. Called outside the book's lock.

    Attributes
    ----------
    routing_errors : int
        Accepted frames (or starts) the router could not place (dropped, logged).
    """

    def __init__(self, router_factory: Callable[[SeriesStart], Router], registry: SeriesRegistry, n_workers: int,
                 admit: Callable[[SeriesStart], str | None] | None = None,
                 scan_of: Callable[[str], ScanDecision | None] | None = None,
                 used: Callable[[str], bool] | None = None) -> None:
        self.router_factory, self.registry, self.n_workers, self.admit = router_factory, registry, n_workers, admit
        self.scan_of, self.used = scan_of, used
        self.routing_errors = 0
        self._routers: dict[str, tuple[SeriesStart, Router]] = {}
        self._lock = threading.Lock()

    def record_protocol_error(self, reason: str) -> None:
        with self._lock:
            self.registry.record_protocol_error(reason)

    def start(self, start: SeriesStart) -> bool:
        """Admit (or refuse) and register a start; True when it must be forwarded to the workers.

        A start whose id is live (current or queued), or of a series that finished and is still known (the
        registry's history, or ``used``), is counted as ``duplicate_id`` (a finished id's also recorded as a
        refusal, with its reason), and one that finds the queue full as ``queue_full``; both are dropped before
        the admission hook sees them: the hook records each admitted series' geometry by id (a second geometry
        under a live id once took the collector's thread down: a tile outside the object), in a bounded record
        that starts beyond the queue would flush.
        """
        used = self.used is not None and self.used(start.series_id)
        with self._lock:
            if self.registry.dropped_start(start.series_id, used) is not None:
                self.registry.start(start, used)  # counted as duplicate_id or queue_full, never registered
                return False
        decision = self.scan_of(start.series_id) if self.scan_of is not None else None
        refusal = decision.refusal if decision is not None and decision.refusal else self._admit(start)
        with self._lock:
            if refusal is not None:
                self._note_scan(self.registry.refuse(start, refusal), decision)
                return False
            _, state = self.registry.start(start)
            self._note_scan(state, decision)
            if state is not None:
                try:
                    self._routers[start.series_id] = (start, self._build_router(start))
                except ValueError as exc:
                    self.routing_errors += 1
                    logger.error("no router for series %r; its frames will be dropped: %s", start.series_id, exc)
            self._prune_routers()
        return state is not None

    def fresh_id(self, series_id: str) -> str:
        """The id a detector's new series runs under: ``series_id``, or ``<series_id>.<k>`` (the smallest ``k``
        free) when a finished series still known here had it (the registry's history, or ``used``).

        DECTRIS detectors number their series and start again at 1 when their controller restarts; without a
        new id, such a series would be refused as a ``duplicate_id`` (its data lost) for as long as the old one
        is remembered. A live id is kept as it is (a repeated start of the running series stays a duplicate).
        Our own protocol's clients choose their ids and are not renamed.
        """
        def duplicate(candidate: str) -> bool:  # the registry's rule, as :meth:`start` applies it
            used = self.used is not None and self.used(candidate)  # outside our lock, as in start
            with self._lock:
                return self.registry.dropped_start(candidate, used) == "duplicate_id"

        with self._lock:
            live = self.registry.is_live(series_id)
        if live or not duplicate(series_id):
            return series_id
        k = 1
        while duplicate(f"{series_id}.{k}"):
            k += 1
        logger.warning("detector series %r was already used by a finished series; it runs as %r", series_id,
                       f"{series_id}.{k}")
        return f"{series_id}.{k}"

    @staticmethod
    def _note_scan(state: SeriesState | None, decision: ScanDecision | None) -> None:
        if state is not None and decision is not None:
            state.scan, state.count_mismatch = decision.snapshot(), decision.count_mismatch

    def end(self, end: SeriesEnd) -> bool:
        """Register an end; True when it must be forwarded (the series was live)."""
        with self._lock:
            ended = self.registry.end(end)
            self._prune_routers()
        return ended is not None

    def end_now(self, series_id: str | None, cause: str) -> tuple[str | None, bool]:
        """End ``series_id`` (None: the current series) for ``cause``; ``(series id, ended)``."""
        with self._lock:
            current = self.registry.current
            series_id = series_id or (current.series_id if current is not None else None)
            state = None if series_id is None else self.registry.end_now(series_id, cause)
            self._prune_routers()
        return series_id, state is not None

    def end_idle(self, timeout_s: float) -> str | None:
        """End the current series as ``"idle_timeout"`` when no frame of it came for ``timeout_s``; its id, or None."""
        with self._lock:
            series_id = self.registry.idle_current(timeout_s)
            if series_id is None:
                return None
            self.registry.end_now(series_id, "idle_timeout")
            self._prune_routers()
        logger.warning("series %r: no frame for %.0f s; ended as incomplete", series_id, timeout_s)
        return series_id

    def route(self, frame: Frame) -> int | None:
        """Worker for an accepted frame; None for duplicates, rejections and frames that cannot be routed.

        A frame whose worker could not place it at its header position (the router's rule says
        :class:`~ptylive.streaming.ownership.NotPlaceable`) is rejected as ``"position_outside"`` before it
        counts as received.
        """
        with self._lock:
            entry = self._routers.get(frame.series_id)
            if entry is not None and frame.position_A is not None and all(map(math.isfinite, frame.position_A)):
                try:  # a header position must be placeable before the frame counts as received
                    entry[1].owner(entry[0], frame)
                except NotPlaceable as exc:
                    self.registry.reject(frame, "position_outside")
                    logger.warning("frame %d of series %r rejected: %s", frame.frame_index, frame.series_id, exc)
                    return None
                except ValueError:
                    pass  # an index outside the scan or a broken rule: counted below, by accept_frame or route
            if not self.registry.accept_frame(frame).accepted:
                return None
            if entry is None:
                self.routing_errors += 1
                return None
            try:
                return entry[1].route(entry[0], frame)
            except ValueError as exc:
                self.routing_errors += 1
                logger.warning("frame %d of series %r not routed: %s", frame.frame_index, frame.series_id, exc)
                return None

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any] | None, int]:
        """The registry's counters, the current series' router counters (None without one) and the routing
        errors, read together under the lock (so the three agree)."""
        with self._lock:
            registry = self.registry.snapshot()
            current = self.registry.current
            entry = self._routers.get(current.series_id) if current is not None else None
            router = None if entry is None else {"series_id": entry[0].series_id, **entry[1].snapshot()}
            routing_errors = self.routing_errors
        return registry, router, routing_errors

    def find(self, series_id: str, arrays: bool = False) -> SeriesProgress | None:
        """Progress of the newest series named ``series_id`` (current, queued or finished), or None.

        ``arrays`` adds copies of its coverage and acceptance times (O(frames)).
        """
        with self._lock:
            state = self.registry.find(series_id)
            return None if state is None else SeriesProgress.of(state, arrays)

    def latest(self, arrays: bool = False) -> SeriesProgress | None:
        """Progress of the current series, else of the last finished one that was not refused; None before any."""
        with self._lock:
            state = self.registry.latest()
            return None if state is None else SeriesProgress.of(state, arrays)

    def _admit(self, start: SeriesStart) -> str | None:
        """The admission hook's verdict; a hook that raises refuses the series (logged), never the thread."""
        if self.admit is None:
            return None
        try:
            return self.admit(start)
        except Exception as exc:
            logger.exception("admission of series %r failed", start.series_id)
            return f"admission failed: {exc!r}"

    def _build_router(self, start: SeriesStart) -> Router:
        """The series' router, checked against the worker count, with its lookup table built."""
        router = self.router_factory(start)
        if router.n_workers != self.n_workers:
            raise ValueError(f"router has {router.n_workers} workers, the ingest {self.n_workers}")
        router.route_all(start)  # route() becomes a table lookup
        return router

    def _prune_routers(self) -> None:
        """Keep routers of live (current or queued) series only."""
        live = {s.series_id for s in (self.registry.current, *self.registry.queued) if s is not None}
        for series_id in set(self._routers) - live:
            del self._routers[series_id]
