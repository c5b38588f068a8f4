"""Per-rank tiles and statistics gathered on rank 0; bytes broadcast from it (uppercase MPI, never pickled)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain

TAG_GATHER = 23


def gather_to_root(comm: Any | None, domains: list[RankDomain], volume: np.ndarray,
                   stats: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Return (every rank's extended volume, stats stacked (R, k)) on rank 0; empty elsewhere."""
    if comm is None or comm.Get_size() == 1:
        return [volume], stats[None, :]
    rank = comm.Get_rank()
    all_stats = np.empty((comm.Get_size(), stats.size), np.float64) if rank == 0 else None
    comm.Gather(np.ascontiguousarray(stats), all_stats, root=0)
    if rank != 0:
        comm.Send(np.ascontiguousarray(volume), dest=0, tag=TAG_GATHER)
        return [], np.empty((0, stats.size))
    volumes = [volume]
    for other in range(1, comm.Get_size()):
        buffer = np.empty((volume.shape[0], *domains[other].extended.shape), volume.dtype)
        comm.Recv(buffer, source=other, tag=TAG_GATHER)
        volumes.append(buffer)
    return volumes, all_stats  # type: ignore[return-value]


def broadcast_bytes(comm: Any, payload: bytes | None) -> bytes:
    """Rank 0's ``payload`` on every rank (length, then buffer; uppercase MPI, no pickling)."""
    length = np.array([len(payload) if payload is not None else 0], dtype=np.int64)
    comm.Bcast(length, root=0)
    buffer = np.frombuffer(payload, dtype=np.uint8).copy() if payload is not None else np.empty(length[0], np.uint8)
    comm.Bcast(buffer, root=0)
    return buffer.tobytes()


def gather_rows(comm: Any | None, counts: list[int], rows: np.ndarray) -> list[np.ndarray]:
    """Every rank's ``rows`` (``counts[r]``, k) float64 on rank 0, in rank order; empty elsewhere."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    if comm is None or comm.Get_size() == 1:
        return [rows]
    if comm.Get_rank() != 0:
        comm.Send(rows, dest=0, tag=TAG_GATHER + 1)
        return []
    gathered = [rows]
    for other in range(1, comm.Get_size()):
        buffer = np.empty((counts[other], *rows.shape[1:]), np.float64)
        comm.Recv(buffer, source=other, tag=TAG_GATHER + 1)
        gathered.append(buffer)
    return gathered
