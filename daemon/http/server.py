"""The operator's HTTP surface: status, tiles, the preview mosaic and a control endpoint.

A :class:`StatusServer` runs a stdlib ``ThreadingHTTPServer`` in a daemon thread.
It knows nothing of the daemon: every answer comes from the callables in
:class:`Providers`, which must be thread-safe (each request runs on its own thread).

==========  =====================  ==============================================
method      path                   answer
==========  =====================  ==============================================
GET         ``/``, ``/viewer.js``,  the live viewer page and its script and style
            ``/viewer.css``        (:mod:`ptylive.daemon.http.viewer`)
GET         ``/status``            ``Providers.status()`` as JSON
GET         ``/tiles``             ``Providers.tiles()`` as JSON
GET         ``/preview.png``       ``Providers.preview_png()``; 404 while it is None;
                                   ``?slice=k``: ``Providers.slice_png(k)``
GET         ``/virtual.json``      ``Providers.virtual_index()`` as JSON; 404 if unset
GET         ``/virtual.png``       ``?kind=K``: ``Providers.virtual_png(K)``; 404 while it is None
GET         ``/diffraction.png``   ``Providers.diffraction_png()``; 404 while unset or None
GET         ``/probe.png``         ``Providers.probe_png()``; 404 while unset or None
GET         ``/events``            server-sent events from ``Providers.events``
GET         ``/files/<name>.h5``   a final file of ``Providers.output_folder``
GET         ``/metrics``           ``Providers.metrics()`` body and type; 404 if unset
POST        ``/control``           ``{"action": "finalize"|"abort", "series_id": str}``, or
                                   ``{"action": "scan", ...}`` (:func:`.requests.parse_control`), with
                                   ``Authorization: Bearer <token>`` (:mod:`.access`)
==========  =====================  ==============================================

Every route first checks the request's ``Host`` (:class:`~ptylive.daemon.http.access.HostNames`: DNS
rebinding), counted and logged like a refused ``POST /control``.

Errors are JSON ``{"error": "..."}``: 400 bad request, 401 no or wrong token, 403 control disabled or a
foreign Host or Origin, 404 unknown path, 405 wrong method, 409 control refused, 415 not JSON, 500 provider
raised (the body names only the exception's type: its message may hold a path), 503 too many event streams.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from ptylive.daemon.http.access import ControlAccess, HostNames, Refusal
from ptylive.daemon.http.requests import (
    CONTROL_DISABLED,
    MAX_CONTROL_BODY_BYTES,
    BadRequest,
    parse_control,
    parse_preview_query,
    parse_virtual_query,
)
from ptylive.daemon.http.sse import EventHub, json_ready
from ptylive.daemon.http.streams import OpenConnections, listed_files, send_event_stream, send_file, served_file
from ptylive.daemon.http.viewer import viewer_asset
from ptylive.streaming.scan_plan import ScanRequest

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
SHUTDOWN_POLL_S = 0.05  # how often serve_forever checks for close(); the default 0.5 s slows shutdown
ALL_INTERFACES = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Providers:
    """Callables the server asks for each answer.

    Attributes
    ----------
    status : () -> dict
        JSON for ``/status``. The viewer reads ``series_id``, ``iteration``, ``finished``, ``workers_up``,
        ``heartbeat_age_s``, ``worker_errors``, ``coverage`` and ``ingest.registry`` when present.
    tiles : () -> dict
        JSON for ``/tiles``. The viewer draws ``tiles`` (flat objects with ``tile`` = [row0, row1, col0, col1])
        over the mosaic, placed by ``object_shape``; it reads ``n_slices`` and ``coverage`` too.
    preview_png : () -> bytes or None
        PNG of the mosaic, or None before the first preview (answered 404).
    control : (action, series_id) -> (accepted, message), optional
        Called for ``POST /control`` once :class:`~ptylive.daemon.http.access.ControlAccess` let the request
        through; None disables the endpoint (403).
    metrics : () -> (body, content_type), optional
        Body for ``/metrics`` (e.g. Prometheus exposition); None answers 404.
    events : EventHub, optional
        Source of ``/events`` (server-sent events); None answers 404.
    slice_png : (k) -> bytes or None, optional
        PNG of slice ``k``'s mosaic for ``/preview.png?slice=k``; None (or an answer of None) is 404.
    output_folder : Path, optional
        Where ``/files/<name>.h5`` reads final files; None answers 404.
    on_refused : (reason) -> None, optional
        Told of every refused ``POST /control``, with a reason of ``access.REFUSAL_REASONS`` (e.g. a metric).
    scan : (request, series_id) -> (accepted, message), optional
        Called for ``POST /control`` ``{"action": "scan", ...}`` once access was checked: the scan of the next
        series (or of ``series_id``). None answers 409 (this daemon takes no scan requests).
    virtual_index : () -> dict, optional
        JSON for ``/virtual.json`` (the latest series' virtual images: ``docs/daemon.md``); None answers 404.
    virtual_png : (kind) -> bytes or None, optional
        PNG of virtual image ``kind`` for ``/virtual.png?kind=``; None (or an answer of None) is 404.
    diffraction_png, probe_png : () -> bytes or None, optional
        PNGs of the mean diffraction pattern (log scale) and of the probe's amplitude; None (or an answer of None)
        is 404.
    """

    status: Callable[[], dict[str, Any]]
    tiles: Callable[[], dict[str, Any]]
    preview_png: Callable[[], bytes | None]
    control: Callable[[str, str | None], tuple[bool, str]] | None = None
    metrics: Callable[[], tuple[bytes, str]] | None = None
    events: EventHub | None = None
    slice_png: Callable[[int], bytes | None] | None = None
    output_folder: Path | None = None
    on_refused: Callable[[str], None] | None = None
    scan: Callable[[ScanRequest, str | None], tuple[bool, str]] | None = None
    virtual_index: Callable[[], dict[str, Any]] | None = None
    virtual_png: Callable[[str], bytes | None] | None = None
    diffraction_png: Callable[[], bytes | None] | None = None
    probe_png: Callable[[], bytes | None] | None = None


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
            refusal = self.server.hosts.refusal(self.headers, self.server.bound_host)
            if refusal is not None:
                self._refuse(refusal)
                return
            route(path)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away during %s %s", self.command, path)
        except BadRequest as error:
            self.close_connection = True  # the body may be unread
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 - a provider failure must not stop the server
            logger.exception("HTTP %s %s failed", self.command, path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR,  # the message stays in the log: it may name a path
                            {"error": f"internal error ({type(error).__name__}); see the daemon's log"})

    def _get(self, path: str) -> None:
        providers = self.server.providers
        asset = viewer_asset(path)
        if asset is not None:
            self._send(HTTPStatus.OK, *asset)
        elif path == "/status":
            self._send_json(HTTPStatus.OK, providers.status())
        elif path == "/tiles":
            self._send_json(HTTPStatus.OK, providers.tiles())
        elif path == "/preview.png":
            self._send_preview(parse_preview_query(urlsplit(self.path).query))
        elif path == "/virtual.json" and providers.virtual_index is not None:
            self._send_json(HTTPStatus.OK, providers.virtual_index())
        elif path == "/virtual.png" and providers.virtual_png is not None:
            self._send_virtual(providers.virtual_png, parse_virtual_query(urlsplit(self.path).query))
        elif path in ("/diffraction.png", "/probe.png"):
            image = providers.diffraction_png if path == "/diffraction.png" else providers.probe_png
            self._send_png(image() if image is not None else None, f"no {path[1:-4]} image (yet)")
        elif path == "/events" and providers.events is not None:
            send_event_stream(self, providers.events, self.server.closing)
        elif path == "/files/" and providers.output_folder is not None:
            self._send_json(HTTPStatus.OK, listed_files(providers.output_folder))
        elif path.startswith("/files/") and providers.output_folder is not None:
            self._send_file(providers.output_folder, unquote(path[len("/files/"):]))
        elif path == "/metrics" and providers.metrics is not None:
            body, content_type = providers.metrics()
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/control":
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST for /control"}, {"Allow": "POST"})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r}"})

    def _send_preview(self, slice_index: int | None) -> None:
        """The projected phase (``slice_index`` None) or one slice's phase."""
        slice_png = self.server.providers.slice_png
        if slice_index is None:
            png, missing = self.server.providers.preview_png(), "no preview yet"
        else:
            png, missing = (slice_png(slice_index) if slice_png else None), f"no preview of slice {slice_index}"
        if png is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": missing})
        else:
            self._send(HTTPStatus.OK, png, "image/png")

    def _send_virtual(self, virtual_png: Callable[[str], bytes | None], kind: str) -> None:
        self._send_png(virtual_png(kind), f"no virtual image {kind!r} (yet): /virtual.json lists those there are")

    def _send_png(self, png: bytes | None, missing: str) -> None:
        if png is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": missing})
        else:
            self._send(HTTPStatus.OK, png, "image/png")

    def _send_file(self, folder: Path, name: str) -> None:
        try:
            path = served_file(folder, name)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        except FileNotFoundError as error:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": str(error)})
            return
        send_file(self, path, "application/x-hdf5")

    def _post(self, path: str) -> None:
        if path != "/control":
            known = viewer_asset(path) is not None or path in ("/status", "/tiles", "/preview.png", "/metrics",
                                                                "/events", "/virtual.json", "/virtual.png",
                                                                "/diffraction.png", "/probe.png")
            status = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            self.close_connection = True  # the body is left unread
            self._send_json(status, {"error": f"POST not supported for {path!r}"})
            return
        control, access = self.server.providers.control, self.server.access
        if control is None or access is None:
            self.close_connection = True
            self._send_json(HTTPStatus.FORBIDDEN, {"error": CONTROL_DISABLED})
            return
        refusal = access.refusal(self.headers, self.server.bound_host, self.server.server_address[1])
        if refusal is not None:
            self._refuse(refusal)
            return
        request = parse_control(self._read_body(MAX_CONTROL_BODY_BYTES))
        if request.action == "scan":
            scan = self.server.providers.scan
            accepted, message = ((False, "this daemon takes no scan requests") if scan is None or request.scan is None
                                 else scan(request.scan, request.series_id))
        else:
            accepted, message = control(request.action, request.series_id)
        status = HTTPStatus.OK if accepted else HTTPStatus.CONFLICT
        self._send_json(status, {"accepted": bool(accepted), "message": str(message)})

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a refused request; logged once, without the token, and counted."""
        logger.warning("refused %s %s from %s (%s): %s", self.command, urlsplit(self.path).path,
                       self.client_address[0], refusal.reason, refusal.message)
        on_refused = self.server.providers.on_refused
        if on_refused is not None:
            on_refused(refusal.reason)
        self.close_connection = True  # the body is left unread
        challenge = {"WWW-Authenticate": 'Bearer realm="ptylive"'} if refusal.status == HTTPStatus.UNAUTHORIZED else {}
        self._send_json(refusal.status, {"error": refusal.message}, challenge)

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

    def _send_json(self, status: HTTPStatus, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(json_ready(payload), allow_nan=False).encode("utf-8")
        self._send(status, body, JSON_TYPE, headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")


class _Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` carrying the providers its handlers read, and its open connections.

    Handler threads are daemon threads that ``server_close`` does not wait for, so ``connections.end_all()``
    ends them: a browser's kept-alive connection or event stream would otherwise outlive the server.
    """

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (the stdlib's 5 made one /status wait 14.8 s behind 400 clients)
    max_connections = 64  # handler threads; a client beyond them gets 503 at once, without a thread

    def __init__(self, address: tuple[str, int], providers: Providers, access: ControlAccess | None,
                 hosts: HostNames) -> None:
        self.providers, self.access, self.hosts = providers, access, hosts
        self.bound_host = address[0]
        self.closing = threading.Event()  # ends the event streams
        self.connections = OpenConnections()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if len(self.connections) >= self.max_connections:  # bounded threads: slow clients cannot pile them up
            try:
                request.sendall(BUSY_RESPONSE)
            except OSError as error:
                logger.debug("busy reply not sent: %s", error)
            self.shutdown_request(request)
            return
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)


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
    access : ControlAccess, optional
        The token and host names ``POST /control`` requires; needed when ``providers.control`` is set.
    allowed_hosts : tuple of str, optional
        Names beside the server's own that every request's ``Host`` may carry (``http.allowed_hosts``); by
        default ``access``'s, else none.
    """

    def __init__(self, providers: Providers, host: str = "127.0.0.1", port: int = 0,
                 access: ControlAccess | None = None, allowed_hosts: tuple[str, ...] | None = None) -> None:
        if providers.control is not None and access is None:
            raise ValueError("POST /control needs a ControlAccess (its token); none was given")
        if allowed_hosts is None:
            allowed_hosts = access.allowed_hosts if access is not None else ()
        self._server = _Server((host, port), providers, access, HostNames(allowed_hosts))
        self._host = host
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
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
                self._thread = threading.Thread(target=self._serve, name="ptylive-http", daemon=True)
                self._thread.start()
                logger.info("operator HTTP server listening on %s", self.url)
                if self._host in ALL_INTERFACES:
                    logger.warning("operator HTTP server bound to every interface (%r, port %d): whoever reaches "
                                   "this machine sees status, previews and result files; bind one address "
                                   "(http.host) or firewall the port", self._host, self.port)
        return self

    def _serve(self) -> None:
        try:
            self._server.serve_forever(SHUTDOWN_POLL_S)
        except BaseException as error:  # kept for thread_state(), never swallowed silently
            logger.exception("HTTP server thread failed")
            self._error = error

    def thread_state(self) -> tuple[bool, BaseException | None]:
        """Whether the serving thread runs, and the exception that ended it (None: none)."""
        return self._thread is not None and self._thread.is_alive(), self._error

    def close(self) -> None:
        """Stop serving, close the socket and join the thread. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._server.closing.set()
            if self._thread is not None:
                if self._thread.is_alive():  # shutdown() waits for serve_forever to end: ask a running one only
                    self._server.shutdown()
                self._thread.join()
            self._server.server_close()
            self._server.connections.end_all()
        logger.debug("operator HTTP server on port %d closed", self.port)

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
