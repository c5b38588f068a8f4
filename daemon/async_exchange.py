"""Asynchronous halo gradient exchange with the method's three buffers.

Per neighbour ``n`` and its exchange region ``R_n`` a rank keeps:

* ``accumulated[n]`` — the sum of its own object updates over ``R_n`` since
  the last send (it applies them to its own tile at once);
* ``send[n]`` — a packed copy of the accumulation (plus its current
  illumination over ``R_n``) in flight in a non-blocking ``Isend``;
* ``recv[n]`` — the landing buffer of a pre-posted ``Irecv``; when it
  completes, the neighbour's updates are added to the tile and its
  illumination replaces the previous one in the preconditioner.

Compute never waits on the network: :meth:`AsyncExchanger.progress` only
tests requests (non-blocking MPI does not progress while numpy computes, so
the engine calls it between batches). The one exception is the staleness
bound: a rank that is more than ``max_staleness`` iterations ahead of what it
has received from a neighbour waits for that neighbour, and the wait is
counted. At the end :meth:`finish` sends the remaining accumulation flagged
*last* and drains every neighbour until their *last* message arrived, so all
copies of a voxel end with the same sum of updates.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ptylive.daemon.decomposition import RankDomain
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.daemon.exchange import ExchangeStats, SyncExchanger, pack, unpack

logger = logging.getLogger(__name__)

TAG_ASYNC = 11
HEADER = 2  # (iteration, is_last)


class AsyncExchanger(SyncExchanger):
    """Non-blocking exchange of accumulated updates; see the module docstring."""

    def __init__(self, comm: Any, domain: RankDomain, n_slices: int, real_dtype: Any,
                 complex_dtype: Any, max_staleness: int = 4) -> None:
        super().__init__(comm, domain, n_slices, real_dtype)
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        self.max_staleness = max_staleness
        shapes = [shape for _, _, shape in self.regions]
        self.accumulated = [np.zeros(s, complex_dtype) for s in shapes]
        self.neighbour_illumination = [np.zeros(s, real_dtype) for s in shapes]
        self.async_send = [np.empty(HEADER + 3 * int(np.prod(s)), real_dtype) for s in shapes]
        self.async_recv = [np.empty_like(b) for b in self.async_send]
        self.send_requests: list[Any] = [None] * len(shapes)
        self.recv_requests: list[Any] = [self._post_recv(i) for i in range(len(shapes))]
        self.last_received = [-1] * len(shapes)
        self.finished = [False] * len(shapes)
        self.stats = ExchangeStats()

    def _post_recv(self, i: int) -> Any:
        return self.comm.Irecv(self.async_recv[i], source=self.regions[i][0], tag=TAG_ASYNC)

    def _send(self, i: int, illumination: Any, iteration: int, last: bool) -> None:
        _, region, _ = self.regions[i]
        pack(self.accumulated[i], illumination[(slice(None), *region)], self.async_send[i],
             header=(iteration, float(last)))
        self.accumulated[i][...] = 0
        self.send_requests[i] = self.comm.Isend(self.async_send[i], dest=self.regions[i][0], tag=TAG_ASYNC)
        self.stats.bytes_sent += self.async_send[i].nbytes
        self.stats.messages_sent += 1

    def push(self, update: Any, illumination: Any, iteration: int) -> None:
        """Accumulate this rank's update over each region; send where the link is free.

        Parameters
        ----------
        update : (S, He, We) complex
            What this rank just added to its extended tile.
        illumination : (S, He, We) real
            Its own (local) illumination.
        iteration : int
        """
        for i, (_, region, _) in enumerate(self.regions):
            self.accumulated[i] += to_numpy(update[(slice(None), *region)])
            request = self.send_requests[i]
            if request is None or request.Test():
                self._send(i, illumination, iteration, last=False)

    def _apply(self, i: int, volume: Any, iteration: int) -> bool:
        _, region, shape = self.regions[i]
        sent_iteration, last = self.async_recv[i][0], self.async_recv[i][1]
        update, illumination = unpack(self.async_recv[i], shape, n_head=HEADER)
        xp = get_array_module(volume)
        volume[(slice(None), *region)] += xp.asarray(update)
        self.neighbour_illumination[i][...] = illumination
        self.last_received[i] = int(sent_iteration)
        self.stats.staleness.append(max(iteration - int(sent_iteration), 0))
        if last:
            self.finished[i] = True
            return False
        return True

    def progress(self, volume: Any, iteration: int) -> None:
        """Apply every neighbour message that has arrived; never blocks."""
        for i, request in enumerate(self.recv_requests):
            while request is not None and request.Test():
                request = self._post_recv(i) if self._apply(i, volume, iteration) else None
            self.recv_requests[i] = request

    def enforce_staleness(self, volume: Any, iteration: int) -> None:
        """Wait (counted) only for neighbours more than ``max_staleness`` behind."""
        for i, _ in enumerate(self.regions):
            while (not self.finished[i] and self.recv_requests[i] is not None
                   and iteration - self.last_received[i] > self.max_staleness):
                start = time.perf_counter()
                self.recv_requests[i].Wait()
                self.stats.wait_s += time.perf_counter() - start
                self.recv_requests[i] = self._post_recv(i) if self._apply(i, volume, iteration) else None

    def remember_neighbour_illumination(self) -> None:
        """After a blocking :meth:`reduce_gradients`, keep each neighbour's illumination."""
        for i, (_, _, shape) in enumerate(self.regions):
            self.neighbour_illumination[i][...] = unpack(self.recv[i], shape)[1]
            self.last_received[i] = 0

    def total_illumination(self, own: Any) -> Any:
        """Own illumination plus the latest received from each neighbour."""
        xp = get_array_module(own)
        total = own.copy()
        for (_, region, _), theirs in zip(self.regions, self.neighbour_illumination):
            total[(slice(None), *region)] += xp.asarray(theirs)
        return total

    def finish(self, volume: Any, illumination: Any, iteration: int) -> None:
        """Flush the accumulation (flagged last) and drain all neighbours."""
        from mpi4py import MPI

        start = time.perf_counter()
        for i in range(len(self.regions)):
            if self.send_requests[i] is not None:
                self.send_requests[i].Wait()
            self._send(i, illumination, iteration, last=True)
        for i in range(len(self.regions)):
            while self.recv_requests[i] is not None:
                self.recv_requests[i].Wait()
                self.recv_requests[i] = self._post_recv(i) if self._apply(i, volume, iteration) else None
        MPI.Request.Waitall([r for r in self.send_requests if r is not None])
        self.stats.wait_s += time.perf_counter() - start
