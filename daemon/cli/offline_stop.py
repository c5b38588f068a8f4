"""A bounded stop of ``ptylive reconstruct``: SIGTERM, SIGINT or SIGHUP end the run early, every rank at the
same point, and the result so far is written (status ``interrupted``).

A signal only sets a flag (:class:`StopSignals`); the ranks act on it where the engine lets them and where
they can agree. ``mpiexec`` forwards SIGTERM and SIGINT to every rank (the launcher forwards its own to
``mpiexec``), so normally every rank sees the flag within milliseconds; the agreement below never assumes it.

``sync`` mode (and one rank): every mini-batch has exactly one *stop vote*, an all-reduce (max) of the flag
over the ranks, cast before the mini-batch's halo exchange::

    rank 0:  chunk chunk chunk [vote m] halo m, step m ... chunk chunk [vote m+1] ...
    rank 1:  chunk chunk chunk chunk chunk [vote m] halo m, step m ...
                        ^ signal: the next chunk boundary votes at once (the rest of mini-batch m is skipped)

A rank whose flag is set votes at its next chunk boundary (the engine's ``between_batches`` hook); a rank
whose flag is not set votes just before the halo exchange (:meth:`AgreedStop.reduce_gradients`). Either
way each rank casts one vote per mini-batch, so the votes pair up across ranks as MPI collectives must,
and a vote that comes back set raises :class:`StopRequested` on every rank at the same mini-batch: the
tile is as the previous update left it, the same on every rank. The wait is one chunk of ``batch_size``
positions when every rank was signalled, at most one mini-batch's local gradient when only one was.
A vote costs one 8-byte all-reduce per mini-batch.

``async`` mode has no per-mini-batch collective to pair votes with (a blocking vote per mini-batch would
make it sync); the vote is cast at each iteration's end (:class:`IterationVote`), so the stop
waits for the current iteration to end. The async exchanger is then drained as at a normal end
(:func:`finish_async`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

from ptylive.daemon.engine.exchange.consensus import Consensus
from ptylive.daemon.engine.exchange.protocols import AsyncExchange, ExchangeStats, SyncExchange
from ptylive.daemon.engine.iteration import EngineReport, apply_probe_total
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileState
from ptylive.gpu.update import constrain

logger = logging.getLogger(__name__)

#: Signals that stop a run early and save it (SIGHUP: a closed terminal; the launcher turns it into SIGTERM).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequested(Exception):
    """Raised on every rank at the agreed stop point."""


class StopSignals:
    """Remembers the first stop signal received; handlers installed by :meth:`installed`.

    Every further signal is ignored (a terminal's Ctrl-C reaches a rank up to three times: directly, through
    the launcher and through ``mpiexec``); SIGKILL remains the way to end a run without its result.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signum: int, _frame: FrameType | None = None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("%s: stopping at the next point every rank agrees on, then writing the result so far",
                           self.signal_name)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle :data:`STOP_SIGNALS` for the ``with`` block (main thread only: elsewhere, nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self.request) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class AgreedStop:
    """A :class:`SyncExchange` that casts the stop vote before each halo exchange; see the module docstring.

    Everything else is the wrapped exchanger's. ``votes`` counts the votes cast (one per mini-batch).
    """

    def __init__(self, exchanger: SyncExchange, signals: StopSignals) -> None:
        self.exchanger = exchanger
        self.signals = signals
        self.votes = 0
        self.stats: ExchangeStats = exchanger.stats  # the same object: the wrapped exchanger counts
        self.rank = exchanger.rank
        self.size = exchanger.size

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self.exchanger.allreduce_sum(values)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        return self.exchanger.allreduce_max(values)

    def vote(self) -> None:
        """One all-reduce of the flag; raises :class:`StopRequested` on every rank if any rank's is set."""
        self.votes += 1
        agreed = self.exchanger.allreduce_max(np.array([1.0 if self.signals.requested else 0.0]))
        if agreed[0] > 0:
            raise StopRequested(self.signals.signal_name or "another rank's signal")

    def between_batches(self) -> None:
        """The engine's hook: a signalled rank votes now (and so stops within a chunk when all are signalled)."""
        if self.signals.requested:
            self.vote()

    def reduce_gradients(self, gradient: Any, illumination: Any) -> tuple[Any, Any]:
        self.vote()  # unless this rank voted in this mini-batch already: then it raised
        return self.exchanger.reduce_gradients(gradient, illumination)

    def reduce_correction(self, correction: Any) -> Any:
        """No vote: every rank reaches it at each iteration's end, after the iteration's last exchange."""
        return self.exchanger.reduce_correction(correction)



