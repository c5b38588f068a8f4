"""DECTRIS SIMPLON stream v2 (one CBOR map per message: ``start``, ``image``, ``end``) → ptylive messages.

An image's ``data`` maps channel names (thresholds) to multi-dimensional arrays, tag 40 (RFC 8746 §3.1,
row-major ``[[rows, cols], typed array]``). A typed array (RFC 8746 §2, tags 64–87) holds a byte string or
the DECTRIS compression tag 56500 ``[algorithm, element size, bytes]`` (``"bslz4"``: bitshuffle-LZ4,
``"lz4"``: LZ4, both in the HDF5 filter framing, see :mod:`ptylive.streaming.compression`).

One channel is reconstructed: ``channel`` if given, else the first of the start message's ``channels``,
else the first in the image. Its bytes are forwarded compressed (decoded on the workers); the CBOR decoder
copies them out of the message once, which is the only copy of pixel data on rank 0. Big-endian raw arrays
are byte-swapped here; big-endian compressed ones are refused (``unsupported_encoding``).

The start's ``pixel_mask`` and ``flatfield`` (maps of channel name → tag-40 array, like an image's ``data``) of
that channel go into the series' start (:mod:`ptylive.streaming.detector_maps`): the mask (non-zero = bad)
always, the flatfield unless ``flatfield_enabled`` says the detector applied it already.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cbor2
import numpy as np

from ptylive.streaming.compression import CompressionError, compress, decompress
from ptylive.streaming.dectris_v1 import DetectorMaps, ImageSeries
from ptylive.streaming.protocol import MAX_FRAME_BYTES, MAX_START_BYTES, ProtocolError
from ptylive.streaming.scan_geometry import SeriesTemplate
from ptylive.streaming.scan_plan import DetectorCount, ScanPlan, simplon_v2_count
from ptylive.streaming.stream_decoder import Decoded

logger = logging.getLogger(__name__)

MULTI_DIM_ARRAY, SELF_DESCRIBED, COMPRESSION = 40, 55799, 56500
TYPED_ARRAYS = {64: "|u1", 68: "|u1", 65: ">u2", 69: "<u2", 66: ">u4", 70: "<u4", 74: ">i4", 78: "<i4",
                81: ">f4", 85: "<f4", 82: ">f8", 86: "<f8"}  # the RFC 8746 tags of ptylive's dtypes
TAG_OF = {"uint8": 64, "uint16": 69, "uint32": 70, "int32": 78, "float32": 85, "float64": 86}
ALGORITHMS = ("bslz4", "lz4")
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES + MAX_START_BYTES


def _tag(value: Any, number: int, what: str) -> Any:
    if not isinstance(value, cbor2.CBORTag) or value.tag != number:
        raise ProtocolError("bad_field", f"{what} must be CBOR tag {number}, got {type(value).__name__} "
                                         f"{getattr(value, 'tag', '')}")
    return value.value


def _channel_array(value: Any, name: str) -> tuple[tuple[int, int], np.dtype[Any], Any, str]:
    """``(shape, dtype, payload, encoding)`` of one channel's tag-40 array."""
    content = _tag(value, MULTI_DIM_ARRAY, f"channel {name!r}")
    if not isinstance(content, Sequence) or len(content) != 2:
        raise ProtocolError("bad_field", f"channel {name!r}: tag 40 needs [dimensions, typed array]")
    dims, typed = content
    if (not isinstance(dims, Sequence) or len(dims) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise ProtocolError("bad_field", f"channel {name!r}: dimensions must be two positive integers, got {dims!r}")
    if not isinstance(typed, cbor2.CBORTag) or typed.tag not in TYPED_ARRAYS:
        raise ProtocolError("unsupported_encoding", f"channel {name!r}: typed array tag "
                                                    f"{getattr(typed, 'tag', None)!r} is not one of ptylive's dtypes")
    dtype = np.dtype(TYPED_ARRAYS[typed.tag])
    shape = (int(dims[0]), int(dims[1]))
    payload = typed.value
    if isinstance(payload, bytes):
        if dtype.byteorder == ">":  # rare: swap to the wire's little-endian (a copy)
            expected = shape[0] * shape[1] * dtype.itemsize
            if len(payload) != expected:
                raise ProtocolError("payload_size", f"channel {name!r}: {len(payload)} bytes, expected {expected}")
            payload = np.frombuffer(payload, dtype).astype(dtype.newbyteorder("<")).tobytes()
        return shape, dtype, payload, "raw"
    algorithm, element_size, data = _compressed(_tag(payload, COMPRESSION, f"channel {name!r} data"), name)
    if dtype.byteorder == ">":
        raise ProtocolError("unsupported_encoding", f"channel {name!r}: compressed big-endian {dtype}")
    if algorithm == "bslz4" and element_size != dtype.itemsize:
        raise ProtocolError("bad_field", f"channel {name!r}: bslz4 element size {element_size} for {dtype}")
    return shape, dtype, data, algorithm


def _compressed(content: Any, name: str) -> tuple[str, int, bytes]:
    if (not isinstance(content, Sequence) or len(content) != 3 or not isinstance(content[2], bytes)
            or not isinstance(content[1], int)):
        raise ProtocolError("bad_field", f"channel {name!r}: tag 56500 needs [algorithm, element size, bytes]")
    algorithm, element_size, data = content
    if algorithm not in ALGORITHMS:
        raise ProtocolError("unsupported_encoding", f"channel {name!r}: compression {algorithm!r}; "
                                                    f"supported {ALGORITHMS}")
    return str(algorithm), int(element_size), data


class DectrisV2Decoder:
    """Decoder of DECTRIS SIMPLON stream v2; ``channel``: which one to reconstruct ("" = the first). ``plan``
    decides each series' scan when its ``start`` arrives (default: ``template.scan`` for every series, checked
    against the start's ``number_of_images``)."""

    def __init__(self, template: SeriesTemplate, channel: str = "", plan: ScanPlan | None = None) -> None:
        self.template, self.channel = template, channel
        self.plan = plan if plan is not None else ScanPlan.fixed(template.scan)
        self.series: ImageSeries | None = None
        self.channels: list[str] = []
        self.counts: Counter[str] = Counter()
        #: The id a new series runs under, from the detector's number (the ingest's ``SeriesBook.fresh_id``:
        #: a number a finished series had gets a suffix); images and the end carry the detector's number.
        self.fresh_id: Callable[[str], str] = str
        self._detector_id: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"format": "dectris_v2", "series_id": self.series.series_id if self.series else None,
                "channel": self.channel, **self.counts}

    def feed(self, parts: list[Any]) -> list[Decoded | ProtocolError]:
        try:
            return self._message(parts)
        except ProtocolError as exc:
            return [exc]

    def _message(self, parts: list[Any]) -> list[Decoded | ProtocolError]:
        if len(parts) != 1:
            raise ProtocolError("parts", f"stream v2 messages have 1 part, got {len(parts)}")
        view = memoryview(parts[0]).cast("B")
        if view.nbytes > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"message of {view.nbytes} bytes > {MAX_MESSAGE_BYTES}")
        try:
            message = cbor2.loads(view)
        except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for bad input
            raise ProtocolError("not_cbor", f"message does not decode: {type(exc).__name__}") from None
        if isinstance(message, cbor2.CBORTag) and message.tag == SELF_DESCRIBED:
            message = message.value
        if not isinstance(message, Mapping):
            raise ProtocolError("not_a_map", f"message is a {type(message).__name__}, not a map")
        kind = message.get("type")
        if kind not in ("start", "image", "end"):
            raise ProtocolError("unknown_htype", f"type {kind!r}")
        self.counts[kind] += 1
        series_id = message.get("series_id")
        if isinstance(series_id, bool) or not isinstance(series_id, (int, str)):
            raise ProtocolError("missing_field" if series_id is None else "bad_field",
                                f"{kind!r} message needs an integer series_id, got {series_id!r}")
        if kind == "start":
            channels = message.get("channels", [])
            self.channels = [str(c) for c in channels] if isinstance(channels, Sequence) else []
            maps = self._start_maps(message)
            self._detector_id = str(series_id)
            self.series = ImageSeries.begin(self.template, self.plan, self.fresh_id(str(series_id)), self.counts,
                                            simplon_v2_count(message), maps)
            return []
        if kind == "end":
            if self.series is None or self._detector_id != str(series_id):
                self.counts["unknown_series_end"] += 1
                return []
            series, self.series, self._detector_id = self.series, None, None
            return series.end()
        return self._image(str(series_id), message)

    def _start_maps(self, message: Mapping[str, Any]) -> DetectorMaps:
        """The reconstructed channel's pixel mask (non-zero = bad) and flatfield from a start message; the
        flatfield only when ``flatfield_enabled`` is not true (the images are not corrected yet)."""
        maps: list[np.ndarray | None] = []
        for key in ("pixel_mask", "flatfield"):
            by_channel = message.get(key)
            if not isinstance(by_channel, Mapping) or not by_channel:
                maps.append(None)
                continue
            name = self.channel or next((c for c in self.channels if c in by_channel), next(iter(by_channel)))
            if name not in by_channel:
                raise ProtocolError("missing_field", f"start {key!r} lacks channel {name!r} (has {sorted(by_channel)})")
            shape, dtype, payload, encoding = _channel_array(by_channel[name], f"{key} {name}")
            try:
                values = decompress(payload, encoding, shape, dtype.name) if encoding != "raw" else None
            except CompressionError as exc:
                raise ProtocolError("corrupt_payload", f"start {key!r} of channel {name!r}: {exc}") from None
            if values is None:
                if len(payload) != shape[0] * shape[1] * dtype.itemsize:
                    raise ProtocolError("payload_size", f"start {key!r} of channel {name!r}: {len(payload)} bytes for "
                                                        f"{shape} {dtype}")
                values = np.frombuffer(payload, dtype.newbyteorder("<")).reshape(shape)
            maps.append(values)
        mask, flatfield = maps
        if flatfield is not None and message.get("flatfield_enabled") is True:
            flatfield = None  # the detector corrected the images already
        return (None if mask is None else mask != 0), (None if flatfield is None else flatfield.astype(np.float32))

    def _image(self, series_id: str, message: Mapping[str, Any]) -> list[Decoded | ProtocolError]:
        image = message.get("image_id")
        if isinstance(image, bool) or not isinstance(image, int) or image < 0:
            raise ProtocolError("missing_field" if image is None else "bad_field",
                                f"image_id must be an integer >= 0, got {image!r}")
        data = message.get("data")
        if not isinstance(data, Mapping) or not data:
            raise ProtocolError("missing_field", f"image {image} has no channel data")
        name = self.channel or next((c for c in self.channels if c in data), next(iter(data)))
        if name not in data:
            raise ProtocolError("missing_field", f"image {image} lacks channel {name!r} (has {sorted(data)})")
        shape, dtype, payload, encoding = _channel_array(data[name], name)
        if self.series is None or self._detector_id != series_id:
            # no start seen: the series starts here, without the detector's count
            self._detector_id = series_id
            self.series = ImageSeries.begin(self.template, self.plan, self.fresh_id(series_id), self.counts,
                                            DetectorCount())
        return self.series.image(image, payload, shape, dtype.name, encoding)


