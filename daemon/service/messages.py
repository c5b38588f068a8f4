"""Messages from worker ranks to rank 0's collector (ZMQ PUSH → PULL, never pickled).

Part 0 is a msgpack map: the header fields plus ``"htype"`` and ``"arrays"`` (dtype and shape of each
array part); the arrays follow as raw C-order parts. Each header is a ``TypedDict`` below, and
``docs/daemon.md`` ("Worker messages") holds the table of their fields, tested against them::

    worker rank                                     rank 0 (collector thread)
    ───────────                                     ─────────────────────────
    encode("preview", PreviewHeader, phase, ...) ─► decode(parts) -> PreviewMessage
                                                        .htype == "preview", .header: PreviewHeader,
                                                        .arrays: read-only views of the parts

:data:`RankMessage` is the union of the eight decoded message classes; comparing ``message.htype`` with
a literal narrows it (and so ``message.header``) for a type checker. Nothing is validated beyond the
framing: the headers are what the workers of the same installation send.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generic, Literal, NotRequired, TypedDict, TypeVar, cast, overload

import msgpack
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a final header carries loss histories
HType = Literal["hello", "heartbeat", "preview", "virtual", "pattern", "final", "error", "bye"]


class HelloHeader(TypedDict):
    """A worker is up (sent once, after its kernels are compiled)."""

    worker: int
    pid: int


class WorkerReport(TypedDict):
    """What :meth:`ptylive.daemon.worker.stats.WorkerStats.report` adds to every heartbeat."""

    totals: dict[str, float]
    iteration_s: list[float]
    loss_per_frame: float | None
    frames_rejected: dict[str, int]
    staleness_max: int
    wait_fraction: float
    memory_host_bytes: int
    memory_gpu_bytes: int
    checkpoint_failures: int


class HeartbeatHeader(WorkerReport):
    """Sent about once a second, also between series."""

    worker: int
    series_id: str | None
    messages_taken: int
    unknown_frames: int


class TileQuality(TypedDict):
    """Progress and quality of one worker's tile (in every preview and final)."""

    frames_used: int
    frames_expected: int
    frames_received: int
    loss: float | None
    loss_per_frame: float | None
    convergence_rate: float | None
    wait_fraction: float
    staleness_max: int


class PreviewHeader(TileQuality):
    """A tile's phase preview; arrays: projected phase ``(h, w) float32``, then ``(S, h, w)`` if ``S > 1``."""

    series_id: str
    worker: int
    iteration: int
    tile: list[int]
    factor: int
    sent_s: float


class VirtualHeader(TypedDict):
    """Virtual detector values of the frames a worker stored since its last ``virtual`` message (at most twice the
    preview rate, and once before its ``final``); arrays: the frame indices ``(N,) int64``, then one ``(N,)
    float32`` per entry of ``kinds``, same order (:mod:`ptylive.daemon.worker.virtual`)."""

    series_id: str
    worker: int
    kinds: list[str]
    convergence_semiangle_mrad: float
    detector_pixel_mrad: float
    annuli_mrad: list[list[float]]
    sent_s: float


class PatternHeader(TypedDict):
    """A worker's running sum of the frames it stored of the running series (sent with its ``virtual`` messages,
    when the sum or the probe changed); arrays: the sum ``(D, D) float64``, then (worker 0, while it refines the
    series) the probe's amplitude ``(h, w) float32``, block-averaged by ``probe_factor`` (0: no probe array)."""

    series_id: str
    worker: int
    frames_summed: int
    probe_factor: int
    iteration: int
    sent_s: float


class FinalStats(TypedDict):
    """Per-worker statistics of a series (``ranks/<name>`` in the final file)."""

    compute_s: float
    exchange_wait_s: float
    consensus_wait_s: float
    bytes_sent: int
    staleness_mean: float
    staleness_max: int
    iterations_total_s: float
    frames_bytes: int
    frames_received: int


class FinalHeader(TileQuality):
    """A worker's finished tile; arrays: the tile volume ``(S, h, w)`` complex, the probe ``(N, N)``
    (``(K, N, N)`` with K probe modes) or empty, then the positions ``(R, 2)`` float64 (object pixels) of the
    ``R`` frames in ``received`` (same order): as corrected, and nominal (scan or frame header)."""

    series_id: str
    worker: int
    status: str
    tile: list[int]
    iterations: int
    loss_history: list[float]
    frames_history: list[int]
    scale: float
    slice_thickness_A: float
    rejected: dict[str, int]
    received: list[int]
    stats: FinalStats
    loss_function: NotRequired[str]  # the loss fitted (as "auto" chose it: daemon.engine.loss_choice)


class ErrorHeader(TypedDict):
    """A series this worker could not set up."""

    worker: int
    series_id: str
    error: str


class ByeHeader(TypedDict):
    """A worker's last message: every final it sent came before."""

    worker: int


RankHeader = (HelloHeader | HeartbeatHeader | PreviewHeader | VirtualHeader | PatternHeader | FinalHeader | ErrorHeader
              | ByeHeader)
HeaderT = TypeVar("HeaderT", HelloHeader, HeartbeatHeader, PreviewHeader, VirtualHeader, PatternHeader, FinalHeader,
                  ErrorHeader, ByeHeader)