class IterationVote:
    """Async mode's vote, at the end of each iteration but the last (every rank ends every one).

    Non-blocking (:class:`~ptylive.daemon.engine.exchange.consensus.Consensus`), polled with
    ``while_waiting(iteration)`` (the exchanger's progress): a rank waiting for the vote keeps sending its accumulated
    updates, so a neighbour held by the staleness bound cannot wait for it in turn.
    """

    def __init__(self, comm: Any | None, signals: StopSignals, iterations: int,
                 while_waiting: Callable[[int], None]) -> None:
        self.consensus = Consensus(comm, 1, 1)
        self.signals = signals
        self.iterations = iterations
        self.while_waiting = while_waiting
        self.votes = 0

    def __call__(self, iteration: int) -> None:
        if iteration >= self.iterations - 1:
            return
        self.votes += 1
        self.consensus.post(np.zeros(1), np.array([1.0 if self.signals.requested else 0.0]))
        _, agreed = self.consensus.collect(lambda: self.while_waiting(iteration))
        if agreed[0] > 0:
            raise StopRequested(self.signals.signal_name or "another rank's signal")


@dataclass
class Progress:
    """What the iterations that finished reported (the engine's report is lost when it raises).

    ``losses`` are what ``on_iteration`` received: global sums in sync mode, this rank's own after the
    first iteration in async mode (:func:`reduced_report` sums them).
    """

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def recorder(self, then: Callable[[int, float, float], None] | None,
                 vote: Callable[[int], None] | None = None) -> Callable[[int, float, float], None]:
        """An ``on_iteration`` that records, calls ``then`` (progress lines) and then ``vote(iteration)``."""
        def on_iteration(iteration: int, loss: float, seconds: float) -> None:
            self.losses.append(float(loss))
            self.seconds.append(float(seconds))
            if then is not None:
                then(iteration, loss, seconds)
            if vote is not None:
                vote(iteration)

        return on_iteration


def reduced_report(progress: Progress, exchanger: SyncExchange, mode: str) -> EngineReport:
    """The report of an interrupted run: the finished iterations' losses (async: summed over ranks)."""
    losses = list(progress.losses)
    if mode == "async" and len(losses) > 1:  # iteration 0 is exact (a global sum); later ones are local
        losses = losses[:1] + [float(v) for v in exchanger.allreduce_sum(np.array(losses[1:]))]
    report = EngineReport(loss_history=losses, iterations_s=list(progress.seconds))
    report.compute_s = sum(report.iterations_s) - exchanger.stats.wait_s
    return report


def finish_async(state: TileState, exchanger: AsyncExchange, options: EngineOptions, n_iterations: int) -> None:
    """End an interrupted async run as :func:`~ptylive.daemon.engine.iteration.run_async` ends a finished one.

    Every rank stopped at the end of the same iteration, so each has the same probe reduction outstanding
    (or none); it is collected and applied, and the accumulated halo updates are drained (collective).
    """
    total = exchanger.finish_probe_reduction()
    if total is not None:
        n_positions = float(exchanger.allreduce_sum(np.array([float(len(state.starts))]))[0])
        apply_probe_total(state, total, options, n_positions)
    exchanger.finish(state.volume, n_iterations * options.updates_per_iteration)
    constrain(state.volume, options.max_amplitude)
