"""The one place that picks a rank's exchanger (offline and streaming alike)."""

from __future__ import annotations

from typing import Any

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.exchange.asynchronous import AsyncExchanger
from ptylive.daemon.engine.exchange.protocols import AsyncExchange, NullExchanger, SyncExchange
from ptylive.daemon.engine.exchange.sync import SyncExchanger
from ptylive.daemon.engine.options import EngineOptions
from ptylive.gpu.backend import PRECISIONS


def _single(comm: Any | None) -> bool:
    return comm is None or comm.Get_size() == 1


def sync_exchanger(comm: Any | None, domain: RankDomain, n_slices: int, precision: str) -> SyncExchange:
    """Blocking exchange over ``comm`` (the ranks sharing the object); :class:`NullExchanger` for one rank."""
    if _single(comm):
        return NullExchanger()
    return SyncExchanger(comm, domain, n_slices, PRECISIONS[precision][0])


def async_exchanger(comm: Any | None, domain: RankDomain, n_slices: int, precision: str,
                    options: EngineOptions) -> AsyncExchange:
    """Three-buffer exchange over ``comm``; :class:`NullExchanger` for one rank."""
    if _single(comm):
        return NullExchanger()
    real_t, complex_t = PRECISIONS[precision]
    return AsyncExchanger(comm, domain, n_slices, real_t, complex_t, options.max_staleness,
                          options.updates_per_iteration, options.max_amplitude)
