"""The viewer's event hub: fan-out, bounded queues that drop only their own oldest events, and the SSE writer."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from ptylive.daemon.http.sse import (
    KEEPALIVE,
    RETRY_MS,
    EventHub,
    ServerEvent,
    Subscription,
    TooManySubscribers,
    stream_events,
)


def drain(subscription: Subscription, timeout_s: float = 0.05) -> list[ServerEvent]:
    events = []
    while (event := subscription.next(timeout_s)) is not None:
        events.append(event)
    return events


def test_every_subscriber_gets_every_event_in_order_with_increasing_ids() -> None:
    hub = EventHub()
    first, second = hub.subscribe(), hub.subscribe()
    published = [hub.publish("preview", {"version": k}) for k in range(5)]
    for subscription in (first, second):
        got = drain(subscription)
        assert [json.loads(e.data)["version"] for e in got] == list(range(5))
        assert [e.id for e in got] == [e.id for e in published] == sorted({e.id for e in published})


def test_wire_format_is_one_sse_event_with_strict_json() -> None:
    event = EventHub().publish("series_end", {"loss": float("nan"), "scale": np.float32(0.5), "rows": np.arange(2),
                                              "path": "a\nb"})
    assert event.encode() == (b'id: 1\nevent: series_end\ndata: {"loss":null,"scale":0.5,"rows":[0,1],'
                              b'"path":"a\\nb"}\n\n')


@pytest.mark.parametrize("name", ["Preview", "pre view", "preview\ndata: x", "", "1st"])
def test_event_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="event name"):
        EventHub().publish(name, {})


def test_slow_reader_drops_its_own_oldest_and_is_told_to_resync() -> None:
    hub = EventHub(max_queued=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    fast_got: list[ServerEvent] = []
    for k in range(10):
        hub.publish("preview", {"version": k})
        fast_got += drain(fast, 0)
    assert [json.loads(e.data)["version"] for e in fast_got] == list(range(10))  # untouched by the slow one
    assert slow.queued == 3
    resync, *rest = drain(slow)
    assert (resync.name, resync.id, json.loads(resync.data)) == ("resync", None, {"dropped": 7})
    assert [json.loads(e.data)["version"] for e in rest] == [7, 8, 9]
    hub.publish("preview", {"version": 10})
    assert [e.name for e in drain(slow)] == ["preview"]  # one resync per overflow, not per event


def test_publish_never_waits_for_a_reader_that_never_reads() -> None:
    hub = EventHub(max_queued=64)
    stuck = hub.subscribe()
    began = time.perf_counter()
    for k in range(20_000):
        hub.publish("preview", {"version": k, "tiles": [{"worker": 0, "loss": 1.0}]})
    assert time.perf_counter() - began < 5.0
    assert stuck.queued == 64


def test_concurrent_readers_each_see_the_whole_stream() -> None:
    hub = EventHub(max_queued=5000)
    readers = [hub.subscribe() for _ in range(3)]
    received: list[list[int]] = [[] for _ in readers]

    def read(index: int) -> None:
        while len(received[index]) < 1000:
            event = readers[index].next(1.0)
            if event is not None:
                received[index].append(json.loads(event.data)["k"])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for k in range(1000):
        hub.publish("preview", {"k": k})
    for thread in threads:
        thread.join(10)
    assert all(r == list(range(1000)) for r in received)


def test_closing_a_subscription_frees_it_and_the_limit_holds() -> None:
    hub = EventHub(max_subscribers=2)
    with hub.subscribe() as first:
        second = hub.subscribe()
        with pytest.raises(TooManySubscribers, match="at most 2"):
            hub.subscribe()
        hub.publish("preview", {})
        second.close()
        second.close()
        assert hub.subscribers == 1 and second.queued == 0 and second.next(0.01) is None
        hub.subscribe().close()  # room again
    assert hub.subscribers == 0 and first.closed


def test_next_waits_for_an_event_and_times_out_without_one() -> None:
    hub = EventHub()
    subscription = hub.subscribe()
    began = time.monotonic()
    assert subscription.next(0.2) is None
    assert time.monotonic() - began >= 0.15
    threading.Timer(0.1, hub.publish, args=("series_start", {"series_id": "s"})).start()
    event = subscription.next(5.0)
    assert event is not None and event.name == "series_start"


def test_closing_the_hub_ends_every_reader_and_refuses_new_ones() -> None:
    hub = EventHub()
    subscription = hub.subscribe()
    waiter = threading.Thread(target=subscription.next, args=(30.0,))
    waiter.start()
    hub.close()
    waiter.join(2.0)
    assert not waiter.is_alive() and subscription.closed and hub.subscribers == 0
    with pytest.raises(RuntimeError, match="closed"):
        hub.subscribe()


def test_stream_writes_retry_then_events_and_keepalives_until_stopped() -> None:
    hub = EventHub()
    subscription = hub.subscribe()
    written: list[bytes] = []
    stop = threading.Event()
    writer = threading.Thread(target=stream_events, args=(subscription, written.append, stop.is_set),
                              kwargs={"keepalive_s": 0.1, "poll_s": 0.02})
    writer.start()
    time.sleep(0.35)
    event = hub.publish("preview", {"version": 1})
    time.sleep(0.05)
    stop.set()
    writer.join(2.0)
    assert not writer.is_alive()
    assert written[0] == f"retry: {RETRY_MS}\n\n".encode()
    assert written.count(KEEPALIVE) >= 2
    assert event.encode() in written


def test_stream_ends_when_the_client_is_gone() -> None:
    hub = EventHub()
    subscription = hub.subscribe()

    def broken(data: bytes) -> None:
        if data.startswith(b"id:"):
            raise BrokenPipeError("client went away")

    hub.publish("preview", {})
    with pytest.raises(BrokenPipeError):
        stream_events(subscription, broken, lambda: False)