# ------------------------------------------------------------------------------------------ writing (tests, tools)


def _typed_array(pixels: np.ndarray, compression: str | None) -> cbor2.CBORTag:
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    data: Any = pixels.tobytes()
    if compression is not None:
        data = cbor2.CBORTag(COMPRESSION, [compression, pixels.itemsize if compression == "bslz4" else 0,
                                           compress(pixels, compression)])
    return cbor2.CBORTag(MULTI_DIM_ARRAY, [list(pixels.shape), cbor2.CBORTag(TAG_OF[pixels.dtype.name], data)])


def start_message(series_id: int, channels: Sequence[str], image_size: tuple[int, int], n_images: int,
                  pixel_mask: Mapping[str, np.ndarray] | None = None, flatfield: Mapping[str, np.ndarray] | None = None,
                  flatfield_enabled: bool = False) -> bytes:
    """A ``start`` message (the fields ptylive reads, and the image size); ``pixel_mask`` (uint32, non-zero =
    bad) and ``flatfield`` (float32) map channel names to (rows, cols) arrays, sent uncompressed."""
    fields: dict[str, Any] = {
        "type": "start", "series_id": series_id, "series_unique_id": f"series-{series_id}", "channels": list(channels),
        "image_size_x": image_size[1], "image_size_y": image_size[0], "number_of_images": n_images,
        "flatfield_enabled": flatfield_enabled, "pixel_mask_enabled": pixel_mask is not None}
    if pixel_mask is not None:
        fields["pixel_mask"] = {c: _typed_array(m.astype(np.uint32), None) for c, m in pixel_mask.items()}
    if flatfield is not None:
        fields["flatfield"] = {c: _typed_array(f.astype(np.float32), None) for c, f in flatfield.items()}
    return cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBED, fields))


def image_message(series_id: int, image_id: int, channels: Mapping[str, np.ndarray],
                  compression: str | None = "bslz4") -> bytes:
    """An ``image`` message with one (rows, cols) array per channel, compressed with ``bslz4``, ``lz4`` or None."""
    data = {name: _typed_array(pixels, compression) for name, pixels in channels.items()}
    return cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBED, {
        "type": "image", "series_id": series_id, "series_unique_id": f"series-{series_id}", "image_id": image_id,
        "real_time": [1, 1000], "start_time": [image_id, 1000], "stop_time": [image_id + 1, 1000], "data": data}))


def end_message(series_id: int) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBED, {"type": "end", "series_id": series_id,
                                                      "series_unique_id": f"series-{series_id}"}))
