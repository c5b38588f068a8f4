"""Per-series bookkeeping for the ingest: which frames arrived, which are missing, and why some were dropped.

:class:`SeriesRegistry` classifies each decoded frame as accepted (first time), duplicate, or rejected with a
reason; it never raises on stream content, and a missing frame never aborts a series. Counting rules (tested):
per series ``received + duplicated + sum(rejected) == offered`` and ``missing == n_expected − received``;
globally ``accepted + duplicates + rejected[INGEST_REJECT_REASONS] == frames_offered``. The counts under the
protocol's ``REJECT_REASONS`` are undecodable messages, which belong to no series (0 per series).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ptylive.streaming.protocol import REJECT_REASONS, Frame, SeriesEnd, SeriesStart

logger = logging.getLogger(__name__)

INGEST_REJECT_REASONS = ("unknown_series", "finished_series", "refused_series", "index_out_of_range",
                         "shape_mismatch", "dtype_mismatch", "non_finite", "position_outside")
ALL_REJECT_REASONS = REJECT_REASONS + INGEST_REJECT_REASONS
START_OUTCOMES = ("current", "queued", "duplicate_id", "queue_full", "refused")


@dataclass(frozen=True)
class RegistryConfig:
    """How the registry treats series.

    ``on_new_start``: a start arriving while a series is active waits until that one ends (``"queue"``) or
    ends it at once (``"finish_now"``, end cause ``"superseded"``). ``history``: finished series kept (late
    frames of one dropped from it count as ``"unknown_series"``). ``max_queued``: starts that may wait;
    more are dropped as ``"queue_full"``. ``check_finite``: reject float frames holding NaN or ±inf.
    """

    on_new_start: Literal["queue", "finish_now"] = "queue"
    history: int = 16
    max_queued: int = 4
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.on_new_start not in ("queue", "finish_now") or self.history < 1 or self.max_queued < 0:
            raise ValueError(f"expected on_new_start 'queue' or 'finish_now', history >= 1, max_queued >= 0; got "
                             f"{self.on_new_start!r}, {self.history}, {self.max_queued}")


@dataclass(frozen=True)
class Verdict:
    """What happened to one frame; ``reason`` is one of :data:`INGEST_REJECT_REASONS` when rejected."""

    outcome: Literal["accepted", "duplicate", "rejected"]
    series_id: str
    frame_index: int
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome == "accepted"


@dataclass(eq=False)
class SeriesState:
    """Counters of one series.

    Attributes
    ----------
    started_s, ended_s : float, float or None
        Registry clock at the start and at the end.
    received, duplicated, rejected : int, int, dict[str, int]
        Distinct frames accepted; further copies; rejections over :data:`ALL_REJECT_REASONS`.
    sender_n_frames, end_cause : int or None, str or None
        ``n_frames`` of the :class:`SeriesEnd` (None otherwise), and why the series ended: ``"series_end"``,
        ``"superseded"``, ``"finalize"`` or ``"abort"`` (control endpoint), ``"refused"``.
    refusal : str or None
        Why the daemon refused the series (its frames are rejected as ``"refused_series"``).
    scan : dict or None
        How a DECTRIS series' scan was decided (:meth:`ptylive.streaming.scan_plan.ScanDecision.snapshot`: its
        source, the detector's image count); None for a series that carried its own (ptylive stream v1).
    count_mismatch : str or None
        When the detector's image count and the scan disagreed: what disagreed and what was done about it.
    coverage : (n_expected,) bool
        ``coverage[k]`` is set once frame ``k`` was accepted; ``(0,)`` for a refused series, which takes no frame
        (a refused 4096 × 4096 start would otherwise keep 150 MB in the history).
    received_s : (n_expected,) float64
        ``time.monotonic()`` when frame ``k`` was accepted (NaN until then), for frame-to-preview latency;
        ``(0,)`` for a refused series.
    """

    start: SeriesStart
    started_s: float
    received: int = 0
    duplicated: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALL_REJECT_REASONS, 0))
    ended: bool = False
    ended_s: float | None = None
    sender_n_frames: int | None = None
    end_cause: str | None = None
    refusal: str | None = None
    scan: dict[str, Any] | None = None
    count_mismatch: str | None = None
    last_frame_s: float = field(default_factory=time.monotonic)  # monotonic: the start, then each accepted frame
    series_id: str = field(init=False)
    n_expected: int = field(init=False)
    coverage: npt.NDArray[np.bool_] = field(init=False)
    received_s: npt.NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        self.series_id, self.n_expected = self.start.series_id, self.start.n_positions
        n_kept = 0 if self.refusal else self.n_expected
        self.coverage = np.zeros(n_kept, dtype=bool)
        self.received_s = np.full(n_kept, np.nan)

    @property
    def missing(self) -> int:
        return self.n_expected - self.received

    @property
    def coverage_fraction(self) -> float:
        return self.received / self.n_expected if self.n_expected else 1.0

    @property
    def offered(self) -> int:
        return self.received + self.duplicated + sum(self.rejected.values())

    def coverage_image(self) -> npt.NDArray[np.bool_]:
        """Coverage as a ``scan_shape`` (rows, cols) bool image; ValueError if positions are not that raster."""
        rows, cols = self.start.scan_shape
        if self.refusal:
            raise ValueError(f"series {self.series_id!r} was refused: it has no coverage")
        if self.n_expected != rows * cols:
            raise ValueError(f"series {self.series_id!r} has {self.n_expected} positions, not a {rows}×{cols} raster")
        return self.coverage.reshape(rows, cols).copy()

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable counters (without the coverage map; see :meth:`coverage_image`)."""
        return {
            "series_id": self.series_id, "scan_shape": list(self.start.scan_shape),
            "detector_shape": list(self.start.detector_shape), "dtype": self.start.dtype,
            "n_expected": self.n_expected, "received": self.received, "duplicated": self.duplicated,
            "missing": self.missing, "rejected": dict(self.rejected), "offered": self.offered,
            "coverage_fraction": self.coverage_fraction,
            "started_s": self.started_s, "ended_s": self.ended_s, "ended": self.ended,
            "sender_n_frames": self.sender_n_frames, "end_cause": self.end_cause, "refusal": self.refusal,
            "count_mismatch": self.count_mismatch, "scan": self.scan,
        }


