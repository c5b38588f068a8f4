"""The ingest's byte ledger: what was sent and not reported taken, the bound, one oversized message alone."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from ptylive.streaming.in_flight import InFlight, message_bytes


def test_message_bytes_counts_every_part_of_any_buffer_type() -> None:
    parts = [b"header", zmq.Frame(bytes(100)), np.zeros((4, 4), np.float32)]
    assert message_bytes(parts) == 6 + 100 + 64


def test_the_bound_and_one_oversized_message_alone() -> None:
    ledger = InFlight(2, max_bytes=1000)
    assert ledger.room_for(5000)  # nothing buffered: a message larger than the bound goes alone
    ledger.sent(0, 5000)
    assert not ledger.room_for(1)
    ledger.settle(0, None)  # no report yet: nothing known taken
    assert ledger.buffered_bytes == 5000
    ledger.settle(0, 1)
    assert ledger.buffered_bytes == 0 and ledger.room_for(600)
    ledger.sent(1, 600)
    assert ledger.room_for(400) and not ledger.room_for(401)
    assert ledger.snapshot() == {"max_bytes": 1000, "buffered_bytes": 600, "peak_bytes": 5000, "waits": 0,
                                 "per_worker_bytes": [0, 600]}


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5000), st.booleans()), max_size=200))
def test_buffered_bytes_are_the_messages_not_reported_taken(steps: list[tuple[int, int, bool]]) -> None:
    """Send if there is room, or report a worker's progress (a taken count somewhere between its last report
    and what it was sent): buffered_bytes is the sum of the messages not yet reported taken, and only a message
    sent into an empty ledger ever takes it past the bound."""
    ledger = InFlight(3, max_bytes=8000)
    sent: list[list[int]] = [[], [], []]
    taken = [0, 0, 0]
    for worker, nbytes, send in steps:
        if send:
            alone = ledger.buffered_bytes == 0
            if ledger.room_for(nbytes):
                ledger.sent(worker, nbytes)
                sent[worker].append(nbytes)
                assert ledger.buffered_bytes <= 8000 or alone
        else:
            taken[worker] += (len(sent[worker]) - taken[worker] + 1) // 2
            ledger.settle(worker, taken[worker])
        waiting = [sum(s[t:]) for s, t in zip(sent, taken, strict=True)]
        assert ledger.snapshot()["per_worker_bytes"] == waiting and ledger.buffered_bytes == sum(waiting)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="max_bytes >= 1"):
        InFlight(2, 0)
