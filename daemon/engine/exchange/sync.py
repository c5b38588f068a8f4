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


#: Bytes of one round's send buffers (all neighbours together); a round carries as many slices as fit, at least one.
EXCHANGE_ROUND_BYTES = 16 * 2**20


def slices_per_round(domain: RankDomain, n_slices: int, real_itemsize: int,
                     round_bytes: int = EXCHANGE_ROUND_BYTES) -> int:
    """Slices exchanged per round: the send buffers (gradient + illumination, 3 reals per voxel, over every
    exchange region) of one round stay within ``round_bytes``, so they do not grow with the depth."""
    per_slice = 3 * real_itemsize * sum(box.size for _, box in domain.neighbours)
    if per_slice == 0:
        return max(n_slices, 1)
    return int(min(max(round_bytes // per_slice, 1), max(n_slices, 1)))


class SyncExchanger:
    """Exact, blocking halo gradient exchange over MPI point-to-point messages.

    The regions are exchanged in rounds of :func:`slices_per_round` slices, so the pack buffers hold one
    round (about :data:`EXCHANGE_ROUND_BYTES`), not the whole depth: they are sized by the overlaps' area,
    not by the tile's volume.
    """

    def __init__(self, comm: Any, domain: RankDomain, n_slices: int, real_dtype: Any,
                 round_bytes: int = EXCHANGE_ROUND_BYTES) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.domain = domain
        self.stats = ExchangeStats()
        self.n_slices = n_slices
        self.regions = [(n, box.relative_to(domain.extended), (n_slices, *box.shape))
                        for n, box in domain.neighbours]
        self.round_slices = slices_per_round(domain, n_slices, np.dtype(real_dtype).itemsize, round_bytes)
        self.send = [np.empty(3 * self.round_slices * int(np.prod(shape[1:])), real_dtype)
                     for _, _, shape in self.regions]
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

        xp = get_array_module(gradient)
        for first in range(0, self.n_slices, self.round_slices):
            depth = slice(first, min(first + self.round_slices, self.n_slices))
            requests = []
            for (n, region, shape), send, recv in zip(self.regions, self.send, self.recv, strict=True):
                size = 3 * (depth.stop - depth.start) * int(np.prod(shape[1:]))
                pack(gradient[(depth, *region)], illumination[(depth, *region)], send[:size])
                requests.append(self.comm.Irecv(recv[:size], source=n, tag=TAG_SYNC))
                requests.append(self.comm.Isend(send[:size], dest=n, tag=TAG_SYNC))
                self.stats.bytes_sent += send[:size].nbytes
                self.stats.messages_sent += 1
            start = time.perf_counter()
            MPI.Request.Waitall(requests)
            self.stats.wait_s += time.perf_counter() - start
            for i, ((_, region, shape), recv) in enumerate(zip(self.regions, self.recv, strict=True)):
                pairs, received_illumination = unpack(recv, (depth.stop - depth.start, *shape[1:]))
                add_pairs(gradient[(depth, *region)], pairs)
                illumination[(depth, *region)] += xp.asarray(received_illumination)
                self.received_illumination(i, depth, received_illumination)
        return gradient, illumination

    def received_illumination(self, region: int, depth: slice, illumination: np.ndarray) -> None:
        """Called with each neighbour's illumination of a round (slices ``depth``); the async exchanger keeps it."""
