"""The worker side of the ingest: a PULL socket connected to one of the ingest's worker endpoints.

Messages are ptylive stream v1: forwarded unchanged by the ingest, or converted by its decoder from a
detector's own format (``streaming/decoders.py``). Compressed frames stay compressed until ``Frame.pixels`` is
first read, which is the worker's job (``FrameStore.add``), not the ingest's. Besides those, the ingest sends
one internal message of its own, :class:`SeriesControl` (``htype = "series_control"``): finalize or abort a series,
or shut down. It travels on the same socket as the frames, so a worker sees it after every frame the
ingest forwarded before it. Detectors cannot send it: the ingest's decoder rejects the htype. Small frames
bound for one worker may come as one ``frame_batch`` message (:func:`encode_batch_header`, then each frame's
two parts as the detector sent them): ZeroMQ's cost is per message, whatever its size, so the ingest sends what
it drained in one go as one message; the inbox returns its frames one by one, in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import msgpack
import zmq

from ptylive.streaming.protocol import Message, ProtocolError, decode

logger = logging.getLogger(__name__)

CONTROL_HTYPE = "series_control"
CONTROL_ACTIONS = ("finalize", "abort", "shutdown", "incomplete")
BATCH_HTYPE = "frame_batch"  # [{"htype": "frame_batch", "frames": k}, header 1, pixels 1, ..., header k, pixels k]


@dataclass(frozen=True)
class SeriesControl:
    """``finalize`` (treat the series as ended now), ``abort`` (stop now), ``shutdown`` (stop everything) or
    ``incomplete`` (the sender went quiet: treat the series as ended now, and say so in its status).

    ``series_id`` is None for ``shutdown``.
    """

    action: Literal["finalize", "abort", "shutdown", "incomplete"]
    series_id: str | None = None

    def __post_init__(self) -> None:
        if self.action not in CONTROL_ACTIONS:
            raise ValueError(f"control action must be one of {CONTROL_ACTIONS}, got {self.action!r}")


def encode_control(control: SeriesControl) -> list[bytes]:
    """One-part message for the worker sockets."""
    return [msgpack.packb({"htype": CONTROL_HTYPE, "action": control.action, "series_id": control.series_id})]


def encode_batch_header(n_frames: int) -> bytes:
    """Part 0 of a batch of ``n_frames`` frames for one worker; each frame's own two parts follow, unchanged."""
    return msgpack.packb({"htype": BATCH_HTYPE, "frames": n_frames})


def _batch_size(parts: list[zmq.Frame]) -> int | None:
    """The number of frames in ``parts`` when it is a batch (a frame alone has 2 parts, a batch 2k + 1)."""
    if len(parts) < 5 or len(parts) % 2 == 0 or len(parts[0].buffer) > 64:
        return None
    try:
        header = msgpack.unpackb(parts[0].buffer, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(header, dict) or header.get("htype") != BATCH_HTYPE or header.get("frames") != len(parts) // 2:
        return None
    return len(parts) // 2


def _decode_control(parts: list[zmq.Frame]) -> SeriesControl | None:
    """The control message in ``parts``, or None when it is something else."""
    if len(parts) != 1 or len(parts[0].buffer) > 4096:
        return None
    try:
        header = msgpack.unpackb(parts[0].buffer, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(header, dict) or header.get("htype") != CONTROL_HTYPE:
        return None
    series_id = header.get("series_id")
    return SeriesControl(header.get("action"), None if series_id is None else str(series_id))  # type: ignore[arg-type]


class WorkerInbox:
    """A PULL connected to one of :attr:`~ptylive.streaming.ingest.Ingest.worker_endpoints`.

    Messages from the ingest are valid; one that does not decode is counted in ``protocol_errors`` and skipped.
    The ingest walked the block chain of every compressed frame, so it is not walked again here (a frame whose
    blocks do not decode is rejected when its pixels are read: ``corrupt_payload``, by the worker).
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None, rcvhwm: int = 1000,
                 socket_buffer_bytes: int = 0) -> None:
        self._own_context = context is None
        self._context: zmq.Context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.PULL)
        self._socket.rcvhwm, self._socket.linger = rcvhwm, 0
        if socket_buffer_bytes:
            self._socket.rcvbuf = socket_buffer_bytes
        self._socket.connect(endpoint)
        self._closed, self.protocol_errors = False, 0

    def poll(self, timeout_ms: int = 0, max_messages: int | None = None) -> list[Message | SeriesControl]:
        """Wait up to ``timeout_ms`` for a message, then return all available ones (at most ``max_messages``,
        or a few more when the last one taken was a batch: its frames are returned whole)."""
        messages: list[Message | SeriesControl] = []
        wait_ms = timeout_ms
        while (max_messages is None or len(messages) < max_messages) and self._socket.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            parts = self._socket.recv_multipart(copy=False)
            n_batched = _batch_size(parts)
            if n_batched is not None:
                for k in range(n_batched):
                    self._decode(parts[1 + 2 * k:3 + 2 * k], messages)
            else:
                self._decode(parts, messages)
        return messages

    def _decode(self, parts: list[zmq.Frame], messages: list[Message | SeriesControl]) -> None:
        try:
            control = _decode_control(parts)
            messages.append(control if control is not None else decode(parts, verify_framing=False))
        except (ProtocolError, ValueError) as exc:
            self.protocol_errors += 1
            logger.error("worker inbox got an undecodable message: %s", exc)

    def close(self) -> None:
        """Close the socket (pending messages are discarded)."""
        if not self._closed:
            self._closed = True
            self._socket.close()
            if self._own_context:
                self._context.term()
