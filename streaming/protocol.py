"""ptylive stream v1: the wire protocol between a detector and the ingest.

Every message is a ZeroMQ multipart message. Part 0 is a msgpack map with an
``"htype"``; a frame carries its pixels as raw bytes in part 1. The schema is
documented in ``docs/protocol.md``. Nothing is ever unpickled: msgpack maps
of plain values only, and every field is checked before use.

A message that cannot be accepted raises :class:`ProtocolError` whose
``reason`` is one of :data:`REJECT_REASONS`, so the ingest can count
rejections by reason (a low-cardinality metrics label).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from ptylive.streaming.compression import ENCODINGS, CompressionError, check_framing, compress, decompress
from ptylive.streaming.detector_frames import DetectorCrop
from ptylive.streaming.header_fields import (
    DECTRIS_REJECT_REASONS,
    DTYPES,
    MAX_DETECTOR_PX,
    MAX_SCAN_POSITIONS,
    REJECT_REASONS,
    V1_REJECT_REASONS,
    ProtocolError,
    header_field,
    number,
    pair,
    required_number,
    series_id_of,
    shape_and_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["DECTRIS_REJECT_REASONS", "DTYPES", "ENCODINGS", "MAX_DETECTOR_PX", "MAX_PART_BYTES", "MAX_SCAN_POSITIONS",
           "REJECT_REASONS",
           "V1_REJECT_REASONS", "Frame", "Message", "ProtocolError", "SeriesEnd", "SeriesStart", "decode",
           "encode_frame", "encode_payload", "encode_series_end", "encode_series_start"]

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_START_BYTES = 32 * 1024 * 1024  # a series_start may carry explicit positions (~18 B each)
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Largest message part the ingest takes off the wire (``ZMQ_MAXMSGSIZE``): a sender of a larger part is
#: disconnected by ZeroMQ before the part is buffered (a 300 MB frame once sat whole in the ingest's memory).
MAX_PART_BYTES = max(MAX_START_BYTES, MAX_FRAME_BYTES)
_LITTLE_ENDIAN = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}  # frames are little-endian
def position_pairs(positions_A: npt.ArrayLike) -> tuple[tuple[float, float], ...]:
    """``(n, 2)`` positions (any array-like) as the hashable pairs :class:`SeriesStart` holds."""
    array = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
    return tuple((float(r), float(c)) for r, c in array)


@dataclass(frozen=True)
class SeriesStart:
    """Start of a series: scan geometry, detector and optics.

    Attributes
    ----------
    series_id : str
    scan_shape : (int, int)
        Rows × columns of the raster; frame ``k`` sits at row ``k // cols``.
    scan_step_A : (float, float)
        Raster steps along rows and columns.
    detector_shape : (int, int)
    dtype : str
    energy_eV, convergence_semiangle_mrad, defocus_A, detector_pixel_mrad : float
    scan_rotation_deg : float
    positions_A : tuple of (row, col) or None
        Explicit positions in Å (one per frame, ``rows × cols`` of them); they
        override the raster. Any (n, 2) array-like is accepted and stored as a
        tuple, so the message stays hashable and comparable.
    overrides : dict
        Reconstruction settings for this series (validated by the daemon);
        excluded from the hash.
    detector_crop : DetectorCrop or None
        The square box of the detector the series reconstructs, and its binning
        (:mod:`ptylive.streaming.detector_frames`); None: the whole detector, which must be square.
    pixel_mask : (H, W) or (C, C) bool or None
        True = bad pixel, over the whole detector or over the crop box; left out of the loss.
    flatfield : (H, W) or (C, C) float32 or None
        Multiplies the raw counts, over the whole detector or the crop box. Neither map is compared or hashed;
        the daemon checks their shapes (a series with a map of another shape is refused).
    """

    series_id: str
    scan_shape: tuple[int, int]
    scan_step_A: tuple[float, float]
    detector_shape: tuple[int, int]
    dtype: str
    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float
    detector_pixel_mrad: float
    scan_rotation_deg: float = 0.0
    positions_A: tuple[tuple[float, float], ...] | None = None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    detector_crop: DetectorCrop | None = None
    pixel_mask: npt.NDArray[np.bool_] | None = field(default=None, compare=False, repr=False)
    flatfield: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.positions_A is not None and not isinstance(self.positions_A, tuple):
            object.__setattr__(self, "positions_A", position_pairs(self.positions_A))

    @property
    def n_positions(self) -> int:
        return len(self.positions_A) if self.positions_A is not None else self.scan_shape[0] * self.scan_shape[1]


@dataclass(frozen=True)
class Frame:
    """One diffraction pattern.

    A raw frame's ``payload`` is its pixels, a read-only ``shape`` view of the received buffer (``shape`` and
    ``dtype`` are taken from it). A compressed frame (``encoding`` bslz4, lz4 or lz4_block, see
    :mod:`ptylive.streaming.compression`) keeps the received bytes and needs ``shape`` and ``dtype``;
    :attr:`pixels` decodes it on first use, which only workers do: the ingest looks at :meth:`header_view`.
    """

    series_id: str
    frame_index: int
    payload: Any
    position_A: tuple[float, float] | None = None
    encoding: str = "raw"
    shape: tuple[int, int] = (0, 0)
    dtype: str = ""

    def __post_init__(self) -> None:
        if self.encoding == "raw":
            if not self.dtype:  # the decoder passes both (numpy's dtype.name costs ~10 µs per frame)
                object.__setattr__(self, "shape", tuple(self.payload.shape))
                object.__setattr__(self, "dtype", self.payload.dtype.name)
        elif self.encoding not in ENCODINGS or len(self.shape) != 2 or self.dtype not in DTYPES:
            raise ValueError(f"compressed frame needs an encoding in {ENCODINGS}, a 2-D shape and a dtype in "
                             f"{DTYPES}; got {self.encoding!r}, {self.shape}, {self.dtype!r}")

    @property
    def pixels(self) -> np.ndarray:
        """(rows, cols) read-only pixels; decoding a compressed frame raises CompressionError if it is corrupt.

        A compressed frame is decoded once, on first use, and kept (``_pixels``); a plain property rather than
        ``functools.cached_property``, which on Python 3.11 takes a lock on every first access, per frame."""
        if self.encoding == "raw":
            return self.payload  # type: ignore[no-any-return]
        pixels = self.__dict__.get("_pixels")
        if pixels is None:
            pixels = decompress(self.payload, self.encoding, self.shape, self.dtype)
            pixels.flags.writeable = False
            self.__dict__["_pixels"] = pixels  # a frozen dataclass: its __dict__ is the cache
        return pixels  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        """Size of the decoded pixels."""
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize

    def header_view(self) -> Frame:
        """The frame as the ingest checks it, without decoding: a compressed frame becomes a raw one whose pixels
        are a zero-strided (rows, cols) array of zeros (right shape, dtype and ``nbytes``, one element of memory).
        The ingest therefore cannot look for NaN in compressed float frames; workers do (``non_finite``)."""
        if self.encoding == "raw":
            return self
        placeholder = np.broadcast_to(np.zeros((), dtype=np.dtype(self.dtype)), self.shape)
        return Frame(self.series_id, self.frame_index, placeholder, self.position_A)


@dataclass(frozen=True)
class SeriesEnd:
    series_id: str
    n_frames: int


Message = SeriesStart | Frame | SeriesEnd


def _decode_start(header: dict[str, Any]) -> SeriesStart:
    if header.get("version") != VERSION:
        raise ProtocolError("version", f"expected version {VERSION}, got {header.get('version')!r}")
    scan_shape = pair(header, "scan_shape", int, positive=True)
    if scan_shape[0] * scan_shape[1] > MAX_SCAN_POSITIONS:
        raise ProtocolError("too_large", f"scan of {scan_shape} exceeds {MAX_SCAN_POSITIONS} positions")
    detector = header_field(header, "detector", dict)
    optics = header_field(header, "optics", dict)
    shape, dtype = shape_and_dtype(detector, "detector")
    positions = header.get("positions_A")
    if positions is not None:
        if not isinstance(positions, list) or not all(
                isinstance(p, list) and len(p) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in positions):
            raise ProtocolError("bad_field", "'positions_A' must be a list of [row, col] numbers")
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(positions).all():
            raise ProtocolError("bad_field", "'positions_A' holds NaN or infinity")
        if len(positions) != scan_shape[0] * scan_shape[1]:
            raise ProtocolError("bad_field", f"{len(positions)} 'positions_A' for a scan of {scan_shape} "
                                             f"({scan_shape[0] * scan_shape[1]} frames)")
    overrides = header_field(header, "reconstruction", dict, optional=True) or {}
    crop, pixel_mask, flatfield = _decode_detector_extras(detector)
    return SeriesStart(
        series_id=series_id_of(header), scan_shape=scan_shape,
        scan_step_A=pair(header, "scan_step_A", float, positive=True, scalar=True), detector_shape=shape, dtype=dtype,
        energy_eV=required_number(optics, "energy_eV", positive=True),
        convergence_semiangle_mrad=required_number(optics, "convergence_semiangle_mrad", positive=True),
        defocus_A=required_number(optics, "defocus_A"),
        detector_pixel_mrad=required_number(optics, "detector_pixel_mrad", positive=True),
        scan_rotation_deg=number(header, "scan_rotation_deg", optional=True) or 0.0,
        positions_A=None if positions is None else tuple((float(r), float(c)) for r, c in positions),
        overrides=dict(overrides), detector_crop=crop, pixel_mask=pixel_mask, flatfield=flatfield,
    )


CROP_KEYS = ("row0_px", "col0_px", "size_px", "bin")


def _decode_detector_extras(detector: dict[str, Any]) -> tuple[DetectorCrop | None, np.ndarray | None,
                                                                np.ndarray | None]:
    """The optional ``crop``, ``pixel_mask`` and ``flatfield`` of a series_start's ``detector`` map."""
    crop = header_field(detector, "crop", dict, optional=True)
    if crop is not None:
        values = [crop.get(key) for key in CROP_KEYS]
        if (set(crop) != set(CROP_KEYS) or not all(type(v) is int for v in values) or min(values[:2]) < 0
                or min(values[2:]) < 1):
            raise ProtocolError("bad_field", f"detector 'crop' must map {CROP_KEYS} to integers (>= 0, >= 0, >= 1, "
                                             f">= 1), got {crop!r}")
        crop = DetectorCrop(*values)
    return crop, _decode_map(detector, "pixel_mask", "bits"), _decode_map(detector, "flatfield", "float32")


