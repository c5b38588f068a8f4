"""The operator HTTP server against real sockets on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.http_api import CONTROL_DISABLED, Providers, StatusServer
from ptylive.daemon.preview import to_png

STATUS = {"series_id": "s-042", "frames_received": 120, "frames_expected": 400, "iteration": 7}
TILES = {"tiles": [{"rank": 1, "row0": 0, "row1": 32, "col0": 0, "col1": 32, "iteration": 7}]}


@dataclass
class FakeDaemon:
    """Answers the providers and records what the server asked."""

    png: bytes | None = None
    accept: bool = True
    fail_status: bool = False
    control_calls: list[tuple[str, str | None]] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return dict(STATUS, loss=float("nan"), mean_phase=np.float32(0.25))

    def tiles(self) -> dict[str, Any]:
        return TILES

    def preview_png(self) -> bytes | None:
        return self.png

    def control(self, action: str, series_id: str | None) -> tuple[bool, str]:
        self.control_calls.append((action, series_id))
        return self.accept, f"{action} {'queued' if self.accept else 'refused'}"

    def metrics(self) -> tuple[bytes, str]:
        return b"ptylive_frames_total 120\n", "text/plain; version=0.0.4"

    def providers(self, control: bool = True, metrics: bool = True) -> Providers:
        return Providers(status=self.status, tiles=self.tiles, preview_png=self.preview_png,
                         control=self.control if control else None, metrics=self.metrics if metrics else None)


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    cache_control: str | None
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json"
        return json.loads(self.body)


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return Reply(response.status, response.headers["Content-Type"], response.headers["Cache-Control"],
                         response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers["Content-Type"], error.headers["Cache-Control"], error.read())


def post_json(url: str, payload: Any) -> Reply:
    return request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def server(daemon: FakeDaemon) -> Iterator[StatusServer]:
    with StatusServer(daemon.providers(), "127.0.0.1", 0) as running:
        yield running


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


def test_preview_is_404_until_there_is_one(server: StatusServer, daemon: FakeDaemon) -> None:
    reply = request(server.url + "preview.png")
    assert reply.status == 404 and reply.json() == {"error": "no preview yet"}
    daemon.png = to_png(np.arange(12.0).reshape(3, 4))
    reply = request(server.url + "preview.png?t=12345")  # the page's cache-busting query
    assert reply.status == 200 and reply.content_type == "image/png" and reply.cache_control == "no-store"
    assert reply.body == daemon.png


def test_metrics_served_when_provided(server: StatusServer) -> None:
    reply = request(server.url + "metrics")
    assert reply.status == 200 and reply.content_type == "text/plain; version=0.0.4"
    assert reply.body == b"ptylive_frames_total 120\n"


def test_metrics_and_control_absent_when_not_provided(daemon: FakeDaemon) -> None:
    with StatusServer(daemon.providers(control=False, metrics=False)) as server:
        assert request(server.url + "metrics").status == 404
        reply = post_json(server.url + "control", {"action": "abort"})
        assert reply.status == 403 and reply.json() == {"error": CONTROL_DISABLED}
    assert daemon.control_calls == []


def test_unknown_path_is_json_404(server: StatusServer) -> None:
    reply = request(server.url + "nope")
    assert reply.status == 404 and "nope" in reply.json()["error"]


def test_viewer_page_is_self_contained(server: StatusServer) -> None:
    reply = request(server.url)
    assert reply.status == 200 and reply.content_type.startswith("text/html")
    page = reply.body.decode()
    assert re.search(r"https?://", page) is None  # no external resources, no absolute URLs at all
    for path in ("/preview.png", "/tiles", "/status"):
        assert path in page
    assert "<script" in page and "<style" in page


@pytest.mark.parametrize("payload, expected", [({"action": "finalize", "series_id": "s-042"}, ("finalize", "s-042")),
                                               ({"action": "abort"}, ("abort", None)),
                                               ({"action": "abort", "series_id": None}, ("abort", None))])
def test_control_calls_provider_with_parsed_args(server: StatusServer, daemon: FakeDaemon, payload: dict[str, Any],
                                                 expected: tuple[str, str | None]) -> None:
    reply = post_json(server.url + "control", payload)
    assert reply.status == 200
    assert reply.json() == {"accepted": True, "message": f"{expected[0]} queued"}
    assert daemon.control_calls == [expected]


def test_control_refused_is_409(server: StatusServer, daemon: FakeDaemon) -> None:
    daemon.accept = False
    reply = post_json(server.url + "control", {"action": "finalize"})
    assert reply.status == 409 and reply.json() == {"accepted": False, "message": "finalize refused"}


@pytest.mark.parametrize("body, reason", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                          (b'{"action": "restart"}', "unknown action"),
                                          (b'{"action": "abort", "force": true}', "unknown keys"),
                                          (b'{"action": "abort", "series_id": 5}', "series_id"),
                                          (b" " * 4097, "at most 4096")])
def test_bad_control_requests_are_400_with_reason(server: StatusServer, daemon: FakeDaemon, body: bytes,
                                                  reason: str) -> None:
    reply = request(server.url + "control", body, {"Content-Type": "application/json"})
    assert reply.status == 400 and reason in reply.json()["error"]
    assert daemon.control_calls == []


def test_get_control_is_405(server: StatusServer) -> None:
    assert request(server.url + "control").status == 405


def test_provider_error_is_500_and_server_keeps_serving(server: StatusServer, daemon: FakeDaemon) -> None:
    daemon.fail_status = True
    reply = request(server.url + "status")
    assert reply.status == 500 and "status exploded" in reply.json()["error"]
    daemon.fail_status = False
    assert request(server.url + "status").status == 200
    assert request(server.url + "tiles").status == 200


def test_close_is_idempotent_and_frees_the_port(daemon: FakeDaemon) -> None:
    server = StatusServer(daemon.providers()).start()
    port = server.port
    assert request(server.url + "status").status == 200
    server.close()
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with StatusServer(daemon.providers(), "127.0.0.1", port) as again:  # the port can be bound again
        assert request(again.url + "status").status == 200


def test_close_without_start_releases_socket(daemon: FakeDaemon) -> None:
    server = StatusServer(daemon.providers())
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server.start()
