"""Agreement between worker ranks without stopping compute: one non-blocking reduction per tick.

Streaming workers receive frames at different times, yet they must agree on everything that
changes *when* they do collective work: the detector scale, the preconditioner floors, whether
the series has ended everywhere, when to stop. Each tick a worker posts its local facts in
two non-blocking all-reduces (one SUM vector, one MAX vector) and collects the totals of the
previous tick's post. Every worker posts the same number of times, so every worker decides
on identical totals at the same tick — without any rank waiting for another in the usual
case (the reduction completes while the previous iteration computes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

POLL_S = 2e-4


class Consensus:
    """Non-blocking SUM and MAX all-reduce of float64 vectors among the workers.

    Parameters
    ----------
    comm : mpi4py communicator of the workers, or None for a single worker.
    n_sum, n_max : int
        Lengths of the two vectors.
    """

    def __init__(self, comm: Any | None, n_sum: int, n_max: int) -> None:
        self.comm = comm if comm is not None and comm.Get_size() > 1 else None
        self._send = (np.zeros(n_sum), np.zeros(n_max))
        self._recv = (np.zeros(n_sum), np.zeros(n_max))
        self._requests: list[Any] = []
        self.wait_s = 0.0

    @property
    def posted(self) -> bool:
        return bool(self._requests) or (self.comm is None and self._pending)

    _pending = False

    def post(self, sums: np.ndarray, maxes: np.ndarray) -> None:
        """Start reducing ``sums`` (added over workers) and ``maxes`` (largest over workers)."""
        if self.posted:
            raise RuntimeError("the previous reduction was not collected")
        self._send[0][...] = sums
        self._send[1][...] = maxes
        if self.comm is None:
            self._recv[0][...], self._recv[1][...] = self._send
            self._pending = True
            return
        from mpi4py import MPI

        self._requests = [self.comm.Iallreduce(self._send[0], self._recv[0], op=MPI.SUM),
                          self.comm.Iallreduce(self._send[1], self._recv[1], op=MPI.MAX)]

    def collect(self, while_waiting: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Totals of the last post (copies); polls, calling ``while_waiting`` between tests (counted wait)."""
        if not self.posted:
            raise RuntimeError("nothing was posted")
        if self.comm is not None:
            from mpi4py import MPI

            start = time.perf_counter()
            while not MPI.Request.Testall(self._requests):
                if while_waiting is not None:
                    while_waiting()
                time.sleep(POLL_S)
            self.wait_s += time.perf_counter() - start
            self._requests = []
        self._pending = False
        return self._recv[0].copy(), self._recv[1].copy()
