"""What the ingest speaks on its detector socket: a decoder turns received ZeroMQ messages into ptylive
messages plus the ptylive stream v1 parts to forward to workers.

A decoder may keep state across messages (DECTRIS stream v1 spreads one image over several parts, which a
recording may replay as separate single-part messages), and one received message may give none, one or
several results: a message, with the parts to forward, or a :class:`ProtocolError` to count. Forwarded
parts reuse the received ``zmq.Frame`` objects wherever the payload is passed on unchanged, so pixels are
never copied on rank 0 (stream v2 is the exception: its CBOR decoder copies the compressed bytes out).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

from ptylive.streaming.protocol import Message, ProtocolError, decode

logger = logging.getLogger(__name__)

FORMATS = ("ptylive", "dectris_v1", "dectris_v2")
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


def make_decoder(format: Literal["ptylive", "dectris_v1", "dectris_v2"] | str, scan: Any = None,
                 channel: str = "") -> StreamDecoder:
    """The decoder for ``[ingest] format``; DECTRIS formats need ``scan`` (the ``[scan]`` config section, see
    :func:`ptylive.streaming.scan_geometry.template_from_settings`) and stream v2 may name its ``channel``."""
    if format == "ptylive":
        return PtyliveDecoder()
    if format not in FORMATS:
        raise ValueError(f"unknown stream format {format!r}; expected one of {FORMATS}")
    if scan is None:
        raise ValueError(f"format {format!r} needs the scan geometry and optics of the [scan] section")
    from ptylive.streaming.scan_geometry import template_from_settings

    template = template_from_settings(scan)
    if format == "dectris_v1":
        from ptylive.streaming.dectris_v1 import DectrisV1Decoder

        return DectrisV1Decoder(template)
    from ptylive.streaming.dectris_v2 import DectrisV2Decoder

    return DectrisV2Decoder(template, channel)
