"""The operator's HTTP surface: status, tiles, the preview mosaic and a control endpoint.

A :class:`StatusServer` runs a stdlib ``ThreadingHTTPServer`` in a daemon thread.
It knows nothing of the daemon: every answer comes from the callables in
:class:`Providers`, which must be thread-safe (each request runs on its own thread).

==========  ================  ===================================================
method      path              answer
==========  ================  ===================================================
GET         ``/``             self-contained live viewer page (text/html)
GET         ``/status``       ``Providers.status()`` as JSON
GET         ``/tiles``        ``Providers.tiles()`` as JSON
GET         ``/preview.png``  ``Providers.preview_png()``; 404 while it is None
GET         ``/metrics``      ``Providers.metrics()`` body and type; 404 if unset
POST        ``/control``      ``{"action": "finalize"|"abort", "series_id": str}``
==========  ================  ===================================================

Errors are JSON ``{"error": "..."}``: 400 bad request, 403 control disabled,
404 unknown path, 405 wrong method, 409 control refused, 500 provider raised.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from ptylive.daemon.viewer_page import VIEWER_HTML

logger = logging.getLogger(__name__)

MAX_CONTROL_BODY_BYTES = 4096
CONTROL_ACTIONS = ("finalize", "abort")
CONTROL_DISABLED = "control endpoint disabled; set http.control = true"
JSON_TYPE = "application/json"
SHUTDOWN_POLL_S = 0.05  # how often serve_forever checks for close(); the default 0.5 s slows shutdown


@dataclass(frozen=True)
class Providers:
    """Callables the server asks for each answer.

    Attributes
    ----------
    status : () -> dict
        JSON for ``/status``. The viewer page reads ``series_id``, ``frames_received``,
        ``frames_expected`` and ``iteration`` when present.
    tiles : () -> dict
        JSON for ``/tiles``. The viewer page draws ``tiles`` (a list of flat objects) as a table.
    preview_png : () -> bytes or None
        PNG of the mosaic, or None before the first preview (answered 404).
    control : (action, series_id) -> (accepted, message), optional
        Called for ``POST /control``; None disables the endpoint (403).
    metrics : () -> (body, content_type), optional
        Body for ``/metrics`` (e.g. Prometheus exposition); None answers 404.
    """

    status: Callable[[], dict[str, Any]]
    tiles: Callable[[], dict[str, Any]]
    preview_png: Callable[[], bytes | None]
    control: Callable[[str, str | None], tuple[bool, str]] | None = None
    metrics: Callable[[], tuple[bytes, str]] | None = None


class BadRequest(ValueError):
    """A request the client must fix (answered 400 with the message)."""


def _json_ready(value: Any) -> Any:
    """Return ``value`` with numpy scalars/arrays as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the server's :class:`Providers`."""

    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a slow client may hold its thread

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._dispatch(self._post)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, route: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path
        try:
            route(path)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away during %s %s", self.command, path)
        except BadRequest as error:
            self.close_connection = True  # the body may be unread
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 - a provider failure must not stop the server
            logger.exception("HTTP %s %s failed", self.command, path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})

    def _get(self, path: str) -> None:
        providers = self.server.providers
        if path == "/":
            self._send(HTTPStatus.OK, VIEWER_HTML.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/status":
            self._send_json(HTTPStatus.OK, providers.status())
        elif path == "/tiles":
            self._send_json(HTTPStatus.OK, providers.tiles())
        elif path == "/preview.png":
            png = providers.preview_png()
            if png is None:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": "no preview yet"})
            else:
                self._send(HTTPStatus.OK, png, "image/png")
        elif path == "/metrics" and providers.metrics is not None:
            body, content_type = providers.metrics()
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/control":
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST for /control"}, allow="POST")
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r}"})

    def _post(self, path: str) -> None:
        if path != "/control":
            known = path in ("/", "/status", "/tiles", "/preview.png", "/metrics")
            status = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            self.close_connection = True  # the body is left unread
            self._send_json(status, {"error": f"POST not supported for {path!r}"})
            return
        control = self.server.providers.control
        if control is None:
            self.close_connection = True
            self._send_json(HTTPStatus.FORBIDDEN, {"error": CONTROL_DISABLED})
            return
        action, series_id = parse_control(self._read_body(MAX_CONTROL_BODY_BYTES))
        accepted, message = control(action, series_id)
        status = HTTPStatus.OK if accepted else HTTPStatus.CONFLICT
        self._send_json(status, {"accepted": bool(accepted), "message": str(message)})

    def _read_body(self, limit: int) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise BadRequest("Content-Length header required")
        try:
            length = int(length_header)
        except ValueError:
            raise BadRequest(f"Content-Length {length_header!r} is not an integer") from None
        if length < 0 or length > limit:
            raise BadRequest(f"body of {length} bytes; expected at most {limit}")
        return self.rfile.read(length)

    def _send_json(self, status: HTTPStatus, payload: Any, allow: str | None = None) -> None:
        body = json.dumps(_json_ready(payload), allow_nan=False).encode("utf-8")
        self._send(status, body, JSON_TYPE, allow=allow)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow is not None:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` carrying the providers its handlers read."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], providers: Providers) -> None:
        self.providers = providers
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class StatusServer:
    """HTTP server for operators, serving in a daemon thread.

    The socket is bound at construction (so :attr:`url` is known at once);
    :meth:`start` begins serving and :meth:`close` stops it and frees the port.

    Parameters
    ----------
    providers : Providers
        Where every answer comes from.
    host : str
        Address to bind, e.g. ``"127.0.0.1"`` or ``"0.0.0.0"``.
    port : int
        TCP port; 0 picks a free one.
    """

    def __init__(self, providers: Providers, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), providers)
        self._host = host
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound TCP port (the one chosen when constructed with port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL ``http://host:port/``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/"

    def start(self) -> StatusServer:
        """Begin serving in a daemon thread; returns ``self``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("StatusServer was closed; build a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._server.serve_forever, args=(SHUTDOWN_POLL_S,),
                                                name="ptylive-http", daemon=True)
                self._thread.start()
                logger.info("operator HTTP server listening on %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving, close the socket and join the thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._server.shutdown()
                self._thread.join()
            self._server.server_close()
        logger.debug("operator HTTP server on port %d closed", self.port)

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