class SeriesRegistry:
    """Current series, queued starts, a bounded history of finished ones, global counters; ``clock()`` → s."""

    def __init__(self, config: RegistryConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config or RegistryConfig()
        self.clock = clock
        self.current: SeriesState | None = None
        self.queued: deque[SeriesState] = deque()
        self.finished: deque[SeriesState] = deque(maxlen=self.config.history)
        self.frames_offered = self.accepted = self.duplicates = self.ends_unknown = self.missing_total = 0
        self.rejected = dict.fromkeys(ALL_REJECT_REASONS, 0)
        self.starts = dict.fromkeys(START_OUTCOMES, 0)

    def is_live(self, series_id: str) -> bool:
        """Whether ``series_id`` is the current or a queued series (a start with its id is a duplicate, as one with
        the id of a finished series is: :meth:`dropped_start`)."""
        return self._live(series_id) is not None

    def _live(self, series_id: str) -> SeriesState | None:
        if self.current is not None and self.current.series_id == series_id:
            return self.current
        return next((s for s in self.queued if s.series_id == series_id), None)

    def find(self, series_id: str) -> SeriesState | None:
        """The newest state named ``series_id``: current, queued, or in the history of finished series."""
        live = self._live(series_id)
        return live if live is not None else next((s for s in reversed(self.finished) if s.series_id == series_id),
                                                  None)

    def latest(self) -> SeriesState | None:
        """The current series, else the last finished one that was not refused (what operators last saw run)."""
        return self.current or next((s for s in reversed(self.finished) if not s.refusal), None)

    def _finish(self, state: SeriesState, cause: str, n_frames: int | None) -> None:
        state.ended, state.ended_s, state.end_cause, state.sender_n_frames = True, self.clock(), cause, n_frames
        self.finished.append(state)
        self.missing_total += state.missing
        short = state.missing or (n_frames is not None and n_frames != state.received) or state.count_mismatch
        logger.log(logging.WARNING if short else logging.INFO,
                   "series %r ended (%s): %d of %d frames received, %d missing; the sender counted %s%s",
                   state.series_id, cause, state.received, state.n_expected, state.missing, n_frames,
                   "; the detector's image count and the scan disagreed" if state.count_mismatch else "")

    def ran(self, series_id: str) -> bool:
        """Whether a series named ``series_id`` ran and is still in the history of finished series (not refused)."""
        return any(s.series_id == series_id and not s.refusal for s in self.finished)

    def dropped_start(self, series_id: str, used: bool = False) -> str | None:
        """``"duplicate_id"`` or ``"queue_full"`` when a start of ``series_id`` would be dropped now, else None.

        A duplicate id is one of a live series, of a finished one still in the history (:meth:`ran`), or one the
        caller says is ``used`` (rank 0 still holds a series of that id: its view or its written file). Rank 0
        keys a series' views, tiles and file by its id, so a second series under an id still known there would
        take the first one's place (a finished id's view once made the collector drop every message of the new
        series, or its thread died on a tile outside the old object). Asked before admission, so a start that
        cannot run costs no admission work (and leaves no trace in it).
        """
        if self._live(series_id) is not None or used or self.ran(series_id):
            return "duplicate_id"
        waits = self.current is not None and self.config.on_new_start == "queue"
        return "queue_full" if waits and len(self.queued) >= self.config.max_queued else None

    def start(self, msg: SeriesStart, used: bool = False) -> tuple[str, SeriesState | None]:
        """Register a start: ``(outcome in START_OUTCOMES, new state or None if dropped)``.

        Under ``"finish_now"`` a superseded series is ``self.finished[-1]``. At most ``max_queued`` series ever
        wait, whatever the current one does (one that never ends holds the queue until ``idle_timeout_s``).
        ``used``: rank 0 still holds a series of this id (:meth:`dropped_start`). A duplicate of a live id is
        only counted (its frames are the live series'); a duplicate of a finished id is also recorded as a
        refusal that names the reason (``/status``), so that its frames are rejected as ``"refused_series"``.
        """
        outcome = self.dropped_start(msg.series_id, used)
        if outcome is None:
            if self.current is not None and self.config.on_new_start == "finish_now":
                self._finish(self.current, "superseded", None)
            outcome = "current" if self.current is None or self.config.on_new_start == "finish_now" else "queued"
        self.starts[outcome] += 1
        if outcome == "duplicate_id" and self._live(msg.series_id) is None:
            self._refuse(msg, f"duplicate_id: series id {msg.series_id!r} was already used by a series that "
                              "finished (its file is written or being written); a new series needs a new id")
            return outcome, None
        if outcome in ("duplicate_id", "queue_full"):
            logger.warning("series start %r dropped: %s", msg.series_id, outcome)
            return outcome, None
        state = SeriesState(msg, self.clock())
        if outcome == "current":
            self.current = state
        else:
            self.queued.append(state)
        logger.info("series %r %s: %d positions, detector %s %s", msg.series_id, outcome, state.n_expected,
                    msg.detector_shape, msg.dtype)
        return outcome, state

    def refuse(self, msg: SeriesStart, reason: str) -> SeriesState:
        """Record a start the daemon will not reconstruct; its frames are rejected as ``"refused_series"``."""
        self.starts["refused"] += 1
        return self._refuse(msg, reason)

    def _refuse(self, msg: SeriesStart, reason: str) -> SeriesState:
        state = SeriesState(msg, self.clock(), refusal=reason)
        state.ended, state.ended_s, state.end_cause = True, state.started_s, "refused"
        self.finished.append(state)
        logger.error("series %r refused: %s", msg.series_id, reason)
        return state

    def end(self, msg: SeriesEnd) -> SeriesState | None:
        """End the named series (current or queued): its state, or None if unknown (``ends_unknown``)."""
        state = self.end_now(msg.series_id, "series_end", msg.n_frames)
        if state is None:
            self.ends_unknown += 1
            logger.warning("end of unknown or finished series %r ignored", msg.series_id)
        return state

    def idle_current(self, timeout_s: float) -> str | None:
        """The current series' id when no frame of it was accepted for ``timeout_s`` (since its start, if none)."""
        current = self.current
        if current is None or time.monotonic() - current.last_frame_s <= timeout_s:
            return None
        return current.series_id

    def end_now(self, series_id: str, cause: str, n_frames: int | None = None) -> SeriesState | None:
        """End a live series for ``cause`` (e.g. ``"finalize"`` from the control endpoint); None if not live."""
        state = self._live(series_id)
        if state is None:
            return None
        if state is self.current:
            self.current = self.queued.popleft() if self.queued else None
        else:
            self.queued.remove(state)
        self._finish(state, cause, n_frames)
        return state

    def _reject(self, state: SeriesState | None, frame: Frame, reason: str) -> Verdict:
        self.rejected[reason] += 1
        if state is not None:
            state.rejected[reason] += 1
        return Verdict("rejected", frame.series_id, frame.frame_index, reason)

    def accept_frame(self, frame: Frame) -> Verdict:
        """Classify ``frame`` and count it; never raises on frame content.

        Checks, in order: the series is current or queued (else ``"refused_series"`` or
        ``"finished_series"`` while it is in the history, otherwise ``"unknown_series"``), then
        ``"index_out_of_range"``, ``"shape_mismatch"``, ``"dtype_mismatch"``, ``"non_finite"`` (float
        pixels), ``"position_outside"`` (a header position that is not finite); then duplicate or
        accepted. Rejected frames leave the coverage alone.
        """
        self.frames_offered += 1
        state = self._live(frame.series_id)
        if state is None:
            late = self.find(frame.series_id)
            reason = "unknown_series" if late is None else "refused_series" if late.refusal else "finished_series"
            return self._reject(late, frame, reason)
        index, pixels = frame.frame_index, frame.pixels
        if not 0 <= index < state.n_expected:
            return self._reject(state, frame, "index_out_of_range")
        if pixels.shape != state.start.detector_shape:
            return self._reject(state, frame, "shape_mismatch")
        if pixels.dtype != state.start.dtype:  # a dtype name means native byte order
            return self._reject(state, frame, "dtype_mismatch")
        if self.config.check_finite and pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            return self._reject(state, frame, "non_finite")
        if frame.position_A is not None and not all(map(math.isfinite, frame.position_A)):
            return self._reject(state, frame, "position_outside")
        if state.coverage[index]:
            state.duplicated += 1
            self.duplicates += 1
            return Verdict("duplicate", frame.series_id, index)
        state.coverage[index] = True
        state.received_s[index] = state.last_frame_s = time.monotonic()
        state.received += 1
        self.accepted += 1
        return Verdict("accepted", frame.series_id, index)

    def reject(self, frame: Frame, reason: str) -> Verdict:
        """Count a frame of a live series that the caller rejects (e.g. its header position lies outside the
        object); it leaves the coverage alone, so the index can still arrive valid."""
        if reason not in INGEST_REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {INGEST_REJECT_REASONS}")
        self.frames_offered += 1
        return self._reject(self._live(frame.series_id), frame, reason)

    def record_protocol_error(self, reason: str) -> None:
        """Count a message that did not decode (its ``ProtocolError.reason``); it belongs to no series."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown protocol reject reason {reason!r}; expected one of {REJECT_REASONS}")
        self.rejected[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state of every counter, for ``/status``."""
        return {
            "config": asdict(self.config), "current": self.current.snapshot() if self.current is not None else None,
            "queued": [s.snapshot() for s in self.queued], "finished": [s.snapshot() for s in self.finished],
            "frames": {"offered": self.frames_offered, "accepted": self.accepted, "duplicates": self.duplicates,
                       "rejected": sum(self.rejected[r] for r in INGEST_REJECT_REASONS)},
            "protocol_errors": sum(self.rejected[r] for r in REJECT_REASONS),
            "rejected": dict(self.rejected), "starts": dict(self.starts), "ends_unknown": self.ends_unknown,
            "missing_total": self.missing_total,
        }
