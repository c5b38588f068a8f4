"""What the engine needs from a halo exchange, and the one place that picks an exchanger.

Two protocols, typed as the engine's arguments:

* :class:`SyncExchange` — blocking totals: :func:`~ptylive.daemon.engine.iteration.run_sync` calls
  :meth:`~SyncExchange.reduce_gradients` once per mini-batch and every rank then applies the same
  update (``sync`` mode, and the exact first iteration of ``async`` mode).
* :class:`AsyncExchange` — the method's three buffers: a rank applies its own update at once,
  :meth:`~AsyncExchange.push` adds it to the *accumulated* buffer of each overlap and sends it when
  the link is free, :meth:`~AsyncExchange.progress` adds what neighbours sent; compute never waits
  except to bound staleness.

Implementations: :class:`NullExchanger` (one rank; both protocols, nothing to exchange, tike's
``NoMPIComm`` idea), :class:`~ptylive.daemon.engine.exchange.sync.SyncExchanger` and
:class:`~ptylive.daemon.engine.exchange.asynchronous.AsyncExchanger` (MPI); :mod:`.factory` picks one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ExchangeStats:
    """Counters every exchanger keeps (reported per rank in the result file)."""

    wait_s: float = 0.0
    bytes_sent: int = 0
    messages_sent: int = 0
    staleness: list[int] = field(default_factory=list)


class SyncExchange(Protocol):
    """Blocking reductions over every rank (``sync`` mode)."""

    stats: ExchangeStats
    rank: int
    size: int

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray: ...

    def allreduce_max(self, values: np.ndarray) -> np.ndarray: ...

    def reduce_gradients(self, gradient: Any, illumination: Any) -> tuple[Any, Any]:
        """Totals over every rank of ``gradient`` (S, He, We) complex and ``illumination`` (S, He, We) real."""
        ...

    def reduce_correction(self, correction: Any) -> Any:
        """In place: each voxel's ``correction`` (S, He, We) complex summed over every rank that holds it."""
        ...


class AsyncExchange(SyncExchange, Protocol):
    """The three-buffer exchange (``async`` mode); its first iteration uses the blocking calls."""

    def remember_neighbour_illumination(self, minibatch: int, step: int) -> None:
        """After a blocking reduction, keep each neighbour's illumination of ``minibatch``."""
        ...

    def total_illumination(self, own: Any, minibatch: int) -> Any:
        """A new array: ``own`` (S, He, We) real plus each neighbour's latest of ``minibatch``."""
        ...

    def push(self, update: Any, illumination: Any, step: int, minibatch: int) -> None:
        """Accumulate this rank's ``update`` over each overlap and send where the link is free."""
        ...

    def push_correction(self, correction: Any) -> None:
        """Accumulate a change made outside an update (own tile only) and send where the link is free."""
        ...

    def progress(self, volume: Any, step: int) -> None:
        """Add every neighbour update that has arrived to ``volume``; never blocks."""
        ...

    def enforce_staleness(self, volume: Any, step: int) -> None:
        """Wait (counted) only while a neighbour is more than the allowed number of updates behind."""
        ...

    def start_probe_reduction(self, probe_gradient: np.ndarray) -> None:
        """Post a non-blocking sum of this rank's probe gradient over every rank."""
        ...

    def finish_probe_reduction(self) -> np.ndarray | None:
        """The outstanding probe sum (waits, counted), or None when none was posted."""
        ...

    def finish(self, volume: Any, step: int) -> None:
        """Send the last accumulation and drain every neighbour."""
        ...


class NullExchanger:
    """One rank: sums are identities, there are no neighbours; serves both protocols."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.stats = ExchangeStats()
        self._probe_total: np.ndarray | None = None

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def reduce_gradients(self, gradient: Any, illumination: Any) -> tuple[Any, Any]:
        return gradient, illumination

    def reduce_correction(self, correction: Any) -> Any:
        return correction

    def push_correction(self, correction: Any) -> None:
        """Nobody to send to."""

    def remember_neighbour_illumination(self, minibatch: int, step: int) -> None:
        """No neighbours."""

    def total_illumination(self, own: Any, minibatch: int) -> Any:
        """A copy of ``own`` (the update overwrites it as scratch)."""
        return own.copy()

    def push(self, update: Any, illumination: Any, step: int, minibatch: int) -> None:
        """Nobody to send to."""

    def progress(self, volume: Any, step: int) -> None:
        """Nothing arrives."""

    def enforce_staleness(self, volume: Any, step: int) -> None:
        """Never behind."""

    def start_probe_reduction(self, probe_gradient: np.ndarray) -> None:
        if self._probe_total is not None:
            raise RuntimeError("previous probe reduction still outstanding")
        self._probe_total = np.array(probe_gradient, copy=True)

    def finish_probe_reduction(self) -> np.ndarray | None:
        total, self._probe_total = self._probe_total, None
        return total

    def finish(self, volume: Any, step: int) -> None:
        """Nothing to drain."""
