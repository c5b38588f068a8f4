"""Long HTTP answers for :mod:`ptylive.daemon.http.server` (an event stream, a file download) and the
connections that carry them.

Both answers write straight to a ``BaseHTTPRequestHandler`` (status line, headers, body) and hold its
thread for as long as the body lasts: an event stream until the client leaves or the server closes.
:class:`OpenConnections` lets the server end every connection when it closes.
"""

from __future__ import annotations

import json
import logging
import re
import select
import shutil
import socket
import stat
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from ptylive.daemon.http.sse import EventHub, TooManySubscribers, stream_events

logger = logging.getLogger(__name__)

FILE_CHUNK_BYTES = 1 << 20


class OpenConnections:
    """The sockets a threading server has handed to its handler threads (thread-safe)."""

    def __init__(self) -> None:
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def add(self, connection: socket.socket) -> None:
        with self._lock:
            self._sockets.add(connection)

    def discard(self, connection: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(connection)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sockets)

    def end_all(self) -> None:
        """Shut every connection down: its handler thread reads end-of-file (or fails to write) and returns."""
        with self._lock:
            connections = list(self._sockets)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError as error:  # closed by its own thread meanwhile: nothing left to end
                logger.debug("connection already closed: %s", error)


def client_gone(connection: socket.socket) -> bool:
    """True once the client closed its end: the socket is readable and a peek reads nothing.

    Event-stream clients send nothing after their request, so anything readable is their close.
    """
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def send_event_stream(handler: BaseHTTPRequestHandler, hub: EventHub, closing: threading.Event) -> None:
    """Answer ``GET /events``: ``text/event-stream`` from a new subscription of ``hub``; 503 when it is full.

    Returns when the client leaves (its queue is freed at once), ``closing`` is set or the hub closes.
    """
    try:
        subscription = hub.subscribe()
    except (TooManySubscribers, RuntimeError) as error:
        body = json.dumps({"error": str(error)}).encode()
        handler.close_connection = True
        handler.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Retry-After", "5"), ("Connection", "close")):
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
        return
    with subscription:
        handler.close_connection = True  # the body ends when the connection does
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("Connection", "close")
        handler.end_headers()
        logger.debug("event stream opened (%d open)", hub.subscribers)
        stream_events(subscription, handler.wfile.write,
                      lambda: closing.is_set() or client_gone(handler.connection))
    logger.debug("event stream closed (%d open)", hub.subscribers)


def send_file(handler: BaseHTTPRequestHandler, path: Path, content_type: str) -> None:
    """Answer with the file at ``path`` as an attachment, read in chunks (final files can be large)."""
    with open(path, "rb") as file:
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(path.stat().st_size))
        handler.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        shutil.copyfileobj(file, handler.wfile, FILE_CHUNK_BYTES)


SERVED_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.h5")  # what service.results.output_path makes, nothing else


#: Most files ``GET /files/`` lists (the newest): a results folder of weeks of series stays one bounded reply.
MAX_LISTED_FILES = 1000


def listed_files(folder: Path, limit: int = MAX_LISTED_FILES) -> dict[str, Any]:
    """``GET /files/``: the final files ``GET /files/<name>`` serves, newest first, at most ``limit``.

    Each entry has ``name``, ``bytes`` and ``modified_s`` (POSIX time); ``total`` counts every such file and
    ``truncated`` says whether some were left out. Names that :func:`served_file` would refuse (``.partial``
    files, anything not ``<stem>.h5``) are not listed; neither are symbolic links.
    """
    entries: list[dict[str, Any]] = []
    try:
        candidates = list(folder.iterdir())
    except OSError as exc:
        return {"files": [], "total": 0, "truncated": False, "error": type(exc).__name__}
    for path in candidates:
        if not SERVED_NAME.fullmatch(path.name):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            entries.append({"name": path.name, "bytes": info.st_size, "modified_s": info.st_mtime})
    entries.sort(key=lambda entry: (-float(entry["modified_s"]), str(entry["name"])))
    return {"files": entries[:limit], "total": len(entries), "truncated": len(entries) > limit}


def served_file(folder: Path, name: str) -> Path:
    """The final file ``folder/name`` for download (``GET /files/<name>``).

    Raises
    ------
    ValueError
        If ``name`` is not a plain ``<stem>.h5`` name as :func:`ptylive.daemon.service.results.output_path`
        makes them (no folders, no leading dot, no ``.partial``), or it resolves outside ``folder`` (a
        symbolic link).
    FileNotFoundError
        If there is no such regular file.
    """
    if not SERVED_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a final file name; expected <series id>.h5 with only "
                         "letters, digits, '.', '_' and '-'")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"no final file {name!r}")
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{name!r} resolves outside the output folder")
    return path
