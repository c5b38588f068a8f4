"""Asynchronous halo gradient exchange with the method's three buffers.

Per neighbour ``n`` and its exchange region ``R_n`` a rank keeps:

* ``accumulated[n]`` — the sum of its own object updates over ``R_n`` since
  the last send (it applies them to its own tile at once);
* ``send[n]`` — a packed copy of the accumulation, plus the rank's
  illumination over ``R_n`` for the latest mini-batch, in flight in a
  non-blocking ``Isend``;
* ``recv[n]`` — the landing buffer of a pre-posted ``Irecv``; when it
  completes, the neighbour's updates are added to the tile and its
  illumination is kept per mini-batch for the preconditioner.

Send and receive buffers hold one *round* of slices (:func:`~.sync.common_round_slices`, the same for
every region), not the whole depth: a flush of the accumulation is a sequence of messages, one per
round, each sent when the previous one has left; each message carries its first slice, and the receiver
adds each as it lands (updates add, so nothing depends on the rounds arriving together). Updates pushed
during a flush accumulate over every slice and go in the next flush.

Compute never waits on the network: :meth:`AsyncExchanger.progress` only
tests requests (non-blocking MPI does not progress while numpy computes, so
the engine calls it between batches). The one exception is the staleness
bound: a rank more than ``max_staleness`` updates ahead of what it has
received from a neighbour waits for it — while still flushing its own
accumulation, so two waiting ranks cannot deadlock — and the wait is counted.
At the end :meth:`finish` sends the remaining accumulation flagged *last*
and drains every neighbour until their *last* message arrived, so all copies
of a voxel end with the same sum of updates. No call here blocks on a single
request: every wait is a polling loop over all of them, so ranks waiting on
one another keep each other's messages moving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.exchange.protocols import ExchangeStats
from ptylive.daemon.engine.exchange.sync import SyncExchanger, add_pairs, pack, unpack
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.gpu.update import constrain

logger = logging.getLogger(__name__)

TAG_ASYNC = 11
HEADER = 4  # (update step, is_last, mini-batch of the illumination, first slice of the round)
POLL_S = 2e-4


class AsyncExchanger(SyncExchanger):
    """Non-blocking exchange of accumulated updates; see the module docstring.

    Inherits the blocking :meth:`reduce_gradients` (used for the first,
    exact update) and the collectives from :class:`SyncExchanger`.
    """

    def __init__(self, comm: Any, domain: RankDomain, n_slices: int, real_dtype: Any,
                 complex_dtype: Any, max_staleness: int = 4, n_minibatches: int = 1,
                 max_amplitude: float | None = 1.0, *, round_slices: int) -> None:
        super().__init__(comm, domain, n_slices, real_dtype, round_slices)
        self.max_amplitude = max_amplitude
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        self.max_staleness = max_staleness
        shapes = [shape for _, _, shape in self.regions]
        self.accumulated = [np.zeros(s, complex_dtype) for s in shapes]
        self.cursor: list[int | None] = [None] * len(shapes)  # next slice of a flush in progress (None: idle)
        # The own illumination of the latest update, once over the extended tile (the regions overlap one another:
        # per-region copies took ~3.5 tiles on a 24-rank run with 256-px windows); rounds pack their region from it.
        self.staged_illumination = np.zeros((n_slices, *domain.extended.shape) if shapes else (0, 0, 0), real_dtype)
        # A mini-batch lights the same voxels every iteration, so keeping each
        # neighbour's illumination per mini-batch reproduces sync's preconditioner.
        self.neighbour_illumination = [np.zeros((n_minibatches, *s), real_dtype) for s in shapes]
        # Each neighbour's illumination of the last blocking exchange, until remember_neighbour_illumination says
        # its mini-batch; with one mini-batch it can only be mini-batch 0, so it lands there directly.
        self.exact_illumination = ([slot[0] for slot in self.neighbour_illumination] if n_minibatches == 1
                                   else [np.zeros(s, real_dtype) for s in shapes])
        self.async_send = [np.empty(HEADER + 3 * round_slices * int(np.prod(s[1:])), real_dtype)
                           for s in shapes]
        self.async_recv = [np.empty_like(b) for b in self.async_send]
        self.send_requests: list[Any] = [None] * len(shapes)
        self.recv_requests: list[Any] = [self._post_recv(i) for i in range(len(shapes))]
        self.pending = [False] * len(shapes)
        self.staged = [(0, 0)] * len(shapes)  # (step, mini-batch) of the staged content
        self.last_received = [-1] * len(shapes)
        self.finished = [False] * len(shapes)
        self.stats = ExchangeStats()
        self.probe_send: np.ndarray | None = None
        self.probe_total: np.ndarray | None = None
        self.probe_request: Any = None

    def _post_recv(self, i: int) -> Any:
        return self.comm.Irecv(self.async_recv[i], source=self.regions[i][0], tag=TAG_ASYNC)

    def _send_round(self, i: int, last: bool = False) -> None:
        """Send the next round of region ``i``'s flush (starting one if idle); ``last`` flags a flush's final round."""
        step, minibatch = self.staged[i]
        cursor = self.cursor[i]
        first = 0 if cursor is None else cursor
        if first == 0:
            self.pending[i] = False  # this flush takes everything accumulated so far (and what comes meanwhile)
        depth = slice(first, min(first + self.round_slices, self.n_slices))
        ending = depth.stop >= self.n_slices
        size = HEADER + 3 * (depth.stop - depth.start) * int(np.prod(self.regions[i][2][1:]))
        send = self.async_send[i][:size]
        pack(self.accumulated[i][depth], self.staged_illumination[(depth, *self.regions[i][1])], send,
             header=(step, float(last and ending), minibatch, first))
        self.accumulated[i][depth] = 0
        self.cursor[i] = None if ending else depth.stop
        self.send_requests[i] = self.comm.Isend(send, dest=self.regions[i][0], tag=TAG_ASYNC)
        self.stats.bytes_sent += send.nbytes
        self.stats.messages_sent += 1

    def _flush(self) -> None:
        """Send the next round of every region with something to send whose link is free."""
        for i, request in enumerate(self.send_requests):
            if (self.pending[i] or self.cursor[i] is not None) and (request is None or request.Test()):
                self._send_round(i)

    def push(self, update: Any, illumination: Any, step: int, minibatch: int) -> None:
        """Accumulate this rank's update over each region; send where the link is free.

        Parameters
        ----------
        update : (S, He, We) complex
            What this rank just added to its extended tile.
        illumination : (S, He, We) real
            Its own illumination of this mini-batch.
        step : int
            Update counter (iteration × mini-batches + mini-batch).
        minibatch : int
        """
        if self.regions:
            self.staged_illumination[...] = to_numpy(illumination)
        self.staged = [(step, minibatch)] * len(self.regions)
        self._accumulate(update)

    def push_correction(self, correction: Any) -> None:
        """Accumulate a change made outside an update over each region, as :meth:`push` does an update.

        The missing-cone correction (:mod:`ptylive.daemon.engine.cone`): this rank's own tile, zero elsewhere,
        so each copy of a voxel receives its owner's correction once. The staged illumination and mini-batch
        stay the last update's (the neighbour keeps what it already holds).

        Parameters
        ----------
        correction : (S, He, We) complex
            What this rank just added to its extended tile.
        """
        self._accumulate(correction)

    def _accumulate(self, change: Any) -> None:
        """Add ``change`` (S, He, We) over each region to what is to be sent; send where the link is free."""
        for i, (_, region, _) in enumerate(self.regions):
            self.accumulated[i] += to_numpy(change[(slice(None), *region)])
            self.pending[i] = True
        self._flush()

    def _apply(self, i: int, volume: Any, step: int) -> None:
        _, region, shape = self.regions[i]
        sent_step, last, minibatch, first = (int(v) for v in self.async_recv[i][:HEADER])
        depth = slice(first, min(first + self.round_slices, self.n_slices))
        update, illumination = unpack(self.async_recv[i], (depth.stop - depth.start, *shape[1:]), n_head=HEADER)
        target = volume[(depth, *region)]
        add_pairs(target, update)
        # A neighbour's update arrives after this rank's own constraint: without its own, |O| > 1 grew
        # through the slices until the wave overflowed (NaN from the second iteration on a thick crystal).
        constrain(target, self.max_amplitude)
        self.neighbour_illumination[i][minibatch][depth] = illumination
        self.last_received[i] = sent_step
        self.stats.staleness.append(max(step - sent_step, 0))
        self.finished[i] = bool(last)
        self.recv_requests[i] = None if last else self._post_recv(i)

    def progress(self, volume: Any, step: int) -> None:
        """Apply every neighbour message that has arrived and flush free links; never blocks."""
        for i in range(len(self.regions)):
            while self.recv_requests[i] is not None and self.recv_requests[i].Test():
                self._apply(i, volume, step)
        self._flush()

    def _behind(self, step: int) -> bool:
        return any(not done and step - last > self.max_staleness
                   for done, last in zip(self.finished, self.last_received, strict=True))

    def enforce_staleness(self, volume: Any, step: int) -> None:
        """Wait (counted) only while a neighbour is more than ``max_staleness`` behind."""
        if not self._behind(step):
            return
        start = time.perf_counter()
        while self._behind(step):
            self.progress(volume, step)
            time.sleep(POLL_S)
        self.stats.wait_s += time.perf_counter() - start

    def received_illumination(self, region: int, depth: slice, illumination: np.ndarray) -> None:
        self.exact_illumination[region][depth] = illumination

    def remember_neighbour_illumination(self, minibatch: int, step: int) -> None:
        """After a blocking :meth:`reduce_gradients`, keep each neighbour's illumination of it."""
        for i in range(len(self.regions)):
            if len(self.neighbour_illumination[i]) > 1:  # with one mini-batch it landed in place
                self.neighbour_illumination[i][minibatch] = self.exact_illumination[i]
            self.last_received[i] = step

    def total_illumination(self, own: Any, minibatch: int) -> Any:
        """Own illumination plus each neighbour's latest for this mini-batch."""
        xp = get_array_module(own)
        total = own.copy()
        for (_, region, _), theirs in zip(self.regions, self.neighbour_illumination, strict=True):
            total[(slice(None), *region)] += xp.asarray(theirs[minibatch])
        return total

    def start_probe_reduction(self, probe_gradient: np.ndarray) -> None:
        """Post a non-blocking all-reduce (sum) of this rank's probe gradient.

        Every rank must call it the same number of times (once per iteration);
        :meth:`finish_probe_reduction` collects the result.
        """
        from mpi4py import MPI

        if self.probe_request is not None:
            raise RuntimeError("previous probe reduction still outstanding")
        self.probe_send = np.ascontiguousarray(probe_gradient).copy()
        self.probe_total = np.empty_like(self.probe_send)
        self.probe_request = self.comm.Iallreduce(self.probe_send, self.probe_total, op=MPI.SUM)
        self.stats.bytes_sent += self.probe_send.nbytes

    def finish_probe_reduction(self) -> np.ndarray | None:
        """The summed probe gradient of the outstanding reduction (waits, counted), or None."""
        if self.probe_request is None:
            return None
        start = time.perf_counter()
        self.probe_request.Wait()
        self.stats.wait_s += time.perf_counter() - start
        self.probe_request = None
        return self.probe_total

    def finish(self, volume: Any, step: int) -> None:
        """Flush the accumulation (flagged last) and drain all neighbours.

        Polls every request instead of waiting on one at a time: a blocking
        ``Wait`` on one neighbour leaves messages from the others unprocessed,
        and four ranks each waiting on the next formed a cycle (seen as a hang
        in about one run in seven).
        """
        start = time.perf_counter()
        last_sent = [False] * len(self.regions)
        final = [False] * len(self.regions)  # the final flush (every round, the last one flagged) has begun
        while True:
            for i in range(len(self.regions)):
                while self.recv_requests[i] is not None and self.recv_requests[i].Test():
                    self._apply(i, volume, step)
                request = self.send_requests[i]
                if last_sent[i] or not (request is None or request.Test()):
                    continue
                if self.cursor[i] is not None and not final[i]:  # finish the flush in progress first
                    self._send_round(i)
                    continue
                if not final[i]:
                    final[i] = True
                    self.staged[i] = (step, self.staged[i][1])
                self._send_round(i, last=True)
                last_sent[i] = self.cursor[i] is None
            if (all(last_sent) and all(r is None for r in self.recv_requests)
                    and all(r is None or r.Test() for r in self.send_requests)):
                break
            time.sleep(POLL_S)
        self.stats.wait_s += time.perf_counter() - start
