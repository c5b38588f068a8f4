"""What operators send to the HTTP server, parsed and checked before anything acts on it.

Pure functions: each returns the parsed request or raises :class:`BadRequest` naming the offending
value and what was expected (the server answers 400 with that message).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

MAX_CONTROL_BODY_BYTES = 4096
CONTROL_ACTIONS = ("finalize", "abort")
CONTROL_DISABLED = "control endpoint disabled; set http.control = true"


class BadRequest(ValueError):
    """A request the client must fix (answered 400 with the message)."""


def parse_control(body: bytes) -> tuple[str, str | None]:
    """Return ``(action, series_id)`` from a ``/control`` body.

    Raises
    ------
    BadRequest
        If the body is not a JSON object with a known ``action``, an optional string
        ``series_id`` and no other keys.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"body must be a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - {"action", "series_id"})
    if unknown:
        raise BadRequest(f"unknown keys {unknown}; expected 'action' and optional 'series_id'")
    action = request.get("action")
    if action not in CONTROL_ACTIONS:
        raise BadRequest(f"unknown action {action!r}; expected one of {list(CONTROL_ACTIONS)}")
    series_id = request.get("series_id")
    if series_id is not None and not isinstance(series_id, str):
        raise BadRequest(f"series_id must be a string or null, got {series_id!r}")
    return action, series_id


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
