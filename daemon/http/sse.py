"""Server-sent events for the operator's viewer: one publisher, many readers, and nobody waits on a reader.

The collector thread calls :meth:`EventHub.publish`. Each ``GET /events`` client holds a
:class:`Subscription` with its own bounded queue, and :func:`stream_events` writes that queue to the client::

    collector ──publish()──► EventHub ──┬──► Subscription (≤ max_queued) ──► /events client 1
              (JSON encoded once,       └──► Subscription (full: its oldest ──► client 2, told "resync"
               never blocks)                  event dropped)

A full queue drops its own oldest event and nobody else's. The reader then gets one ``resync`` event,
``{"dropped": n}``, before the events that are left; it should re-read ``/status`` and ``/tiles``.
A reader that is idle gets a comment line every ``keepalive_s`` (proxies and browsers keep the stream
open), and a client that went away is noticed within ``poll_s`` and its queue freed.

Wire format (``text/event-stream``): ``id: N``, ``event: NAME``, ``data: JSON`` then a blank line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

MAX_QUEUED = 256
MAX_SUBSCRIBERS = 32
KEEPALIVE_S = 15.0
POLL_S = 1.0
RETRY_MS = 2000  # how long a browser waits before reconnecting a dropped stream
KEEPALIVE = b": keep-alive\n\n"
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def json_ready(value: Any) -> Any:
    """Return ``value`` with numpy scalars/arrays as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class ServerEvent:
    """One event as sent: ``id`` (None for ``resync``), ``name`` and its JSON ``data`` (one line)."""

    id: int | None
    name: str
    data: str

    def encode(self) -> bytes:
        head = "" if self.id is None else f"id: {self.id}\n"
        return f"{head}event: {self.name}\ndata: {self.data}\n\n".encode()


class TooManySubscribers(RuntimeError):
    """Raised by :meth:`EventHub.subscribe` when ``max_subscribers`` streams are open already."""


class Subscription:
    """One reader's queue; made by :meth:`EventHub.subscribe`, freed by :meth:`close` (or ``with``)."""

    def __init__(self, hub: EventHub, max_queued: int) -> None:
        self._hub = hub
        self._queue: deque[ServerEvent] = deque(maxlen=max_queued)
        self.dropped = 0  # events lost since the last resync
        self.closed = False

    def _push(self, event: ServerEvent) -> None:  # hub lock held
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
        self._queue.append(event)

    def next(self, timeout_s: float) -> ServerEvent | None:
        """The next event, a ``resync`` first if events were dropped; None after ``timeout_s`` or once closed."""
        with self._hub._condition:
            if not self._queue and not self.closed and self.dropped == 0:
                self._hub._condition.wait(timeout_s)
            if self.closed:
                return None
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                return ServerEvent(None, "resync", json.dumps({"dropped": dropped}))
            return self._queue.popleft() if self._queue else None

    @property
    def queued(self) -> int:
        with self._hub._condition:
            return len(self._queue)

    def close(self) -> None:
        """Stop receiving and free the queue. Safe to call twice."""
        self._hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class EventHub:
    """Fans events out to every open :class:`Subscription`; thread-safe, :meth:`publish` never blocks on readers.

    Parameters
    ----------
    max_queued : int
        Events each subscription holds before it drops its oldest, ``>= 1``.
    max_subscribers : int
        Open subscriptions allowed at once, ``>= 1``.
    """

    def __init__(self, max_queued: int = MAX_QUEUED, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        if max_queued < 1 or max_subscribers < 1:
            raise ValueError(f"max_queued ({max_queued}) and max_subscribers ({max_subscribers}) must be >= 1")
        self.max_queued, self.max_subscribers = max_queued, max_subscribers
        self._condition = threading.Condition()
        self._subscriptions: list[Subscription] = []
        self._next_id = 1
        self._closed = False

    @property
    def subscribers(self) -> int:
        with self._condition:
            return len(self._subscriptions)

    def publish(self, name: str, payload: dict[str, Any]) -> ServerEvent:
        """Queue ``payload`` (JSON-ready after :func:`json_ready`) as event ``name`` for every subscriber.

        Raises
        ------
        ValueError
            If ``name`` is not lower-case ``[a-z][a-z0-9_]*`` or ``payload`` cannot be encoded as JSON.
        """
        if not EVENT_NAME.fullmatch(name):
            raise ValueError(f"event name {name!r} must match {EVENT_NAME.pattern}")
        data = json.dumps(json_ready(payload), allow_nan=False, separators=(",", ":"))
        with self._condition:
            event = ServerEvent(self._next_id, name, data)
            self._next_id += 1
            for subscription in self._subscriptions:
                subscription._push(event)
            self._condition.notify_all()
        return event

    def subscribe(self) -> Subscription:
        """A new reader's queue (receives events published from now on).

        Raises
        ------
        TooManySubscribers
            If ``max_subscribers`` are open.
        RuntimeError
            If the hub was closed.
        """
        with self._condition:
            if self._closed:
                raise RuntimeError("EventHub was closed")
            if len(self._subscriptions) >= self.max_subscribers:
                raise TooManySubscribers(f"{len(self._subscriptions)} event streams open; "
                                         f"at most {self.max_subscribers} allowed")
            subscription = Subscription(self, self.max_queued)
            self._subscriptions.append(subscription)
            return subscription

    def _remove(self, subscription: Subscription) -> None:
        with self._condition:
            subscription.closed = True
            subscription._queue.clear()
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
            self._condition.notify_all()

    def close(self) -> None:
        """End every subscription (their readers' :meth:`Subscription.next` returns None) and refuse new ones."""
        with self._condition:
            self._closed = True
            for subscription in list(self._subscriptions):
                self._remove(subscription)


def stream_events(subscription: Subscription, write: Callable[[bytes], Any], stopped: Callable[[], bool],
                  keepalive_s: float = KEEPALIVE_S, poll_s: float = POLL_S) -> None:
    """Write ``subscription``'s events to a client until it is closed or ``stopped()`` is true.

    ``write`` raises (e.g. ``BrokenPipeError``) when the client is gone; that ends the stream too and
    is left to the caller. ``stopped`` is asked after each event and at least every ``poll_s``.
    """
    write(f"retry: {RETRY_MS}\n\n".encode())
    last_write = time.monotonic()
    while not subscription.closed:
        event = subscription.next(min(poll_s, keepalive_s))
        now = time.monotonic()
        if stopped():
            return
        if event is not None:
            write(event.encode())
            last_write = now
        elif now - last_write >= keepalive_s:
            write(KEEPALIVE)
            last_write = now
