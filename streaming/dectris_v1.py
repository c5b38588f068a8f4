"""DECTRIS SIMPLON stream v1 (JSON parts plus binary blobs) → ptylive messages, as a state machine over parts.

A detector sends each of these as one multipart message; a recording in the ZeroMQ dump format replays
every part as a message of its own, so the decoder follows the parts and uses message boundaries only to
place an appendix (see ``docs/dectris.md``)::

    dheader-1.0 {series, header_detail}  [config JSON]  [dflatfield-1.0, blob, dpixelmask-1.0, blob,
                                                          dcountrate_table-1.0, blob]          [appendix]
                 "none": nothing more     "basic" ──┘    "all" ──────────────────────────────┘
    dimage-1.0 {series, frame}   dimage_d-1.0 {shape [x, y], type, encoding, size}   blob   dconfig-1.0  [appendix]
    dseries_end-1.0 {series}

A start part (``dheader``, ``dimage``, ``dseries_end``) always begins a new message; one that arrives while
another is incomplete counts that one as ``missing_parts``. After an error the decoder skips to the next start
part, so one broken message is counted once. The ptylive ``series_start`` is sent with the first image, when
the frame shape and dtype are known. The optics come from the daemon's config; the scan is decided when the
series begins, from the header's ``nimages``/``ntrigger`` and what was asked for it
(:class:`~ptylive.streaming.scan_plan.ScanPlan`), and maps image numbers to frame indices
(:class:`~ptylive.streaming.scan_geometry.ScanGeometry`); blobs are forwarded as received, never decoded here,
except the series' first image when ``[detector]`` finds the crop's centre in it. With ``header_detail`` "all"
the header's pixel mask (non-zero = bad) and flatfield (used unless the config says
``flatfield_correction_applied``) go into the series' start (:mod:`ptylive.streaming.detector_maps`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptylive.streaming.compression import CompressionError, compress
from ptylive.streaming.protocol import (
    DTYPES,
    MAX_HEADER_BYTES,
    MAX_START_BYTES,
    Frame,
    ProtocolError,
    SeriesEnd,
    decode,
    encode_payload,
    encode_series_end,
    encode_series_start,
)
from ptylive.streaming.scan_geometry import SKIP, ScanGeometry, SeriesTemplate
from ptylive.streaming.scan_plan import DetectorCount, ScanDecision, ScanPlan, simplon_v1_count
from ptylive.streaming.stream_decoder import Decoded

logger = logging.getLogger(__name__)

STARTS = ("dheader-1.0", "dimage-1.0", "dseries_end-1.0")
HEADER_EXTRAS = ("dflatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0")
V1_ENCODINGS = {"<": "raw", "lz4<": "lz4_block", "bs8-lz4<": "bslz4", "bs16-lz4<": "bslz4", "bs32-lz4<": "bslz4"}
CONFIG = "config"  # a JSON map without htype (the detector configuration)
BLOB = "blob"


REFUSED_SCAN = ScanGeometry(1, 1)  # a refused series' start still goes out (the registry records the refusal)
DetectorMaps = tuple[np.ndarray | None, np.ndarray | None]  # a detector's own (pixel mask, flatfield)
MAP_TYPES = {"dflatfield-1.0": ("float32",), "dpixelmask-1.0": ("uint32", "uint16", "uint8", "int32")}


class ImageSeries:
    """One detector series as ptylive messages: the start goes out with the first image; images become frames,
    placed by the scan ``decision`` made when the series began."""

    def __init__(self, template: SeriesTemplate, series_id: str, counts: Counter[str],
                 decision: ScanDecision | None = None, maps: DetectorMaps = (None, None)) -> None:
        self.template, self.series_id, self.counts, self.maps = template, series_id, counts, maps
        self.started, self.distinct = False, set[int]()
        if decision is None:
            decision = ScanPlan.fixed(template.scan).resolve(series_id, DetectorCount())
        self.decision = decision
        self.scan = decision.geometry or REFUSED_SCAN

    @classmethod
    def begin(cls, template: SeriesTemplate, plan: ScanPlan, series_id: str, counts: Counter[str],
              count: DetectorCount, maps: DetectorMaps = (None, None)) -> ImageSeries:
        """A series that begins now, its scan decided by ``plan`` from the detector's ``count``; ``maps``: the
        detector's own pixel mask and flatfield (either None)."""
        return cls(template, series_id, counts, plan.resolve(series_id, count), maps)

    def image(self, image_number: int, payload: Any, shape: tuple[int, int], dtype: str,
              encoding: str) -> list[Decoded | ProtocolError]:
        index = self.scan.position_index(image_number)
        if index == SKIP:
            self.counts["flyback_skipped"] += 1
            return []
        parts = encode_payload(self.series_id, index, payload, shape, dtype, encoding)
        try:
            frame = decode(parts)  # the checks workers will make: sizes, compressed framing
        except ProtocolError as exc:
            return [exc]
        out: list[Decoded | ProtocolError] = []
        if not self.started:
            detector = self.template.detector
            first = None
            if detector.needs_first_image:  # the one image rank 0 decodes: the crop is centred on its disk
                try:
                    first = frame.pixels if isinstance(frame, Frame) else None
                except CompressionError as exc:  # the next image starts the series
                    return [ProtocolError("corrupt_payload", f"image {image_number}: {exc}")]
            start = detector.series_start(self.template.start(self.series_id, shape, dtype, self.scan), first,
                                          *self.maps)
            out.append((start, encode_series_start(start)))
            self.started = True
        if index < self.scan.n_positions:
            self.distinct.add(index)
        out.append((frame, parts))
        return out

    def end(self) -> list[Decoded | ProtocolError]:
        if not self.started:
            logger.warning("series %r ended without images; nothing to reconstruct", self.series_id)
            return []
        end = SeriesEnd(self.series_id, len(self.distinct))
        return [(end, encode_series_end(self.series_id, len(self.distinct)))]