def _decode_map(detector: dict[str, Any], name: str, kind: str) -> np.ndarray | None:
    """A detector map: ``{"shape": [rows, cols], kind: bytes}``, bits packed row-major (``numpy.packbits``) or
    little-endian float32."""
    entry = header_field(detector, name, dict, optional=True)
    if entry is None:
        return None
    shape = pair(entry, "shape", int, positive=True)
    if max(shape) > MAX_DETECTOR_PX:
        raise ProtocolError("too_large", f"detector {name!r} {shape} exceeds {MAX_DETECTOR_PX} px")
    data = entry.get(kind)
    n = shape[0] * shape[1]
    expected = (n + 7) // 8 if kind == "bits" else 4 * n
    if not isinstance(data, bytes) or len(data) != expected:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ProtocolError("bad_field", f"detector {name!r} of {shape} needs {kind!r}: {expected} bytes, got {got}")
    if kind == "bits":
        return np.unpackbits(np.frombuffer(data, np.uint8), count=n).reshape(shape).astype(bool)
    return np.frombuffer(data, "<f4").reshape(shape).astype(np.float32)


def _encode_detector_extras(start: SeriesStart, detector: dict[str, Any]) -> None:
    if start.detector_crop is not None:
        c = start.detector_crop
        detector["crop"] = dict(zip(CROP_KEYS, (c.row0_px, c.col0_px, c.size_px, c.bin_factor), strict=True))
    if start.pixel_mask is not None:
        mask = np.asarray(start.pixel_mask, dtype=bool)
        detector["pixel_mask"] = {"shape": list(mask.shape), "bits": np.packbits(mask, axis=None).tobytes()}
    if start.flatfield is not None:
        flat = np.ascontiguousarray(start.flatfield, dtype="<f4")
        detector["flatfield"] = {"shape": list(flat.shape), "float32": flat.tobytes()}


