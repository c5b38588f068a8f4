"""The operator HTTP server against real sockets on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.http.server import CONTROL_DISABLED, StatusServer
from ptylive.daemon.http.viewer import ASSETS
from ptylive.daemon.service.preview import to_png
from tests.daemon.http_harness import STATUS, TILES, TOKEN, FakeDaemon, post_json, request


def test_url_has_the_chosen_port(server: StatusServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/"


@pytest.mark.parametrize("path, expected", [("status", STATUS), ("tiles", TILES)])
def test_json_routes(server: StatusServer, path: str, expected: dict[str, Any]) -> None:
    reply = request(server.url + path)
    assert reply.status == 200 and reply.cache_control == "no-store"
    data = reply.json()
    assert {key: data[key] for key in expected} == expected


def test_status_json_is_strict_nan_becomes_null_and_numpy_scalars_serialise(server: StatusServer) -> None:
    text = request(server.url + "status").body.decode()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert data["loss"] is None and data["mean_phase"] == 0.25


def test_preview_is_404_until_there_is_one(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    reply = request(server.url + "preview.png")
    assert reply.status == 404 and reply.json() == {"error": "no preview yet"}
    fake_daemon.png = to_png(np.arange(12.0).reshape(3, 4))
    reply = request(server.url + "preview.png?t=12345")  # the page's cache-busting query
    assert reply.status == 200 and reply.content_type == "image/png" and reply.cache_control == "no-store"
    assert reply.body == fake_daemon.png


def test_metrics_served_when_provided(server: StatusServer) -> None:
    reply = request(server.url + "metrics")
    assert reply.status == 200 and reply.content_type == "text/plain; version=0.0.4"
    assert reply.body == b"ptylive_frames_total 120\n"


def test_metrics_and_control_absent_when_not_provided(fake_daemon: FakeDaemon) -> None:
    with StatusServer(fake_daemon.providers(control=False, metrics=False)) as server:
        assert request(server.url + "metrics").status == 404
        reply = post_json(server.url + "control", {"action": "abort"})
        assert reply.status == 403 and reply.json() == {"error": CONTROL_DISABLED}
    assert fake_daemon.control_calls == []


def test_unknown_path_is_json_404(server: StatusServer) -> None:
    reply = request(server.url + "nope")
    assert reply.status == 404 and "nope" in reply.json()["error"]


def test_viewer_page_is_self_contained(server: StatusServer) -> None:
    bodies = {}
    for path, (_, content_type) in ASSETS.items():
        reply = request(server.url + path.lstrip("/"))
        assert reply.status == 200 and reply.content_type == content_type and reply.cache_control == "no-store"
        bodies[path] = reply.body.decode()
        assert re.search(r"(https?|wss?):|//[a-z]", bodies[path]) is None  # nothing absolute, nothing elsewhere
    page = bodies["/"]
    # relative URLs only, so the page works behind a reverse proxy that adds a path prefix
    assert '<link rel="stylesheet" href="viewer.css">' in page and 'src="viewer.js"' in page
    assert 'from "./draw.js"' in bodies["/viewer.js"]
    for path in ("events", "preview.png", "tiles", "status"):
        assert f'"{path}' in bodies["/viewer.js"]
    assert re.search(r"""(href|src|fetch\(|EventSource\()\s*=?\s*["']/""", page + bodies["/viewer.js"]) is None
    assert "innerHTML" not in bodies["/viewer.js"] + bodies["/draw.js"]  # values are written as text


@pytest.mark.parametrize("payload, expected", [({"action": "finalize", "series_id": "s-042"}, ("finalize", "s-042")),
                                               ({"action": "abort"}, ("abort", None)),
                                               ({"action": "abort", "series_id": None}, ("abort", None))])
def test_control_calls_provider_with_parsed_args(server: StatusServer, fake_daemon: FakeDaemon, payload: dict[str, Any],
                                                 expected: tuple[str, str | None]) -> None:
    reply = post_json(server.url + "control", payload)
    assert reply.status == 200
    assert reply.json() == {"accepted": True, "message": f"{expected[0]} queued"}
    assert fake_daemon.control_calls == [expected]


def test_control_refused_is_409(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    fake_daemon.accept = False
    reply = post_json(server.url + "control", {"action": "finalize"})
    assert reply.status == 409 and reply.json() == {"accepted": False, "message": "finalize refused"}


@pytest.mark.parametrize("body, reason", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                          (b'{"action": "restart"}', "unknown action"),
                                          (b'{"action": "abort", "force": true}', "unknown keys"),
                                          (b'{"action": "abort", "series_id": 5}', "series_id"),
                                          (b" " * 4097, "at most 4096")])
def test_bad_control_requests_are_400_with_reason(server: StatusServer, fake_daemon: FakeDaemon, body: bytes,
                                                  reason: str) -> None:
    reply = request(server.url + "control", body, {"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 400 and reason in reply.json()["error"]
    assert fake_daemon.control_calls == []


def test_get_control_is_405(server: StatusServer) -> None:
    assert request(server.url + "control").status == 405


@pytest.mark.chaos
def test_provider_error_is_500_and_server_keeps_serving(server: StatusServer, fake_daemon: FakeDaemon) -> None:
    fake_daemon.fail_status = True
    reply = request(server.url + "status")
    assert reply.status == 500 and reply.json() == {"error": "internal error (RuntimeError); see the daemon's log"}
    fake_daemon.fail_status = False
    assert request(server.url + "status").status == 200
    assert request(server.url + "tiles").status == 200


def test_close_is_idempotent_and_frees_the_port(fake_daemon: FakeDaemon) -> None:
    server = StatusServer(fake_daemon.providers()).start()
    port = server.port
    assert request(server.url + "status").status == 200
    server.close()
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with StatusServer(fake_daemon.providers(), "127.0.0.1", port) as again:  # the port can be bound again
        assert request(again.url + "status").status == 200


def test_close_without_start_releases_socket(fake_daemon: FakeDaemon) -> None:
    server = StatusServer(fake_daemon.providers())
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


@pytest.mark.chaos
def test_slow_clients_cannot_pile_up_threads_and_get_503_beyond_the_bound(server: StatusServer) -> None:
    """Clients that connect and send nothing hold a handler thread each, up to the bound; one more is answered 503
    at once, without a thread (the server accepts in order, so the bound is full when it comes); once they leave,
    requests are served again. The listen backlog is far above the stdlib's 5."""
    import threading
    import time

    from ptylive.daemon.http.server import _Server

    host, port = server.url.split("//")[1].rstrip("/").split(":")
    before = threading.active_count()
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(_Server.max_connections)]
    try:
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            extra.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(64).startswith(b"HTTP/1.1 503")
        assert threading.active_count() <= before + _Server.max_connections
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 10
    while (reply := request(server.url + "status")).status != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # the idle clients' threads see end-of-file and return
    assert reply.status == 200
    assert _Server.request_queue_size >= 128