@dataclass(frozen=True)
class _Received(Generic[HeaderT]):
    """A decoded message: its header and its arrays (read-only views of the received buffers)."""

    header: HeaderT
    arrays: tuple[npt.NDArray[Any], ...] = ()


@dataclass(frozen=True)
class HelloMessage(_Received[HelloHeader]):
    htype: Literal["hello"] = "hello"


@dataclass(frozen=True)
class HeartbeatMessage(_Received[HeartbeatHeader]):
    htype: Literal["heartbeat"] = "heartbeat"


@dataclass(frozen=True)
class PreviewMessage(_Received[PreviewHeader]):
    htype: Literal["preview"] = "preview"


@dataclass(frozen=True)
class VirtualMessage(_Received[VirtualHeader]):
    htype: Literal["virtual"] = "virtual"


@dataclass(frozen=True)
class PatternMessage(_Received[PatternHeader]):
    htype: Literal["pattern"] = "pattern"


@dataclass(frozen=True)
class FinalMessage(_Received[FinalHeader]):
    htype: Literal["final"] = "final"


@dataclass(frozen=True)
class ErrorMessage(_Received[ErrorHeader]):
    htype: Literal["error"] = "error"


@dataclass(frozen=True)
class ByeMessage(_Received[ByeHeader]):
    htype: Literal["bye"] = "bye"


RankMessage = (HelloMessage | HeartbeatMessage | PreviewMessage | VirtualMessage | PatternMessage | FinalMessage
               | ErrorMessage | ByeMessage)
MESSAGE_TYPES: dict[str, type[RankMessage]] = {
    "hello": HelloMessage, "heartbeat": HeartbeatMessage, "preview": PreviewMessage, "virtual": VirtualMessage,
    "pattern": PatternMessage, "final": FinalMessage, "error": ErrorMessage, "bye": ByeMessage}
HEADERS: dict[str, type] = {  # htype -> the TypedDict of its header
    "hello": HelloHeader, "heartbeat": HeartbeatHeader, "preview": PreviewHeader, "virtual": VirtualHeader,
    "pattern": PatternHeader, "final": FinalHeader, "error": ErrorHeader, "bye": ByeHeader}
HTYPES: tuple[str, ...] = tuple(HEADERS)


def _describe(array: npt.NDArray[Any]) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


@overload
def encode(htype: Literal["hello"], header: HelloHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["heartbeat"], header: HeartbeatHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["preview"], header: PreviewHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["virtual"], header: VirtualHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["pattern"], header: PatternHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["final"], header: FinalHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["error"], header: ErrorHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
@overload
def encode(htype: Literal["bye"], header: ByeHeader, *arrays: npt.NDArray[Any]) -> list[Any]: ...
def encode(htype: HType, header: RankHeader, *arrays: npt.NDArray[Any]) -> list[Any]:
    """Multipart message: the msgpack header (with ``arrays`` described), then each array's bytes.

    Parameters
    ----------
    htype : one of :data:`HTYPES`
    header : the TypedDict of ``htype`` (:data:`HEADERS`)
    *arrays : any shape and (non-object) dtype; sent C-contiguous, without a copy when already so

    Returns
    -------
    list
        ``bytes`` (the header), then one ``(nbytes,) uint8`` view per array, for ``send_multipart``.
    """
    if htype not in HEADERS:
        raise ValueError(f"unknown rank message {htype!r}; expected one of {HTYPES}")
    contiguous = [np.ascontiguousarray(a) for a in arrays]
    head = {**header, "htype": htype, "arrays": [_describe(a) for a in contiguous]}
    return [msgpack.packb(head, use_bin_type=True), *(a.reshape(-1).view(np.uint8) for a in contiguous)]


def _buffer(part: Any) -> Any:
    """The bytes of a received part (a ``zmq.Frame`` with ``copy=False``, or bytes)."""
    return part.buffer if hasattr(part, "buffer") else part


def decode(parts: list[Any]) -> RankMessage:
    """Inverse of :func:`encode`; ValueError naming the problem for anything else.

    Returns
    -------
    RankMessage
        The message class of its ``htype``; ``arrays`` are read-only views of ``parts``' buffers.
    """
    if not parts:
        raise ValueError("empty message")
    head_bytes = _buffer(parts[0])
    if len(head_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    header = msgpack.unpackb(head_bytes, raw=False)
    if not isinstance(header, dict) or header.get("htype") not in HEADERS:
        raise ValueError(f"not a rank message: {str(header)[:80]}")
    described = header.pop("arrays", [])
    if len(described) != len(parts) - 1:
        raise ValueError(f"{header['htype']}: header names {len(described)} arrays, got {len(parts) - 1} parts")
    arrays = []
    for info, part in zip(described, parts[1:], strict=True):
        buffer = _buffer(part)
        dtype, shape = np.dtype(info["dtype"]), tuple(int(n) for n in info["shape"])
        if dtype.hasobject or int(np.prod(shape)) * dtype.itemsize != len(buffer):
            raise ValueError(f"{header['htype']}: part of {len(buffer)} bytes is not {dtype} {shape}")
        arrays.append(np.frombuffer(buffer, dtype=dtype).reshape(shape))
    message_type = MESSAGE_TYPES[header.pop("htype")]
    return message_type(cast(Any, header), tuple(arrays))  # fields not checked: see the module docstring
