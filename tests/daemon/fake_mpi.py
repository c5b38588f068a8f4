"""An MPI world of several ranks inside one process, for unit tests of the exchange and the consensus.

It implements what ptylive calls and nothing more: ``Get_rank``, ``Get_size``, ``Isend``, ``Irecv``,
``Iallreduce`` and ``Allreduce`` on a communicator; ``Test`` and ``Wait`` on a request;
``MPI.Request.Waitall``/``Testall`` and ``MPI.SUM``/``MPI.MAX``. The code under test imports
``from mpi4py import MPI`` inside its functions, so :func:`install` replaces that attribute of the
(never initialised) ``mpi4py`` package for the duration of a test.

Semantics, stricter than a real MPI where it costs nothing::

    Isend(buf) ──┐  matched in posting order per (source, dest, tag), MPI's non-overtaking rule
    Irecv(buf) ──┴► on the later of the two posts: the bytes are copied, both requests complete

* a send posted before its receive is *not* complete (rendezvous): ``Test`` stays False, and the
  send buffer must not change until the receive arrives (checked: a change raises at delivery);
* dtype and size must match the receive buffer (a longer message is truncation, an error in MPI);
* collectives match by call order on each rank and complete when every rank has posted;
* every wait gives up after ``timeout_s`` (a deadlock fails the test instead of hanging it).

Ranks that block (``Wait``, ``Waitall``, ``Allreduce``, polling loops) run in threads: :func:`run_ranks`.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest

T = TypeVar("T")
Key = tuple[int, int, int]  # (source, dest, tag)


class FakeRequest:
    """A non-blocking operation; complete once its data has moved (method names as in mpi4py)."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.done = False

    def Test(self) -> bool:
        with self.world.condition:
            return self.done

    def Wait(self) -> None:
        with self.world.condition:
            if not self.world.condition.wait_for(lambda: self.done, self.world.timeout_s):
                raise TimeoutError(f"request not complete within {self.world.timeout_s} s (a deadlock?)")

    @staticmethod
    def Waitall(requests: list[FakeRequest]) -> None:
        for request in requests:
            request.Wait()

    @staticmethod
    def Testall(requests: list[FakeRequest]) -> bool:
        return all(request.Test() for request in requests)


class FakeMPI:
    """Stands in for ``mpi4py.MPI``."""

    SUM = "sum"
    MAX = "max"
    Request = FakeRequest


REDUCTIONS: dict[str, Callable[..., np.ndarray]] = {FakeMPI.SUM: np.sum, FakeMPI.MAX: np.max}