def _common_frame_fields(header: dict[str, Any]) -> tuple[str, int, tuple[int, int], str] | None:
    """Series id, index, shape and dtype when all are plainly valid (the usual case, a few µs); else None and
    the caller runs the full checks, which name the reason."""
    get = header.get
    series_id, index, shape, dtype = get("series_id"), get("frame_index"), get("shape"), get("dtype")
    if (type(series_id) is str and type(index) is int and index >= 0 and dtype in _LITTLE_ENDIAN
            and type(shape) is list and len(shape) == 2):
        rows, cols = shape
        if type(rows) is int and type(cols) is int and 0 < rows <= MAX_DETECTOR_PX and 0 < cols <= MAX_DETECTOR_PX:
            return series_id, index, (rows, cols), dtype
    return None


def _decode_frame(header: dict[str, Any], buffer: memoryview, verify_framing: bool = True) -> Frame:
    """The frame of ``header`` whose payload is ``buffer`` (a byte view of part 1)."""
    common = _common_frame_fields(header)
    if common is None:
        index = header_field(header, "frame_index", int)
        if index < 0:
            raise ProtocolError("bad_field", f"'frame_index' must be >= 0, got {index}")
        shape, dtype = shape_and_dtype(header, "frame")
        series_id = series_id_of(header)
    else:
        series_id, index, shape, dtype = common
    encoding = header.get("encoding", "raw")
    if encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding", f"encoding {encoding!r}; supported: {ENCODINGS}")
    little_endian = _LITTLE_ENDIAN[dtype]
    expected = shape[0] * shape[1] * little_endian.itemsize
    position = pair(header, "position_A", float, positive=False) if "position_A" in header else None
    if encoding != "raw":
        try:  # structure only (header, block chain, length): decompression is the workers' job
            if verify_framing:
                check_framing(buffer, encoding, expected, little_endian.itemsize)
        except CompressionError as exc:
            raise ProtocolError("corrupt_payload", f"frame {index}: {exc}") from None
        return Frame(series_id, index, buffer, position, encoding, shape, dtype)
    if buffer.nbytes != expected:
        raise ProtocolError("payload_size", f"frame {index}: {buffer.nbytes} bytes for {shape} {dtype} "
                                            f"(expected {expected})")
    pixels = np.frombuffer(buffer, dtype=little_endian).reshape(shape)
    pixels.flags.writeable = False
    return Frame(series_id, index, pixels, position, shape=shape, dtype=dtype)


