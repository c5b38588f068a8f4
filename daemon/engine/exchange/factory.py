"""The one place that picks a rank's exchanger (offline and streaming alike)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.exchange.asynchronous import AsyncExchanger
from ptylive.daemon.engine.exchange.protocols import AsyncExchange, NullExchanger, SyncExchange
from ptylive.daemon.engine.exchange.sync import SyncExchanger, common_round_slices
from ptylive.daemon.engine.options import EngineOptions
from ptylive.gpu.backend import PRECISIONS


def _single(comm: Any | None) -> bool:
    return comm is None or comm.Get_size() == 1


def sync_exchanger(comm: Any | None, domains: Sequence[RankDomain], rank: int, n_slices: int,
                   precision: str) -> SyncExchange:
    """Blocking exchange of ``domains[rank]`` over ``comm`` (the ranks sharing the object, ``domains`` every
    one's: their rounds are agreed from all of them, :func:`~.sync.common_round_slices`); :class:`NullExchanger`
    for one rank."""
    if _single(comm):
        return NullExchanger()
    rounds = common_round_slices(domains, n_slices, precision)
    return SyncExchanger(comm, domains[rank], n_slices, PRECISIONS[precision][0], rounds)


def async_exchanger(comm: Any | None, domains: Sequence[RankDomain], rank: int, n_slices: int, precision: str,
                    options: EngineOptions) -> AsyncExchange:
    """Three-buffer exchange of ``domains[rank]`` over ``comm``; :class:`NullExchanger` for one rank."""
    if _single(comm):
        return NullExchanger()
    real_t, complex_t = PRECISIONS[precision]
    rounds = common_round_slices(domains, n_slices, precision)
    return AsyncExchanger(comm, domains[rank], n_slices, real_t, complex_t, options.max_staleness,
                          options.updates_per_iteration, options.max_amplitude, round_slices=rounds)
