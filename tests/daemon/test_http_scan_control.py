"""``POST /control`` ``{"action": "scan", ...}``: acquisition software sets the next series' scan geometry (or a named
series') before arming, with the control token; bodies are checked before anything acts on them; finalize and
abort bodies mean what they meant."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from ptylive.daemon.http.requests import BadRequest, ControlRequest, parse_control
from ptylive.daemon.http.server import StatusServer
from ptylive.streaming.scan_geometry import ScanGeometry
from ptylive.streaming.scan_plan import DetectorCount, ScanPlan, ScanRequest
from tests.daemon.http_harness import FakeDaemon, post_json


def test_finalize_and_abort_bodies_parse_as_before() -> None:
    assert parse_control(b'{"action": "finalize", "series_id": "s-1"}') == ControlRequest("finalize", "s-1")
    assert parse_control(b'{"action": "abort"}') == ControlRequest("abort", None, None)
    with pytest.raises(BadRequest, match=r"unknown keys \['shape'\]"):
        parse_control(b'{"action": "finalize", "shape": [4, 4]}')


def test_a_scan_body_parses_into_a_request() -> None:
    request = parse_control(b'{"action": "scan", "shape": [16, 20], "step_A": [0.5, 0.4], "rotation_deg": 2.5, '
                            b'"snake": true, "flyback_frames": 2, "flyback_at": "start", "series_id": "17"}')
    assert request == ControlRequest("scan", "17", ScanRequest((16, 20), (0.5, 0.4), 2.5, True, 2, "start"))
    assert parse_control(b'{"action": "scan"}').scan == ScanRequest()  # everything from [scan]
    assert parse_control(b'{"action": "scan", "shape": [-1, 64], "step_A": 0.3}').scan == ScanRequest((-1, 64),
                                                                                                      (0.3, 0.3))


@pytest.mark.parametrize("body, message", [
    (b'{"action": "scan", "shape": [0, 4]}', "scan: each shape entry"),
    (b'{"action": "scan", "shape": "16x16"}', "scan: shape must be"),
    (b'{"action": "scan", "step_A": -1}', "scan: step_A must be > 0"),
    (b'{"action": "scan", "snake": "yes"}', "scan: snake must be true or false"),
    (b'{"action": "scan", "rows": 16}', r"unknown keys \['rows'\]"),
    (b'{"action": "scan", "series_id": 17}', "series_id must be a string"),
])
def test_bad_scan_bodies_are_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_control(body)


@pytest.fixture
def plan() -> ScanPlan:
    return ScanPlan(ScanRequest((16, 16), (0.5, 0.5)))


@pytest.fixture
def scan_server(fake_daemon: FakeDaemon, plan: ScanPlan) -> Iterator[StatusServer]:
    def scan(request: ScanRequest, series_id: str | None) -> tuple[bool, str]:
        return True, plan.request(request, series_id)

    providers = dataclasses.replace(fake_daemon.providers(control=True), scan=scan)
    with StatusServer(providers, "127.0.0.1", 0, fake_daemon.access()) as running:
        yield running


def test_a_scan_request_sets_the_next_series_geometry(scan_server: StatusServer, fake_daemon: FakeDaemon,
                                                     plan: ScanPlan) -> None:
    reply = post_json(scan_server.url + "control", {"action": "scan", "shape": [20, 16], "snake": True})
    assert reply.status == 200
    assert reply.json() == {"accepted": True, "message": "scan for the next series: shape 20×16, snake True"}
    decision = plan.resolve("7", DetectorCount(320, "nimages 1 × ntrigger 320"))
    assert decision.geometry == ScanGeometry(20, 16, (0.5, 0.5), snake=True) and decision.count_mismatch is None
    assert fake_daemon.control_calls == []  # the scan action is not a series control


def test_a_scan_request_needs_the_token_and_a_valid_body(scan_server: StatusServer, fake_daemon: FakeDaemon,
                                                        plan: ScanPlan) -> None:
    assert post_json(scan_server.url + "control", {"action": "scan", "shape": [4, 4]}, token=None).status == 401
    assert post_json(scan_server.url + "control", {"action": "scan", "shape": [4, 4]}, token="wrong" * 5).status == 401
    reply = post_json(scan_server.url + "control", {"action": "scan", "shape": [4, 0]})
    assert reply.status == 400 and "shape" in reply.json()["error"]
    assert plan.snapshot()["pending"] == {"next": None, "series": {}} and fake_daemon.refused == ["no_token",
                                                                                                  "wrong_token"]


def test_a_daemon_without_scan_requests_answers_409(server: StatusServer) -> None:
    reply = post_json(server.url + "control", {"action": "scan", "shape": [4, 4]})
    assert reply.status == 409 and reply.json() == {"accepted": False, "message": "this daemon takes no scan requests"}