def decode(parts: list[Any], verify_framing: bool = True) -> Message:
    """Decode one multipart message (bytes, or zmq.Frame / buffer objects).

    ``verify_framing=False`` skips the block-chain walk of compressed frames (:func:`check_framing`): workers
    take frames the ingest has checked, and their decoder bounds every read anyway (``Frame.pixels`` raises
    CompressionError on a broken chain). The walk costs 7 µs per 96² bslz4 frame and 50–60 µs per 512² one.

    Raises
    ------
    ProtocolError
        With a ``reason`` from :data:`REJECT_REASONS`.
    """
    if not 1 <= len(parts) <= 2:
        raise ProtocolError("parts", f"expected 1 or 2 parts, got {len(parts)}")
    try:
        raw_header = memoryview(parts[0]).cast("B")
    except (TypeError, ValueError, NotImplementedError):
        raise ProtocolError("not_msgpack", "header part is not a contiguous buffer") from None
    if raw_header.nbytes > MAX_START_BYTES:
        raise ProtocolError("header_too_large", f"{raw_header.nbytes} bytes > {MAX_START_BYTES}")
    try:
        header = msgpack.unpackb(raw_header)  # msgpack >= 1.0 defaults: raw=False, strict_map_key, use_list
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for bad input
        raise ProtocolError("not_msgpack", f"header does not decode: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("not_a_map", f"header is a {type(header).__name__}, not a map")
    htype = header.get("htype")
    if htype != "series_start" and raw_header.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{raw_header.nbytes} bytes > {MAX_HEADER_BYTES}")
    expected_parts = 2 if htype == "frame" else 1
    if htype in ("series_start", "frame", "series_end") and len(parts) != expected_parts:
        raise ProtocolError("parts", f"{htype!r} needs {expected_parts} part(s), got {len(parts)}")
    if htype == "series_start":
        return _decode_start(header)
    if htype == "frame":
        try:
            payload = memoryview(parts[1]).cast("B")
        except (TypeError, ValueError, NotImplementedError):
            raise ProtocolError("payload_size", "frame payload is not a contiguous buffer") from None
        if payload.nbytes > MAX_FRAME_BYTES:
            raise ProtocolError("too_large", f"frame payload over {MAX_FRAME_BYTES} bytes")
        return _decode_frame(header, payload, verify_framing)
    if htype == "series_end":
        n_frames = header_field(header, "n_frames", int)
        if n_frames < 0:
            raise ProtocolError("bad_field", f"'n_frames' must be >= 0, got {n_frames}")
        return SeriesEnd(series_id_of(header), n_frames)
    raise ProtocolError("unknown_htype", f"htype {htype!r}")


def encode_series_start(start: SeriesStart) -> list[bytes]:
    """Encode a :class:`SeriesStart` as a one-part message."""
    header: dict[str, Any] = {
        "htype": "series_start", "version": VERSION, "series_id": start.series_id,
        "scan_shape": list(start.scan_shape), "scan_step_A": list(start.scan_step_A),
        "scan_rotation_deg": start.scan_rotation_deg,
        "detector": {"shape": list(start.detector_shape), "dtype": start.dtype},
        "optics": {"energy_eV": start.energy_eV, "convergence_semiangle_mrad": start.convergence_semiangle_mrad,
                   "defocus_A": start.defocus_A, "detector_pixel_mrad": start.detector_pixel_mrad},
        "reconstruction": dict(start.overrides),
    }
    if start.positions_A is not None:
        header["positions_A"] = [list(p) for p in start.positions_A]
    _encode_detector_extras(start, header["detector"])
    return [msgpack.packb(header, use_bin_type=True)]


def encode_frame(series_id: str, frame_index: int, pixels: np.ndarray,
                 position_A: tuple[float, float] | None = None, encoding: str = "raw") -> list[Any]:
    """Encode a frame as ``[msgpack header, pixel buffer]`` (compressed first unless ``encoding`` is raw).

    A raw buffer is not copied when ``pixels`` is already C-contiguous and
    little-endian (the wire byte order); otherwise it is converted first.
    """
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    payload = pixels.data if encoding == "raw" else compress(pixels, encoding)
    return encode_payload(series_id, frame_index, payload, (pixels.shape[0], pixels.shape[1]), pixels.dtype.name,
                          encoding, position_A)


def encode_payload(series_id: str, frame_index: int, payload: Any, shape: tuple[int, int], dtype: str,
                   encoding: str, position_A: tuple[float, float] | None = None) -> list[Any]:
    """``[msgpack header, payload]`` for a payload already in ``encoding`` (forwarded as it is: no copy, so a
    detector adapter can pass on the very ``zmq.Frame`` it received)."""
    header: dict[str, Any] = {"htype": "frame", "series_id": series_id, "frame_index": int(frame_index),
                              "shape": [int(shape[0]), int(shape[1])], "dtype": dtype, "encoding": encoding}
    if position_A is not None:
        header["position_A"] = [float(position_A[0]), float(position_A[1])]
    return [msgpack.packb(header, use_bin_type=True), payload]


def encode_series_end(series_id: str, n_frames: int) -> list[bytes]:
    return [msgpack.packb({"htype": "series_end", "series_id": series_id, "n_frames": int(n_frames)},
                          use_bin_type=True)]
