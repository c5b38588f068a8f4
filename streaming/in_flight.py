"""Bytes forwarded to each worker and not yet taken by it: the byte bound on the ingest's forwarding queues.

ZeroMQ bounds a queue in messages (``send_hwm``), and a message can be a 200-byte start or a 64 MiB frame: with
both workers stopped, 2304 frames of 256 px once took rank 0 from 154 to 464 MiB. So the ingest also counts
bytes. It records every message it sends (:meth:`InFlight.sent`); each worker reports how many messages it has
taken (its heartbeat's ``messages_taken``, at most a second old) and :meth:`InFlight.settle` forgets those::

    ingest ──sent(w, bytes)──► ledger of worker w: sizes of the messages it has not taken yet
                                        ▲
    heartbeat of w ──settle(w, messages_taken)──┘ (pops from the oldest end)

    buffered_bytes = Σ over workers of the ledgers  ≤  max_bytes, checked by room_for() before each send

A report is never newer than the truth, so :attr:`InFlight.buffered_bytes` never underestimates what lies in
rank 0's send queues, the kernel's socket buffers and the worker's receive queue together. When there is no
room the ingest waits (and stops reading the detector, whose high-water mark then throttles the sender): a
frame is never dropped for the bound. One message larger than the whole bound is sent once nothing else is
buffered, so the bound is exceeded by at most that one message, and the stream never deadlocks.
No sockets here: the ingest thread owns an :class:`InFlight`; other threads read :meth:`InFlight.snapshot`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any


def message_bytes(parts: Iterable[Any]) -> int:
    """Bytes of a multipart message: the sum of its parts (``bytes``, ``zmq.Frame``, arrays: any buffer)."""
    return sum(memoryview(part).nbytes for part in parts)


class InFlight:
    """Per-worker ledgers of messages sent and not yet taken, bounded by ``max_bytes`` over all workers.

    Parameters
    ----------
    n_workers : int
    max_bytes : int
        The bound (> 0).

    Attributes
    ----------
    buffered_bytes, peak_bytes : int
        Bytes sent and not (known to be) taken, now and at most so far.
    waits : int
        Sends that had to wait for room (counted by the caller, once per send).
    """

    def __init__(self, n_workers: int, max_bytes: int) -> None:
        if n_workers < 1 or max_bytes < 1:
            raise ValueError(f"need n_workers >= 1 and max_bytes >= 1, got {n_workers}, {max_bytes}")
        self.max_bytes = max_bytes
        self._ledgers: list[deque[int]] = [deque() for _ in range(n_workers)]
        self._sent = [0] * n_workers
        self._bytes = [0] * n_workers
        self.buffered_bytes = self.peak_bytes = self.waits = 0

    def sent(self, worker: int, nbytes: int) -> None:
        """Record one message of ``nbytes`` sent to ``worker``."""
        self._ledgers[worker].append(nbytes)
        self._sent[worker] += 1
        self._bytes[worker] += nbytes
        self.buffered_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.buffered_bytes)

    def settle(self, worker: int, taken: int | None) -> None:
        """Forget what ``worker`` has taken: ``taken`` messages in all (None: no report yet)."""
        if taken is None:
            return
        ledger = self._ledgers[worker]
        waiting = max(self._sent[worker] - taken, 0)
        while len(ledger) > waiting:
            nbytes = ledger.popleft()
            self._bytes[worker] -= nbytes
            self.buffered_bytes -= nbytes

    def room_for(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` fits under the bound (always, when nothing is buffered)."""
        return self.buffered_bytes == 0 or self.buffered_bytes + nbytes <= self.max_bytes

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable counters: the bound, bytes buffered in all and per worker, the peak, the waits."""
        return {"max_bytes": self.max_bytes, "buffered_bytes": self.buffered_bytes, "peak_bytes": self.peak_bytes,
                "waits": self.waits, "per_worker_bytes": list(self._bytes)}
