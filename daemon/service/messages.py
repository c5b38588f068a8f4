"""Messages from worker ranks to rank 0's collector (ZMQ PUSH → PULL, never pickled).

Part 0 is a msgpack map with ``"htype"``; arrays follow as raw C-order parts whose dtype and shape
the header names:

========== ============================================================== =====================
htype      header fields                                                  array parts
========== ============================================================== =====================
hello      worker, pid                                                    —
heartbeat  worker, series_id (or None), iteration                         —
preview    series_id, worker, iteration, tile (row0, row1, col0, col1),   projected phase
           factor, frames_used, frames_expected, loss, loss_per_frame,    (h, w) float32; with
           convergence_rate, wait_fraction, staleness_max                 S > 1 slices, each
                                                                          slice's phase (S, h, w)
final      series_id, worker, status, tile, iterations, loss_history,     tile volume (S, h, w);
           frames_history, scale, stats, rejected, received, + quality    probe (N, N) or empty
error      worker, series_id, error                                       —
bye        worker (its last message: every final it sent came before)    —
========== ============================================================== =====================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

logger = logging.getLogger(__name__)

HTYPES = ("hello", "heartbeat", "preview", "final", "error", "bye")
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a final header carries loss histories


@dataclass(frozen=True)
class RankMessage:
    """A decoded message: the header map and its arrays (read-only views of the received buffers)."""

    htype: str
    header: dict[str, Any]
    arrays: tuple[np.ndarray, ...] = ()


def _describe(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def encode(htype: str, header: dict[str, Any], *arrays: np.ndarray) -> list[Any]:
    """Multipart message: msgpack header (with ``arrays`` described) then each array's bytes."""
    if htype not in HTYPES:
        raise ValueError(f"unknown rank message {htype!r}; expected one of {HTYPES}")
    contiguous = [np.ascontiguousarray(a) for a in arrays]
    head = {**header, "htype": htype, "arrays": [_describe(a) for a in contiguous]}
    return [msgpack.packb(head, use_bin_type=True), *(a.reshape(-1).view(np.uint8) for a in contiguous)]


def decode(parts: list[Any]) -> RankMessage:
    """Inverse of :func:`encode`; ValueError naming the problem for anything else."""
    if not parts:
        raise ValueError("empty message")
    head_bytes = parts[0].buffer if hasattr(parts[0], "buffer") else parts[0]
    if len(head_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    header = msgpack.unpackb(head_bytes, raw=False)
    if not isinstance(header, dict) or header.get("htype") not in HTYPES:
        raise ValueError(f"not a rank message: {str(header)[:80]}")
    described = header.pop("arrays", [])
    if len(described) != len(parts) - 1:
        raise ValueError(f"{header['htype']}: header names {len(described)} arrays, got {len(parts) - 1} parts")
    arrays = []
    for info, part in zip(described, parts[1:], strict=True):
        buffer = part.buffer if hasattr(part, "buffer") else part
        dtype, shape = np.dtype(info["dtype"]), tuple(int(n) for n in info["shape"])
        if dtype.hasobject or int(np.prod(shape)) * dtype.itemsize != len(buffer):
            raise ValueError(f"{header['htype']}: part of {len(buffer)} bytes is not {dtype} {shape}")
        arrays.append(np.frombuffer(buffer, dtype=dtype).reshape(shape))
    return RankMessage(header.pop("htype"), header, tuple(arrays))
