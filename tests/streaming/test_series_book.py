"""The ingest's book without sockets: the queue bound holds whatever the current series does, and what it keeps
about refused or dropped starts (keyed by client series ids) stays bounded."""

from __future__ import annotations

import dataclasses
import logging
import tracemalloc

import numpy as np
import pytest

from ptylive.streaming.protocol import Frame, SeriesEnd, SeriesStart
from ptylive.streaming.router import Router
from ptylive.streaming.series import RegistryConfig, SeriesRegistry
from ptylive.streaming.series_book import SeriesBook

START = SeriesStart(series_id="s", scan_shape=(4, 4), scan_step_A=(1.0, 1.0), detector_shape=(8, 8),
                    dtype="float32", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)

pytestmark = pytest.mark.chaos


def book(admit: str | None = None, max_queued: int = 4, history: int = 16,
         record: bool = True) -> tuple[SeriesBook, list[str]]:
    """A book for 2 workers whose admission hook refuses with ``admit`` and, with ``record``, lists the ids it
    was asked about (a test measuring memory records nothing)."""
    asked: list[str] = []

    def hook(start: SeriesStart) -> str | None:
        if record:
            asked.append(start.series_id)
        return admit

    registry = SeriesRegistry(RegistryConfig(history=history, max_queued=max_queued))
    return SeriesBook(lambda s: Router(lambda p: np.zeros(len(p), dtype=int), 2), registry, 2, hook), asked


def start(series_id: str, **changes: object) -> SeriesStart:
    return dataclasses.replace(START, series_id=series_id, **changes)  # type: ignore[arg-type]


def test_the_queue_bound_holds_while_the_current_series_never_ends() -> None:
    """A sender died without series_end (and no idle timeout): 30 more starts. Four wait, the rest are counted
    ``queue_full`` (what /status shows) before admission sees them, so they leave no geometry behind; their
    frames are counted as ``unknown_series``. Once the current series ends, the queue moves on."""
    series_book, asked = book()
    assert series_book.start(start("stuck"))
    for k in range(30):
        forwarded = series_book.start(start(f"later-{k}"))
        assert forwarded == (k < 4) and len(series_book.registry.queued) <= 4
    registry, _, _ = series_book.snapshot()
    assert registry["starts"] == {"current": 1, "queued": 4, "duplicate_id": 0, "queue_full": 26, "refused": 0}
    assert [s["series_id"] for s in registry["queued"]] == [f"later-{k}" for k in range(4)]
    assert asked == ["stuck", *(f"later-{k}" for k in range(4))]
    assert series_book.route(Frame("later-9", 0, np.zeros((8, 8), np.float32))) is None
    assert series_book.registry.rejected["unknown_series"] == 1
    assert series_book.end(SeriesEnd("stuck", 0))
    assert series_book.registry.current is not None and series_book.registry.current.series_id == "later-0"
    assert series_book.start(start("after")) and len(series_book.registry.queued) == 4


def test_a_full_queue_is_counted_before_a_duplicate_id_is_even_considered_elsewhere() -> None:
    series_book, asked = book(max_queued=0)
    assert series_book.start(start("a"))
    assert not series_book.start(start("a")) and not series_book.start(start("b"))
    assert series_book.registry.starts["duplicate_id"] == 1 and series_book.registry.starts["queue_full"] == 1
    assert asked == ["a"]


def test_ten_thousand_distinct_refused_starts_keep_the_book_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """Refused starts (client ids, all distinct) live only in the history of finished series (``history``
    entries); the routers, the queue and the memory stay as they were after the first hundred."""
    caplog.set_level(logging.CRITICAL, logger="ptylive.streaming.series")  # captured records would be kept
    series_book, _ = book(admit="needs 9 GiB per worker; the budget is 8 GiB", record=False)
    for k in range(100):
        assert not series_book.start(start(f"refused-{k}"))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for k in range(100, 10_000):
            assert not series_book.start(start(f"refused-{k}"))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    registry = series_book.registry
    assert registry.starts["refused"] == 10_000 and len(registry.finished) == 16
    assert registry.current is None and not registry.queued and not series_book._routers
    assert after - before < 256 * 1024, f"{after - before} bytes kept by 9900 refused starts"
    assert registry.finished[-1].series_id == "refused-9999" and registry.find("refused-0") is None


def test_a_refused_start_keeps_no_per_frame_arrays() -> None:
    """A 4096 × 4096 scan refused by arithmetic: its history entry holds no coverage (it would be 150 MB)."""
    series_book, _ = book(admit="too large")
    tracemalloc.start()
    try:
        series_book.start(start("huge", scan_shape=(4096, 4096)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    state = series_book.registry.finished[-1]
    assert peak < 2**20 and state.refusal == "too large" and state.n_expected == 4096 * 4096
    assert state.coverage.size == 0 and state.snapshot()["missing"] == 4096 * 4096
    with pytest.raises(ValueError, match="refused"):
        state.coverage_image()


def test_a_start_reusing_a_finished_series_id_is_refused_as_a_duplicate() -> None:
    """Rank 0 keys a series' views and file by its id: a second series under a finished id once made the
    collector drop all its messages (no file) or, with another raster, end its thread. The reused start is
    counted ``duplicate_id``, never reaches admission, and is recorded as a refusal that says why; its frames are
    rejected as ``refused_series`` and its end is an unknown one. A new id runs as usual."""
    series_book, asked = book()
    assert series_book.start(start("a"))
    assert series_book.route(Frame("a", 0, np.zeros((8, 8), np.float32))) is not None
    assert series_book.end(SeriesEnd("a", 1))
    assert series_book.start(start("b-between")) and series_book.end(SeriesEnd("b-between", 0))
    assert not series_book.start(start("a", scan_shape=(10, 10)))
    assert asked == ["a", "b-between"]
    registry, _, _ = series_book.snapshot()
    assert registry["starts"]["duplicate_id"] == 1 and registry["starts"]["refused"] == 0
    reused = series_book.registry.find("a")
    assert reused is not None and reused.refusal is not None and reused.refusal.startswith("duplicate_id")
    assert "already used" in reused.refusal and reused.start.scan_shape == (10, 10)
    assert series_book.route(Frame("a", 1, np.zeros((8, 8), np.float32))) is None
    assert reused.rejected["refused_series"] == 1
    assert not series_book.end(SeriesEnd("a", 1)) and series_book.registry.ends_unknown == 1
    first = [s for s in series_book.registry.finished if s.series_id == "a" and not s.refusal]
    assert len(first) == 1 and first[0].received == 1  # the first series' record is untouched
    assert series_book.start(start("c")) and asked == ["a", "b-between", "c"]


def test_an_id_the_daemon_still_holds_is_a_duplicate_after_the_registry_forgot_it() -> None:
    """The registry keeps ``history`` finished series, refused ones included, so refused starts can push a finished
    series out while rank 0 still holds its file (or a recovered series it never saw): the ``used`` hook
    answers for those. Once nobody holds the id, a start of it is a new series again."""
    held = {"a"}
    series_book, asked = book(history=1)
    series_book.used = lambda series_id: series_id in held
    series_book.registry.refuse(start("refused"), "too large")  # the history now holds only the refusal
    assert not series_book.start(start("a"))
    assert series_book.registry.starts["duplicate_id"] == 1 and asked == []
    held.clear()
    assert series_book.start(start("a")) and asked == ["a"]
