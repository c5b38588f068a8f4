"""What operators send to the HTTP server, parsed and checked before anything acts on it.

Pure functions: each returns the parsed request or raises :class:`BadRequest` naming the offending
value and what was expected (the server answers 400 with that message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qs

from ptylive.streaming.scan_plan import SCAN_FIELDS, ScanRequest

MAX_CONTROL_BODY_BYTES = 4096
CONTROL_ACTIONS = ("finalize", "abort", "scan")
CONTROL_DISABLED = "control endpoint disabled; set http.control = true"


class BadRequest(ValueError):
    """A request the client must fix (answered 400 with the message)."""


@dataclass(frozen=True)
class ControlRequest:
    """A parsed ``/control`` body: ``finalize`` or ``abort`` a series (None: the current one), or ``scan``: the
    scan geometry of the next series that begins (or of series ``series_id``), ``scan`` holding what was asked."""

    action: str
    series_id: str | None = None
    scan: ScanRequest | None = None


def parse_control(body: bytes) -> ControlRequest:
    """The request of a ``/control`` body.

    ``{"action": "finalize" | "abort", "series_id": optional}``, or ``{"action": "scan", "series_id": optional,
    "shape": [rows, cols], "step_A": Å or [along rows, along cols], "rotation_deg", "snake", "flyback_frames",
    "flyback_at"}`` where every scan key is optional (left out: the ``[scan]`` section's; a shape entry -1: from
    the detector's image count).

    Raises
    ------
    BadRequest
        If the body is not a JSON object with a known ``action``, an optional string ``series_id``, the scan
        keys for ``scan`` only, valid values and no other keys.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"body must be a JSON object, got {type(request).__name__}")
    action = request.get("action")
    known = {"action", "series_id", *(SCAN_FIELDS if action == "scan" else ())}
    unknown = sorted(set(request) - known)
    if unknown:
        scan_keys = f" and, for 'scan', optional {list(SCAN_FIELDS)}" if action != "scan" else f", {list(SCAN_FIELDS)}"
        raise BadRequest(f"unknown keys {unknown}; expected 'action' and optional 'series_id'{scan_keys}")
    if action not in CONTROL_ACTIONS:
        raise BadRequest(f"unknown action {action!r}; expected one of {list(CONTROL_ACTIONS)}")
    series_id = request.get("series_id")
    if series_id is not None and not isinstance(series_id, str):
        raise BadRequest(f"series_id must be a string or null, got {series_id!r}")
    if action != "scan":
        return ControlRequest(action, series_id)
    try:
        scan = ScanRequest.from_mapping({k: v for k, v in request.items() if k in SCAN_FIELDS})
    except (TypeError, ValueError) as error:
        raise BadRequest(f"scan: {error}") from None
    return ControlRequest(action, series_id, scan)


def parse_preview_query(query: str) -> int | None:
    """The slice asked for by ``/preview.png``'s query: None for the projected phase, else ``k >= 0``.

    ``slice=projected`` or no ``slice`` means the projected phase; other keys (the viewer's ``v=``
    cache-buster) are ignored.

    Raises
    ------
    BadRequest
        If ``slice`` is neither ``projected`` nor a non-negative decimal integer.
    """
    which = parse_qs(query).get("slice", ["projected"])[-1]
    if which == "projected":
        return None
    if which.isascii() and which.isdigit() and len(which) <= 6:
        return int(which)
    raise BadRequest(f"slice={which!r}; expected 'projected' or a slice index 0, 1, ...")


def parse_virtual_query(query: str) -> str:
    """The kind ``/virtual.png`` is asked for (``kind=bf``, ``adf0``…); other keys (``v=``) are ignored.

    Raises
    ------
    BadRequest
        If ``kind`` is missing or is not a short name of letters, digits and ``_``.
    """
    kinds = parse_qs(query).get("kind")
    if not kinds:
        raise BadRequest("virtual.png needs kind=<kind>: one of those /virtual.json lists (bf, adf0, com_x, ...)")
    kind = kinds[-1]
    if not (kind.isascii() and kind.replace("_", "").isalnum() and len(kind) <= 32):
        raise BadRequest(f"kind={kind[:40]!r}; expected a virtual image's name such as bf, adf0 or com_x")
    return kind
