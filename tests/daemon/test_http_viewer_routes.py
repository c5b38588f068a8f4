"""The viewer's routes of the operator HTTP server: ``/events`` (server-sent events), ``/preview.png?slice=k``
and ``/files/<name>.h5``, and how closing the server ends long-lived connections."""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.http.server import Providers, StatusServer
from ptylive.daemon.service.preview import to_png
from tests.daemon.http_harness import FakeDaemon, request


def open_stream(server: StatusServer) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/events")
    return connection, connection.getresponse()


def read_block(response: http.client.HTTPResponse) -> bytes:
    """One server-sent event (or comment) up to its blank line; b"" at the end of the stream."""
    lines = []
    while (line := response.readline()) not in (b"\n", b""):
        lines.append(line)
    return b"".join(lines)


def eventually(predicate: Any, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_events_stream_is_sse_and_carries_published_events(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    connection, response = open_stream(server)
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert read_block(response) == b"retry: 2000\n"
    assert eventually(lambda: fake_daemon.hub.subscribers == 1)
    event = fake_daemon.hub.publish("preview", {"series_id": "s-042", "version": 3})
    assert read_block(response) + b"\n" == event.encode()
    connection.close()


def test_a_client_that_leaves_frees_its_queue_and_a_full_server_answers_503(server: StatusServer,
                                                                            fake_daemon: FakeDaemon) -> None:
    streams = [open_stream(server), open_stream(server)]
    assert eventually(lambda: fake_daemon.hub.subscribers == 2)
    reply = request(server.url + "events")
    assert reply.status == 503 and "at most 2" in reply.json()["error"]
    for expected, (connection, response) in zip((1, 0), streams, strict=True):
        response.close()
        connection.close()  # noticed within a poll (1 s), not at the next keep-alive (15 s)
        assert eventually(lambda expected=expected: fake_daemon.hub.subscribers == expected)


def test_close_ends_event_streams_and_kept_alive_connections(fake_daemon: FakeDaemon) -> None:
    server = StatusServer(fake_daemon.providers()).start()
    stream, response = open_stream(server)
    kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    kept.request("GET", "/status")
    kept.getresponse().read()
    assert eventually(lambda: fake_daemon.hub.subscribers == 1)
    began = time.monotonic()
    server.close()
    assert read_block(response) == b"retry: 2000\n" and read_block(response) == b""  # end of stream
    assert time.monotonic() - began < 3.0
    with pytest.raises((http.client.HTTPException, OSError)):
        kept.request("GET", "/status")
        kept.getresponse()
    response.close()
    stream.close()
    kept.close()


def test_events_absent_without_a_hub() -> None:
    providers = Providers(status=dict, tiles=dict, preview_png=lambda: None)
    with StatusServer(providers) as server:
        assert request(server.url + "events").status == 404
        assert request(server.url + "files/a.h5").status == 404
        assert request(server.url + "preview.png?slice=0").status == 404


@pytest.mark.parametrize("query, expected", [("?slice=projected&v=s.3", "projected"), ("?slice=0", 0),
                                             ("?v=s.3&slice=2", 2), ("?slice=3", None)])
def test_preview_of_one_slice(server: StatusServer, fake_daemon: FakeDaemon, query: str, expected: Any) -> None:
    fake_daemon.png = to_png(np.zeros((2, 2)))
    fake_daemon.slices = [to_png(np.full((2, 2), k)) for k in range(3)]
    reply = request(server.url + "preview.png" + query)
    if expected is None:
        assert reply.status == 404 and reply.json() == {"error": "no preview of slice 3"}
    else:
        assert reply.status == 200 and reply.content_type == "image/png"
        assert reply.body == (fake_daemon.png if expected == "projected" else fake_daemon.slices[expected])


@pytest.mark.parametrize("query", ["?slice=-1", "?slice=one", "?slice=1.5", "?slice=%D9%A3", "?slice=9999999"])
def test_bad_slice_is_400(server: StatusServer, query: str) -> None:
    reply = request(server.url + "preview.png" + query)
    assert reply.status == 400 and "expected 'projected' or a slice index" in reply.json()["error"]


@pytest.fixture
def files(fake_daemon: FakeDaemon, tmp_path: Path) -> Iterator[tuple[StatusServer, Path]]:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "scan-1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 10)
    (folder / "scan-2.h5.partial").write_bytes(b"PARTIAL CONTENT")
    (folder / ".hidden.h5").write_bytes(b"HIDDEN CONTENT")
    (tmp_path / "secret.h5").write_bytes(b"SECRET CONTENT")
    (folder / "link.h5").symlink_to(tmp_path / "secret.h5")
    fake_daemon.output_folder = folder
    with StatusServer(fake_daemon.providers()) as running:
        yield running, folder


def test_final_files_are_served_as_attachments(files: tuple[StatusServer, Path]) -> None:
    server, folder = files
    reply = request(server.url + "files/scan-1.h5")
    assert reply.status == 200 and reply.content_type == "application/x-hdf5" and reply.cache_control == "no-store"
    assert reply.body == (folder / "scan-1.h5").read_bytes()
    with urllib.request.urlopen(server.url + "files/scan-1.h5", timeout=5) as response:
        assert response.headers["Content-Disposition"] == 'attachment; filename="scan-1.h5"'
    missing = request(server.url + "files/scan-9.h5")
    assert missing.status == 404 and "scan-9.h5" in missing.json()["error"]


@pytest.mark.parametrize("name", ["scan-2.h5.partial", ".hidden.h5", "..%2Fsecret.h5", "%2E%2E%2Fsecret.h5",
                                  "sub/scan-1.h5", "link.h5", "scan-1.h5%00.h5", "%2Fetc%2Fpasswd", "scan-1"])
def test_nothing_but_a_final_file_of_the_output_folder_is_served(files: tuple[StatusServer, Path], name: str) -> None:
    server, _ = files
    reply = request(server.url + "files/" + name)
    assert reply.status in (400, 404)
    assert b"CONTENT" not in reply.body


def test_the_results_listing_names_only_what_files_serves_newest_first(files: tuple[StatusServer, Path]) -> None:
    """``GET /files/``: the final files (name, bytes, modified_s), newest first; never a .partial, a hidden file,
    a symbolic link or anything outside the folder."""
    server, folder = files
    (folder / "scan-3.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    os.utime(folder / "scan-1.h5", (1_000_000, 1_000_000))
    reply = request(server.url + "files/")
    assert reply.status == 200 and reply.cache_control == "no-store"
    listing = reply.json()
    assert [entry["name"] for entry in listing["files"]] == ["scan-3.h5", "scan-1.h5"]
    assert listing["files"][1] == {"name": "scan-1.h5", "bytes": (folder / "scan-1.h5").stat().st_size,
                                   "modified_s": 1_000_000.0}
    assert listing["total"] == 2 and listing["truncated"] is False
    assert b"CONTENT" not in reply.body and b"secret" not in reply.body and b"partial" not in reply.body


def test_the_results_listing_is_bounded(tmp_path: Path) -> None:
    from ptylive.daemon.http.streams import listed_files

    for i in range(5):
        (tmp_path / f"s-{i}.h5").write_bytes(b"x")
        os.utime(tmp_path / f"s-{i}.h5", (1000 + i, 1000 + i))
    listing = listed_files(tmp_path, limit=3)
    assert [entry["name"] for entry in listing["files"]] == ["s-4.h5", "s-3.h5", "s-2.h5"]
    assert listing["total"] == 5 and listing["truncated"] is True
    assert listed_files(tmp_path / "missing")["error"] == "FileNotFoundError"


def test_traversal_in_the_raw_path_is_refused(files: tuple[StatusServer, Path]) -> None:
    server, _ = files
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /files/../secret.h5 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(4096), b""))
    assert answer.startswith(b"HTTP/1.1 400") and b"CONTENT" not in answer
