"""Checked fields of a ptylive stream v1 header, and the reasons a message is rejected.

Every check raises :class:`ProtocolError` with a ``reason`` from :data:`REJECT_REASONS` (a low-cardinality
metrics label) and a detail naming the field, the value and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DETECTOR_PX = 4096
MAX_SCAN_POSITIONS = 16 * 1024 * 1024
DTYPES = ("uint8", "uint16", "uint32", "int32", "float32", "float64")
V1_REJECT_REASONS = (
    "parts", "header_too_large", "not_msgpack", "not_a_map", "unknown_htype", "missing_field",
    "bad_field", "version", "unsupported_encoding", "payload_size", "too_large", "corrupt_payload",
)
# Only the DECTRIS SIMPLON adapters (docs/dectris.md) give these: a part that is not JSON (stream v1), a message
# that is not CBOR (stream v2), a v1 message cut short or interleaved (a part missing or out of order). They also
# use the reasons above (unknown_htype, bad_field, payload_size, corrupt_payload, ...).
DECTRIS_REJECT_REASONS = ("not_json", "not_cbor", "missing_parts")
REJECT_REASONS = V1_REJECT_REASONS + DECTRIS_REJECT_REASONS


class ProtocolError(ValueError):
    """A message that is rejected; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise AssertionError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def header_field(header: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    if name not in header:
        if optional:
            return None
        raise ProtocolError("missing_field", f"{header.get('htype')!r} lacks {name!r}")
    value = header[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError("bad_field", f"{name!r} must be {kind}, got {type(value).__name__} {value!r}")
    return value


def number(header: dict[str, Any], name: str, positive: bool = False, optional: bool = False) -> float | None:
    value = header_field(header, name, (int, float), optional)
    if value is None:
        return None
    if not math.isfinite(value) or (positive and value <= 0):
        raise ProtocolError("bad_field", f"{name!r} must be a finite{' positive' if positive else ''} number, "
                                         f"got {value!r}")
    return float(value)


def pair(header: dict[str, Any], name: str, kind: type, positive: bool,
          scalar: bool = False) -> tuple[Any, Any]:
    value = header.get(name)
    if scalar and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]  # a scalar step applies to both axes
    allowed = (int, float) if kind is float else int
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, allowed) and not isinstance(v, bool) for v in value)):
        if name not in header:
            raise ProtocolError("missing_field", f"{header.get('htype')!r} lacks {name!r}")
        raise ProtocolError("bad_field", f"{name!r} must be two {kind.__name__}s, got {value!r}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in value):
        raise ProtocolError("bad_field", f"{name!r} must be finite{' and positive' if positive else ''}: {value!r}")
    return kind(value[0]), kind(value[1])


def required_number(header: dict[str, Any], name: str, positive: bool = False) -> float:
    value = number(header, name, positive)
    if value is None:  # not reached: _number raises for a missing required field
        raise ProtocolError("missing_field", f"lacks {name!r}")
    return value


def shape_and_dtype(header: dict[str, Any], what: str) -> tuple[tuple[int, int], str]:
    """Validated ``shape`` (two positive ints, at most MAX_DETECTOR_PX) and ``dtype`` of a frame or detector."""
    shape = pair(header, "shape", int, positive=True)
    if max(shape) > MAX_DETECTOR_PX:
        raise ProtocolError("too_large", f"{what} {shape} exceeds {MAX_DETECTOR_PX} px")
    dtype = header_field(header, "dtype", str)
    if dtype not in DTYPES:
        raise ProtocolError("bad_field", f"{what} dtype {dtype!r} not in {DTYPES}")
    return shape, dtype


def series_id_of(header: dict[str, Any]) -> str:
    """Series ids may be strings or integers (DECTRIS numbers its series); they compare as strings."""
    value = header_field(header, "series_id", (str, int))
    return str(value)
