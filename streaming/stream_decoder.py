"""The decoder contract of the ingest, and its native implementation (ptylive stream v1).

A decoder turns received ZeroMQ messages into ptylive messages plus the ptylive stream v1 parts to
forward to workers. It may keep state across messages (DECTRIS stream v1 spreads one image over several
parts, which a recording may replay as separate single-part messages), and one received message may give
none, one or several results: a message, with the parts to forward, or a :class:`ProtocolError` to count.
Forwarded parts reuse the received ``zmq.Frame`` objects wherever the payload is passed on unchanged, so
pixels are never copied on rank 0 (stream v2 is the exception: its CBOR decoder copies the compressed
bytes out).

Imports flow one way: the DECTRIS decoders (:mod:`ptylive.streaming.dectris_v1`, ``dectris_v2``) build on
this module, and :mod:`ptylive.streaming.decoders` chooses among all of them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ptylive.streaming.protocol import Message, ProtocolError, decode

logger = logging.getLogger(__name__)

Decoded = tuple[Message, list[Any]]


class StreamDecoder(Protocol):
    """``feed(parts)`` → results in order: ``(message, parts to forward)`` or a ProtocolError."""

    def feed(self, parts: list[Any]) -> list[Decoded | ProtocolError]: ...

    def snapshot(self) -> dict[str, Any]: ...


class PtyliveDecoder:
    """ptylive stream v1: one message in, the same message out, forwarded as received."""

    def feed(self, parts: list[Any]) -> list[Decoded | ProtocolError]:
        try:
            return [(decode(parts), parts)]
        except ProtocolError as exc:
            return [exc]

    def snapshot(self) -> dict[str, Any]:
        return {"format": "ptylive"}
