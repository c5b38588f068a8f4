"""The workers' per-tick agreement: Consensus on a fake two-rank communicator, and the stop decision.

``_decide`` and ``_local_facts`` are private to :mod:`ptylive.daemon.worker.refine` (they are being
moved); they are imported here because every streaming worker's stop status comes from them and was
reached only through subprocesses before. They read these fields of a run, and nothing else::

    _local_facts: store.intensity_sum, store.n_received, flags.ended, flags.stop_level, final_started,
                  illumination_max
    _decide:      n_workers, final_done, final_iterations, final_seconds, final_started
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.engine.exchange.consensus import Consensus
from ptylive.daemon.worker.refine import N_SUM, STOP_LEVELS, SeriesFlags, _can_choose, _decide, _local_facts
from tests.daemon import fake_mpi
from tests.daemon.fake_mpi import FakeComm, FakeWorld, run_ranks

N_MINIBATCHES = 2


@pytest.fixture(autouse=True)
def no_real_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi.install(monkeypatch)


@dataclass
class StoreCounts:
    intensity_sum: float = 0.0
    n_received: int = 0
    dark_field_sum: float = 0.0


@dataclass
class Run:
    """The fields of a ``StreamRun`` that the consensus decision reads (see the module docstring)."""

    n_workers: int = 2
    final_iterations: int = 3
    final_seconds: float = 0.0
    final_done: int = 0
    final_started: float | None = None
    store: StoreCounts = field(default_factory=StoreCounts)
    flags: SeriesFlags = field(default_factory=SeriesFlags)
    illumination_max: np.ndarray = field(default_factory=lambda: np.zeros(N_MINIBATCHES))


def decide(run: Run, sums: np.ndarray, maxes: np.ndarray) -> str | None:
    return _decide(run, sums, maxes)  # type: ignore[arg-type]


def local_facts(run: Run) -> tuple[np.ndarray, np.ndarray]:
    return _local_facts(run)  # type: ignore[arg-type]


def agree(runs: list[Run]) -> list[tuple[np.ndarray, np.ndarray, str | None]]:
    """One tick on every worker: post local facts, collect the totals, decide (each in its own thread)."""
    def worker(comm: FakeComm) -> tuple[np.ndarray, np.ndarray, str | None]:
        run = runs[comm.Get_rank()]
        consensus = Consensus(comm, N_SUM, 2 + N_MINIBATCHES)
        consensus.post(*local_facts(run))
        sums, maxes = consensus.collect()
        return sums, maxes, decide(run, sums, maxes)

    return run_ranks(FakeWorld(len(runs)), worker)


# Consensus ------------------------------------------------------------------------------------------

def test_every_worker_collects_the_same_sums_and_maxima() -> None:
    def worker(comm: FakeComm) -> tuple[np.ndarray, np.ndarray]:
        r = comm.Get_rank()
        consensus = Consensus(comm, 2, 3)
        consensus.post(np.array([1.5, 10.0 * r]), np.array([r, 5.0 - r, -1.0]))
        return consensus.collect()

    for sums, maxes in run_ranks(FakeWorld(3), worker):
        np.testing.assert_array_equal(sums, [4.5, 30.0])
        np.testing.assert_array_equal(maxes, [2.0, 5.0, -1.0])


def test_collect_returns_copies_of_the_previous_post_and_the_next_post_does_not_change_them() -> None:
    def worker(comm: FakeComm) -> list[np.ndarray]:
        consensus = Consensus(comm, 1, 1)
        consensus.post(np.array([1.0]), np.array([comm.Get_rank()]))
        first = consensus.collect()
        consensus.post(np.array([100.0]), np.array([50.0]))
        second = consensus.collect()
        return [*first, *second]

    for first_sum, first_max, second_sum, second_max in run_ranks(FakeWorld(2), worker):
        assert (first_sum[0], first_max[0], second_sum[0], second_max[0]) == (2.0, 1.0, 200.0, 50.0)


def test_collect_polls_while_waiting_and_counts_the_wait() -> None:
    """Worker 1 posts only after worker 0 has polled: worker 0 keeps serving its inbox meanwhile."""
    polled = threading.Event()

    def worker(comm: FakeComm) -> tuple[int, float, np.ndarray]:
        consensus = Consensus(comm, 1, 1)
        calls = 0

        def while_waiting() -> None:
            nonlocal calls
            calls += 1
            polled.set()

        if comm.Get_rank() == 1:
            assert polled.wait(5.0)
            time.sleep(0.02)
        consensus.post(np.array([1.0]), np.array([0.0]))
        sums, _ = consensus.collect(while_waiting)
        return calls, consensus.wait_s, sums

    (calls_0, wait_0, sums_0), (_, _, sums_1) = run_ranks(FakeWorld(2), worker)
    assert calls_0 >= 1 and wait_0 >= 0.02
    assert sums_0[0] == sums_1[0] == 2.0


def test_a_single_worker_agrees_with_itself_without_a_communicator() -> None:
    consensus = Consensus(None, 2, 1)
    assert not consensus.posted
    consensus.post(np.array([3.0, 4.0]), np.array([7.0]))
    assert consensus.posted
    sums, maxes = consensus.collect(while_waiting=lambda: pytest.fail("a single worker never waits"))
    np.testing.assert_array_equal(sums, [3.0, 4.0])
    np.testing.assert_array_equal(maxes, [7.0])
    assert consensus.wait_s == 0.0 and not consensus.posted


def test_post_and_collect_must_alternate() -> None:
    consensus = Consensus(None, 1, 1)
    with pytest.raises(RuntimeError, match="nothing was posted"):
        consensus.collect()
    consensus.post(np.zeros(1), np.zeros(1))
    with pytest.raises(RuntimeError, match="not collected"):
        consensus.post(np.zeros(1), np.zeros(1))


def test_a_communicator_of_one_rank_is_treated_as_none() -> None:
    consensus = Consensus(FakeWorld(1).comm(0), 1, 1)
    assert consensus.comm is None
    consensus.post(np.array([2.0]), np.array([1.0]))
    assert consensus.collect()[0][0] == 2.0


# The stop decision, from each worker's local facts ---------------------------------------------------

def test_local_facts_layout() -> None:
    run = Run(store=StoreCounts(12.5, 4, 0.5), flags=SeriesFlags(ended=True, stop_level=2),
              illumination_max=np.array([3.0, 8.0]))
    sums, maxes = local_facts(run)
    np.testing.assert_array_equal(sums, [12.5, 4.0, 1.0, 0.5])  # Σ intensities, frames, ended, dark field
    np.testing.assert_array_equal(maxes, [2.0, 0.0, 3.0, 8.0])  # stop level, final-phase seconds, illumination
    assert len(sums) == N_SUM


def test_one_workers_stop_request_stops_every_worker_with_the_strongest_status() -> None:
    for levels, status in [((0, 2), "aborted"), ((1, 0), "superseded"), ((1, 3), "interrupted")]:
        runs = [Run(store=StoreCounts(5.0, 2), flags=SeriesFlags(stop_level=level)) for level in levels]
        assert [decision for *_, decision in agree(runs)] == [status, status]
        assert status == STOP_LEVELS[max(levels)]


def test_nobody_stops_until_every_worker_saw_the_end() -> None:
    runs = [Run(store=StoreCounts(9.0, 3), flags=SeriesFlags(ended=True)), Run(store=StoreCounts(1.0, 1))]
    for sums, _, decision in agree(runs):
        assert decision is None
        np.testing.assert_array_equal(sums, [10.0, 4.0, 1.0, 0.0])
    assert all(run.final_started is None for run in runs)  # the final phase has not begun


def test_a_series_that_ended_without_frames_anywhere_is_empty() -> None:
    runs = [Run(flags=SeriesFlags(ended=True)), Run(flags=SeriesFlags(ended=True))]
    assert [decision for *_, decision in agree(runs)] == ["empty", "empty"]


@pytest.mark.chaos
def test_a_series_whose_frames_hold_no_count_ends_dark_without_a_detector_scale() -> None:
    """A closed shutter: frames arrive, all zero. The detector scale ΣI / Σ|Ψ|² would be 0 (set_scale refuses it,
    and a worker that raised took the whole MPI job down); the workers agree on "dark" instead."""
    runs = [Run(store=StoreCounts(0.0, 3), flags=SeriesFlags(ended=True)),
            Run(store=StoreCounts(0.0, 2), flags=SeriesFlags(ended=True))]
    assert [decision for *_, decision in agree(runs)] == ["dark", "dark"]


def test_after_the_end_the_final_iterations_run_then_every_worker_completes() -> None:
    runs = [Run(store=StoreCounts(4.0, 2), flags=SeriesFlags(ended=True)),
            Run(store=StoreCounts(0.0, 0), flags=SeriesFlags(ended=True))]  # one worker got no frames
    assert [decision for *_, decision in agree(runs)] == [None, None]
    assert all(run.final_started is not None for run in runs)  # both started the final phase at this tick
    started = [run.final_started for run in runs]
    for done in (1, 2):
        for run in runs:
            run.final_done = done
        assert [decision for *_, decision in agree(runs)] == [None, None]
    assert [run.final_started for run in runs] == started  # set once
    for run in runs:
        run.final_done = 3
    assert [decision for *_, decision in agree(runs)] == ["complete", "complete"]


def test_the_final_phase_ends_on_time_on_the_slowest_clock() -> None:
    sums = np.array([4.0, 2.0, 2.0])
    run = Run(final_iterations=100, final_seconds=1.5, final_started=time.monotonic())
    assert decide(run, sums, np.array([0.0, 1.0, 0.0, 0.0])) is None
    assert decide(run, sums, np.array([0.0, 1.5, 0.0, 0.0])) == "complete"  # the largest elapsed time of all
    untimed = Run(final_iterations=100, final_seconds=0.0, final_started=time.monotonic())
    assert decide(untimed, sums, np.array([0.0, 1e6, 0.0, 0.0])) is None  # 0 s: no time limit


def test_elapsed_time_is_reported_once_the_final_phase_started() -> None:
    run = Run(final_started=time.monotonic() - 2.0)
    _, maxes = local_facts(run)
    assert 2.0 <= maxes[1] < 60.0
    assert local_facts(Run())[1][1] == 0.0


def test_a_stop_outranks_the_end() -> None:
    runs = [Run(store=StoreCounts(4.0, 2), flags=SeriesFlags(ended=True, stop_level=1), final_done=3),
            Run(flags=SeriesFlags(ended=True), final_done=3)]
    assert [decision for *_, decision in agree(runs)] == ["superseded", "superseded"]


def test_a_series_ended_by_the_idle_timeout_finishes_its_final_iterations_as_incomplete() -> None:
    runs = [Run(store=StoreCounts(4.0, 2), flags=SeriesFlags(ended=True, incomplete=True)),
            Run(store=StoreCounts(3.0, 1), flags=SeriesFlags(ended=True, incomplete=True))]
    assert [decision for *_, decision in agree(runs)] == [None, None]  # the final iterations first
    for run in runs:
        run.final_done = 3
    assert [decision for *_, decision in agree(runs)] == ["incomplete", "incomplete"]


def test_the_loss_is_chosen_once_a_tenth_of_the_frames_or_the_end_is_in() -> None:
    """``loss = "auto"`` (daemon.worker.refine._can_choose): 10 % of the series' frames (at least 32, at most all
    of them), or every worker saw the end; the sums are the consensus totals, the same on every worker."""
    def run(n_positions: int) -> Any:
        return SimpleNamespace(n_workers=2, store=SimpleNamespace(
            geometry=SimpleNamespace(positions_px=np.zeros((n_positions, 2)))))

    def sums(received: int, ended: int = 0) -> np.ndarray:
        return np.array([1.0, received, ended, 0.0])

    assert not _can_choose(run(1000), sums(99)) and _can_choose(run(1000), sums(100))
    assert not _can_choose(run(100), sums(31)) and _can_choose(run(100), sums(32))  # at least 32 ...
    assert not _can_choose(run(20), sums(19)) and _can_choose(run(20), sums(20))  # ... but not more than all
    assert not _can_choose(run(1000), sums(5, ended=1)) and _can_choose(run(1000), sums(5, ended=2))