class FakeWorld:
    """Mailboxes and collective slots of ``size`` ranks; :meth:`comm` gives each rank its communicator."""

    def __init__(self, size: int, timeout_s: float = 10.0) -> None:
        self.size, self.timeout_s = size, timeout_s
        self.condition = threading.Condition()
        self.sends: defaultdict[Key, deque[tuple[np.ndarray, bytes, FakeRequest]]] = defaultdict(deque)
        self.recvs: defaultdict[Key, deque[tuple[np.ndarray, FakeRequest]]] = defaultdict(deque)
        self.collective_calls = [0] * size
        self.collectives: defaultdict[int, dict[int, tuple[np.ndarray, np.ndarray, str, FakeRequest]]] = \
            defaultdict(dict)
        self.messages: list[tuple[int, int, int, int]] = []  # (source, dest, tag, bytes) in delivery order

    def comm(self, rank: int) -> FakeComm:
        return FakeComm(self, rank)

    def unmatched(self) -> dict[str, int]:
        """Sends and receives still waiting for their other half."""
        with self.condition:
            return {"sends": sum(len(q) for q in self.sends.values()),
                    "recvs": sum(len(q) for q in self.recvs.values())}

    def _deliver(self, key: Key, send: np.ndarray, sent_bytes: bytes, recv: np.ndarray) -> None:
        if send.tobytes() != sent_bytes:
            raise RuntimeError(f"message {key}: the send buffer changed while the send was in flight")
        if send.dtype != recv.dtype or send.nbytes > recv.nbytes:
            raise ValueError(f"message {key}: {send.dtype} x {send.size} into a {recv.dtype} x {recv.size} buffer")
        recv.reshape(-1).view(np.uint8)[:send.nbytes] = np.frombuffer(sent_bytes, np.uint8)
        self.messages.append((*key, send.nbytes))

    def isend(self, buffer: np.ndarray, key: Key) -> FakeRequest:
        request = FakeRequest(self)
        with self.condition:
            if self.recvs[key]:
                recv, recv_request = self.recvs[key].popleft()
                self._deliver(key, buffer, buffer.tobytes(), recv)
                request.done = recv_request.done = True
                self.condition.notify_all()
            else:
                self.sends[key].append((buffer, buffer.tobytes(), request))
        return request

    def irecv(self, buffer: np.ndarray, key: Key) -> FakeRequest:
        request = FakeRequest(self)
        with self.condition:
            if self.sends[key]:
                send, sent_bytes, send_request = self.sends[key].popleft()
                self._deliver(key, send, sent_bytes, buffer)
                request.done = send_request.done = True
                self.condition.notify_all()
            else:
                self.recvs[key].append((buffer, request))
        return request

    def iallreduce(self, rank: int, send: np.ndarray, recv: np.ndarray, op: str) -> FakeRequest:
        request = FakeRequest(self)
        with self.condition:
            call = self.collective_calls[rank]
            self.collective_calls[rank] += 1
            slot = self.collectives[call]
            slot[rank] = (np.array(send, copy=True), recv, op, request)
            if len(slot) == self.size:
                ops = {entry[2] for entry in slot.values()}
                shapes = {entry[0].shape for entry in slot.values()}
                if len(ops) != 1 or len(shapes) != 1:
                    raise ValueError(f"collective {call}: ranks disagree on op {ops} or shape {shapes}")
                total = REDUCTIONS[op](np.stack([slot[r][0] for r in range(self.size)]), axis=0)
                for _, out, _, waiting in slot.values():
                    out[...] = total
                    waiting.done = True
                del self.collectives[call]
                self.condition.notify_all()
        return request


class FakeComm:
    """One rank's view of a :class:`FakeWorld` (the mpi4py communicator methods ptylive uses)."""

    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.rank = world, rank

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.world.size

    def Isend(self, buffer: np.ndarray, dest: int, tag: int = 0) -> FakeRequest:
        return self.world.isend(buffer, (self.rank, dest, tag))

    def Irecv(self, buffer: np.ndarray, source: int, tag: int = 0) -> FakeRequest:
        return self.world.irecv(buffer, (source, self.rank, tag))

    def Iallreduce(self, send: np.ndarray, recv: np.ndarray, op: str) -> FakeRequest:
        return self.world.iallreduce(self.rank, send, recv, op)

    def Allreduce(self, send: np.ndarray, recv: np.ndarray, op: str) -> None:
        self.Iallreduce(send, recv, op).Wait()


def run_ranks(world: FakeWorld, body: Callable[[FakeComm], T]) -> list[T]:
    """Run ``body(comm)`` for every rank of ``world`` in its own thread; results by rank, errors re-raised."""
    results: list[Any] = [None] * world.size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = body(world.comm(rank))
        except BaseException as exc:  # re-raised on the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,), name=f"fake-rank-{rank}") for rank in range(world.size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(world.timeout_s * 2)
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError("a fake rank did not finish")
    if errors:
        raise errors[0]
    return results


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from mpi4py import MPI`` gives :class:`FakeMPI` until the test ends (MPI itself is never initialised)."""
    import mpi4py

    monkeypatch.setattr(mpi4py, "MPI", FakeMPI, raising=False)
