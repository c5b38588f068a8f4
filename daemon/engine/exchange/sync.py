"""Halo gradient exchange between ranks whose extended tiles overlap.

The protocols the engine is typed against are in :mod:`.protocols`.

* :class:`SyncExchanger` — every iteration, each rank sends its local
  gradient and illumination over each exchange region, receives its
  neighbours' and adds them in place, so every copy of a voxel holds the
  same totals (to rounding) and the stitched result equals the undecomposed one.
* :class:`AsyncExchanger` (module :mod:`ptylive.daemon.engine.exchange.asynchronous`) —
  the method's three buffers; compute never waits on the network.

Exchange regions are drawn in :mod:`ptylive.daemon.engine.decomposition`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.exchange.protocols import ExchangeStats
from ptylive.gpu.backend import get_array_module, to_numpy

logger = logging.getLogger(__name__)

TAG_SYNC = 7


def pack(complex_block: Any, real_block: Any, out: np.ndarray, header: tuple[float, ...] = ()) -> None:
    """Pack ``header``, a complex block and a real block of one shape into ``out`` (real, 1-D)."""
    n_head = len(header)
    out[:n_head] = header
    n = complex_block.size
    pairs = out[n_head:n_head + 2 * n].reshape(complex_block.shape + (2,))
    pairs[..., 0] = to_numpy(complex_block.real)
    pairs[..., 1] = to_numpy(complex_block.imag)
    out[n_head + 2 * n:] = to_numpy(real_block).ravel()


def unpack(buffer: np.ndarray, shape: tuple[int, ...], n_head: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views of :func:`pack`'s blocks: ``(pairs (*shape, 2) real/imag, real block (*shape))``."""
    n = int(np.prod(shape))
    return buffer[n_head:n_head + 2 * n].reshape(shape + (2,)), buffer[n_head + 2 * n:n_head + 3 * n].reshape(shape)


def add_pairs(target: Any, pairs: np.ndarray) -> None:
    """``target += pairs[..., 0] + i·pairs[..., 1]`` without a complex temporary."""
    xp = get_array_module(target)
    target.real += xp.asarray(pairs[..., 0])
    target.imag += xp.asarray(pairs[..., 1])


class SyncExchanger:
    """Exact, blocking halo gradient exchange over MPI point-to-point messages."""

    def __init__(self, comm: Any, domain: RankDomain, n_slices: int, real_dtype: Any) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.domain = domain
        self.stats = ExchangeStats()
        self.regions = [(n, box.relative_to(domain.extended), (n_slices, *box.shape))
                        for n, box in domain.neighbours]
        self.send = [np.empty(3 * int(np.prod(shape)), real_dtype) for _, _, shape in self.regions]
        self.recv = [np.empty_like(b) for b in self.send]

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(values := np.ascontiguousarray(values))
        self.comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(values := np.ascontiguousarray(values))
        self.comm.Allreduce(values, out, op=MPI.MAX)
        return out

    def reduce_gradients(self, gradient: Any, illumination: Any) -> tuple[Any, Any]:
        """Return total gradient and illumination over the extended tile.

        Parameters
        ----------
        gradient : (S, He, We) complex
            This rank's contribution (its probe group only).
        illumination : (S, He, We) real

        Returns
        -------
        The sums over every rank's probe group: the inputs themselves, with
        the neighbours' contributions added in place in ascending rank order
        (no tile-sized copies). Copies of a voxel agree bit for bit where at
        most two ranks hold it (addition commutes) and to rounding elsewhere.
        """
        from mpi4py import MPI

        requests = []
        for (n, region, _), send, recv in zip(self.regions, self.send, self.recv, strict=True):
            pack(gradient[(slice(None), *region)], illumination[(slice(None), *region)], send)
            requests.append(self.comm.Irecv(recv, source=n, tag=TAG_SYNC))
            requests.append(self.comm.Isend(send, dest=n, tag=TAG_SYNC))
            self.stats.bytes_sent += send.nbytes
            self.stats.messages_sent += 1
        start = time.perf_counter()
        MPI.Request.Waitall(requests)
        self.stats.wait_s += time.perf_counter() - start
        xp = get_array_module(gradient)
        for (_, region, shape), recv in zip(self.regions, self.recv, strict=True):
            pairs, received_illumination = unpack(recv, shape)
            add_pairs(gradient[(slice(None), *region)], pairs)
            illumination[(slice(None), *region)] += xp.asarray(received_illumination)
        return gradient, illumination