def _json(part: Any, limit: int = MAX_HEADER_BYTES) -> Any:
    """The JSON value of a part; ProtocolError ``not_json`` (or ``header_too_large``)."""
    view = memoryview(part).cast("B")
    if view.nbytes > limit:
        raise ProtocolError("header_too_large", f"JSON part of {view.nbytes} bytes > {limit}")
    try:
        return json.loads(view.tobytes())
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("not_json", f"part of {view.nbytes} bytes is not JSON") from None


def _start_header(part: Any) -> dict[str, Any] | None:
    """The JSON map of a part that opens a message (htype in ``STARTS``), else None; cheap for blobs."""
    view = memoryview(part).cast("B")
    if view.nbytes > MAX_HEADER_BYTES or view.nbytes < 2 or view[0] != ord("{"):
        return None
    try:
        value = json.loads(view.tobytes())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) and value.get("htype") in STARTS else None


def _int(header: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = header.get(name)
    if name not in header:
        raise ProtocolError("missing_field", f"{header.get('htype')!r} lacks {name!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtocolError("bad_field", f"{name!r} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class _Pending:
    """A DECTRIS message being assembled: what it still expects, what it holds, whether it came split."""

    expected: list[str]
    parts: list[Any] = field(default_factory=list)


class DectrisV1Decoder:
    """Stateful decoder of DECTRIS SIMPLON stream v1; see the module docstring. ``plan`` decides each series'
    scan (default: ``template.scan`` for every series, checked against the header's count)."""

    def __init__(self, template: SeriesTemplate, plan: ScanPlan | None = None) -> None:
        self.template = template
        self.plan = plan if plan is not None else ScanPlan.fixed(template.scan)
        self.series: ImageSeries | None = None
        self.counts: Counter[str] = Counter()
        #: The id a new series runs under, from the detector's number (the ingest's ``SeriesBook.fresh_id``:
        #: a number a finished series had gets a suffix); images and the end carry the detector's number.
        self.fresh_id: Callable[[str], str] = str
        self._detector_id: str | None = None
        self._pending: _Pending | None = None
        self._skipping = False  # after an error: until the next start part
        self._appendix_allowed = False

    def snapshot(self) -> dict[str, Any]:
        return {"format": "dectris_v1", "series_id": self.series.series_id if self.series else None, **self.counts}

    def feed(self, parts: list[Any]) -> list[Decoded | ProtocolError]:
        out: list[Decoded | ProtocolError] = []
        for position, part in enumerate(parts):
            try:
                out += self._part(part, first=position == 0, single=len(parts) == 1)
            except ProtocolError as exc:
                self._pending, self._skipping, self._appendix_allowed = None, True, False
                out.append(exc)
        return out

    def _part(self, part: Any, first: bool, single: bool) -> list[Decoded | ProtocolError]:
        header = _start_header(part)
        if header is not None:
            out: list[Decoded | ProtocolError] = []
            if self._pending is not None:
                out.append(ProtocolError("missing_parts", f"a {header['htype']!r} arrived before the message was "
                                                          f"complete (still expected {self._pending.expected})"))
            self._pending, self._skipping, self._appendix_allowed = None, False, False
            self._pending = _Pending(self._expected(header["htype"], header), [header])
            return out + self._maybe_complete()
        if self._skipping:
            return []
        if self._pending is None:
            appendix = self._appendix_allowed and (not first or single)
            self._appendix_allowed = False
            try:
                value = _json(part)
            except ProtocolError:
                if appendix:  # user data after a complete message (any bytes)
                    self.counts["appendices"] += 1
                    return []
                raise
            if appendix and not (isinstance(value, dict) and "htype" in value):
                self.counts["appendices"] += 1
                return []
            raise ProtocolError("unknown_htype", f"htype {value.get('htype') if isinstance(value, dict) else None!r}")
        kind = self._pending.expected[0]
        if kind == BLOB:
            self._pending.parts.append(part)
        else:
            value = _json(part, MAX_START_BYTES if kind == CONFIG else MAX_HEADER_BYTES)
            if not isinstance(value, dict) or (kind != CONFIG and value.get("htype") != kind):
                got = value.get("htype") if isinstance(value, dict) else type(value).__name__
                raise ProtocolError("missing_parts", f"expected {kind!r}, got {got!r}")
            self._pending.parts.append(value)
        self._pending.expected.pop(0)
        return self._maybe_complete()

    @staticmethod
    def _expected(htype: str, header: dict[str, Any]) -> list[str]:
        if htype == "dimage-1.0":
            return ["dimage_d-1.0", BLOB, "dconfig-1.0"]
        if htype == "dseries_end-1.0":
            return []
        detail = header.get("header_detail", "basic")
        if detail not in ("none", "basic", "all"):
            raise ProtocolError("bad_field", f"header_detail must be none, basic or all, got {detail!r}")
        extras = [kind for extra in HEADER_EXTRAS for kind in (extra, BLOB)] if detail == "all" else []
        return ([] if detail == "none" else [CONFIG]) + extras

    def _maybe_complete(self) -> list[Decoded | ProtocolError]:
        pending = self._pending
        if pending is None or pending.expected:
            return []
        self._pending, self._appendix_allowed = None, True
        header = pending.parts[0]
        self.counts[header["htype"]] += 1
        if "series" not in header:
            raise ProtocolError("missing_field", f"{header['htype']!r} lacks 'series'")
        series_id = str(header["series"])
        if header["htype"] == "dheader-1.0":
            config = pending.parts[1] if len(pending.parts) > 1 else None  # header_detail none: no config
            maps = _header_maps(pending.parts[2:], config)
            self._detector_id = series_id
            self.series = ImageSeries.begin(self.template, self.plan, self.fresh_id(series_id), self.counts,
                                            simplon_v1_count(config), maps)
            logger.info("DECTRIS series %s (header_detail %s)", series_id, header.get("header_detail", "basic"))
            return []
        if header["htype"] == "dseries_end-1.0":
            if self.series is None or self._detector_id != series_id:
                self.counts["unknown_series_end"] += 1
                return []
            series, self.series, self._detector_id = self.series, None, None
            return series.end()
        return self._image(series_id, header, pending.parts[1], pending.parts[2])

    def _image(self, series_id: str, header: dict[str, Any], data: dict[str, Any],
               blob: Any) -> list[Decoded | ProtocolError]:
        image = _int(header, "frame")
        shape = data.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ProtocolError("bad_field", f"dimage_d shape must be [x, y] positive integers, got {shape!r}")
        dtype, encoding = data.get("type"), data.get("encoding")
        if dtype not in DTYPES:
            raise ProtocolError("bad_field", f"dimage_d type {dtype!r} not in {DTYPES}")
        if encoding not in V1_ENCODINGS:
            raise ProtocolError("unsupported_encoding", f"encoding {encoding!r}; supported {tuple(V1_ENCODINGS)}")
        if encoding.startswith("bs") and int(encoding[2:].split("-")[0]) != 8 * np.dtype(dtype).itemsize:
            raise ProtocolError("bad_field", f"encoding {encoding!r} does not fit type {dtype!r}")
        size = data.get("size")
        if size is not None and size != memoryview(blob).nbytes:
            raise ProtocolError("payload_size", f"dimage_d size {size!r}, blob of {memoryview(blob).nbytes} bytes")
        if self.series is None or self._detector_id != series_id:
            # no header seen: the series starts here, without the detector's count
            self._detector_id = series_id
            self.series = ImageSeries.begin(self.template, self.plan, self.fresh_id(series_id), self.counts,
                                            DetectorCount())
        return self.series.image(image, blob, (shape[1], shape[0]), str(dtype), V1_ENCODINGS[encoding])


def _header_maps(parts: list[Any], config: Any) -> DetectorMaps:
    """The pixel mask (non-zero = bad) and flatfield of a ``header_detail`` "all" header's extra parts
    (``[flatfield header, blob, pixel mask header, blob, count-rate header, blob]``, raw little-endian blobs,
    ``shape`` [x, y]); the flatfield is left out when the config says the detector applied it already."""
    maps: dict[str, np.ndarray] = {}
    for header, blob in zip(parts[0::2], parts[1::2], strict=False):
        htype = header.get("htype")
        if htype not in MAP_TYPES:
            continue
        shape, dtype = header.get("shape"), header.get("type")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ProtocolError("bad_field", f"{htype} shape must be [x, y] positive integers, got {shape!r}")
        if dtype not in MAP_TYPES[htype]:
            raise ProtocolError("bad_field", f"{htype} type {dtype!r} not in {MAP_TYPES[htype]}")
        size = memoryview(blob).nbytes
        expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
        if size != expected:
            raise ProtocolError("payload_size", f"{htype} of {shape} {dtype}: {size} bytes, expected {expected}")
        maps[htype] = np.frombuffer(blob, np.dtype(dtype).newbyteorder("<")).reshape(shape[1], shape[0])
    mask = maps.get("dpixelmask-1.0")
    flatfield = maps.get("dflatfield-1.0")
    if flatfield is not None and isinstance(config, dict) and config.get("flatfield_correction_applied") is True:
        flatfield = None  # the images are corrected already
    return (None if mask is None else mask != 0), (None if flatfield is None else flatfield.astype(np.float32))


# ------------------------------------------------------------------------------------------ writing (tests, tools)


def header_message(series: int | str, header_detail: str = "basic", config: dict[str, Any] | None = None,
                   pixel_mask: np.ndarray | None = None, flatfield: np.ndarray | None = None) -> list[bytes]:
    """A ``dheader-1.0`` message; ``config`` is the detector configuration part (e.g. ``{"nimages": 1,
    "ntrigger": 256, "trigger_mode": "exts"}``). ``"all"`` adds the flatfield, pixel mask and count-rate parts:
    ``pixel_mask`` (rows, cols; uint32, non-zero = bad) and ``flatfield`` (float32) default to those of a
    detector of the config's ``y_pixels_in_detector`` × ``x_pixels_in_detector`` without bad pixels (1 × 1 when
    the config does not say)."""
    parts = [json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": header_detail}).encode()]
    if header_detail != "none":
        parts.append(json.dumps(config or {}).encode())
    if header_detail == "all":
        shape = ((config or {}).get("y_pixels_in_detector", 1), (config or {}).get("x_pixels_in_detector", 1))
        maps = {"dflatfield-1.0": np.ones(shape, "<f4") if flatfield is None else flatfield.astype("<f4"),
                "dpixelmask-1.0": np.zeros(shape, "<u4") if pixel_mask is None else pixel_mask.astype("<u4"),
                "dcountrate_table-1.0": np.zeros((1, 1), "<f4")}
        for extra in HEADER_EXTRAS:
            values = maps[extra]
            parts += [json.dumps({"htype": extra, "shape": [values.shape[1], values.shape[0]],
                                  "type": values.dtype.name}).encode(), values.tobytes()]
    return parts


def image_message(series: int | str, image: int, pixels: np.ndarray, encoding: str = "bslz4") -> list[bytes]:
    """A ``dimage-1.0`` message of ``pixels`` (rows, cols) as ``bslz4`` (``bsN-lz4<``), ``lz4_block`` or raw."""
    pixels = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
    name = {"raw": "<", "lz4_block": "lz4<", "bslz4": f"bs{8 * pixels.itemsize}-lz4<"}[encoding]
    blob = pixels.tobytes() if encoding == "raw" else compress(pixels, encoding)
    data = {"htype": "dimage_d-1.0", "shape": [pixels.shape[1], pixels.shape[0]], "type": pixels.dtype.name,
            "encoding": name, "size": len(blob)}
    timing = {"htype": "dconfig-1.0", "start_time": image, "stop_time": image + 1, "real_time": 1}
    return [json.dumps({"htype": "dimage-1.0", "series": series, "frame": image, "hash": ""}).encode(),
            json.dumps(data).encode(), blob, json.dumps(timing).encode()]


def end_message(series: int | str) -> list[bytes]:
    return [json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()]
