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
from collections.abc import Sequence
from typing import Any

import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.exchange.protocols import ExchangeStats
from ptylive.gpu.backend import PRECISIONS, get_array_module, to_numpy

logger = logging.getLogger(__name__)

TAG_SYNC = 7


def pack(complex_block: Any, real_block: Any | None, out: np.ndarray, header: tuple[float, ...] = ()) -> None:
    """Pack ``header``, a complex block and a real block of one shape (None: none) into ``out`` (real, 1-D)."""
    n_head = len(header)
    out[:n_head] = header
    n = complex_block.size
    pairs = out[n_head:n_head + 2 * n].reshape(complex_block.shape + (2,))
    pairs[..., 0] = to_numpy(complex_block.real)
    pairs[..., 1] = to_numpy(complex_block.imag)
    if real_block is not None:
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


#: Bytes of one region's send buffer per round: a round carries as many slices as fit, at least one.
EXCHANGE_ROUND_BYTES = 2**18


def slices_per_round(region_area: int, n_slices: int, real_itemsize: int,
                     round_bytes: int = EXCHANGE_ROUND_BYTES) -> int:
    """Slices of an exchange region of ``region_area`` voxels per slice that fit one round of ``round_bytes``
    (gradient + illumination: 3 reals per voxel), at least one and at most the depth."""
    per_slice = 3 * real_itemsize * region_area
    return int(min(max(round_bytes // max(per_slice, 1), 1), max(n_slices, 1)))


def common_round_slices(domains: Sequence[RankDomain], n_slices: int, precision: str,
                        round_bytes: int = EXCHANGE_ROUND_BYTES) -> int:
    """Slices per round of every exchange region of a job: those of its largest region.

    One count for every region of every rank, because :meth:`SyncExchanger.reduce_gradients` packs a
    region's round from the rank's own contribution only while no other region has added a neighbour's
    into those slices yet, which holds when every region's rounds cover the same slices. With a count
    per region, a region of 3-slice rounds packed slice 3 after one of 4-slice rounds had added its
    neighbour's there: where the two regions overlap (the corners of a 2 × 2 split), a third rank's
    contribution arrived twice. Sync at 4 ranks then ended the thick SrTiO3 case at loss 24.0 against
    17.8 on one rank, and the async warm-up passed the doubled illumination on. Every rank computes
    this from the whole decomposition (offline and streaming both have it), so it needs no message,
    and every region's round stays within ``round_bytes`` (or one slice).
    """
    real_itemsize = np.dtype(PRECISIONS[precision][0]).itemsize
    areas = [box.size for domain in domains for _, box in domain.neighbours]
    return min((slices_per_round(area, n_slices, real_itemsize, round_bytes) for area in areas),
               default=max(n_slices, 1))


class SyncExchanger:
    """Exact, blocking halo gradient exchange over MPI point-to-point messages.

    Every region is exchanged in rounds of ``round_slices`` slices (:func:`common_round_slices`: the same
    for every region of every rank), so its pack buffers hold one round (at most
    :data:`EXCHANGE_ROUND_BYTES`, or one slice), not the whole depth: they are sized by the overlap's
    area, not by the tile's volume.
    """

    def __init__(self, comm: Any, domain: RankDomain, n_slices: int, real_dtype: Any, round_slices: int) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.domain = domain
        self.stats = ExchangeStats()
        self.n_slices = n_slices
        self.regions = [(n, box.relative_to(domain.extended), (n_slices, *box.shape))
                        for n, box in domain.neighbours]
        if not 1 <= round_slices <= max(n_slices, 1):
            raise ValueError(f"round_slices must be within 1..{max(n_slices, 1)}, got {round_slices}")
        self.round_slices = round_slices
        self.send = [np.empty(3 * round_slices * int(np.prod(shape[1:])), real_dtype) for _, _, shape in self.regions]
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
        self._reduce(gradient, illumination)
        return gradient, illumination

    def reduce_correction(self, correction: Any) -> Any:
        """Sum ``correction`` (S, He, We) complex over every copy of each voxel, in place; returns it.

        The missing-cone correction (:mod:`ptylive.daemon.engine.cone`): each rank writes it over its own tile
        and zero elsewhere, so the sum gives every copy its owner's value (adding zeros is exact).
        """
        self._reduce(correction, None)
        return correction

    def _reduce(self, gradient: Any, illumination: Any | None) -> None:
        """Add every neighbour's ``gradient`` (and ``illumination``, unless None) over each region, in place."""
        from mpi4py import MPI

        xp = get_array_module(gradient)
        per_voxel = 2 if illumination is None else 3
        n_rounds = -(-self.n_slices // self.round_slices) if self.regions else 0
        for round_ in range(n_rounds):
            requests, landed = [], []
            for i, (n, region, shape) in enumerate(self.regions):
                first = round_ * self.round_slices
                depth = slice(first, min(first + self.round_slices, self.n_slices))
                size = per_voxel * (depth.stop - depth.start) * int(np.prod(shape[1:]))
                send, recv = self.send[i][:size], self.recv[i][:size]
                pack(gradient[(depth, *region)], None if illumination is None else illumination[(depth, *region)],
                     send)
                requests.append(self.comm.Irecv(recv, source=n, tag=TAG_SYNC))
                requests.append(self.comm.Isend(send, dest=n, tag=TAG_SYNC))
                landed.append((i, region, depth, (depth.stop - depth.start, *shape[1:]), recv))
                self.stats.bytes_sent += send.nbytes
                self.stats.messages_sent += 1
            start = time.perf_counter()
            MPI.Request.Waitall(requests)
            self.stats.wait_s += time.perf_counter() - start
            for i, region, depth, shape, recv in landed:  # ascending neighbour order, as before
                if illumination is None:  # the correction alone: (real, imag) pairs
                    add_pairs(gradient[(depth, *region)], recv.reshape(shape + (2,)))
                    continue
                pairs, received_illumination = unpack(recv, shape)
                add_pairs(gradient[(depth, *region)], pairs)
                illumination[(depth, *region)] += xp.asarray(received_illumination)
                self.received_illumination(i, depth, received_illumination)

    def received_illumination(self, region: int, depth: slice, illumination: np.ndarray) -> None:
        """Called with each neighbour's illumination of a round (slices ``depth``); the async exchanger keeps it."""
