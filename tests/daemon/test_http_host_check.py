"""Every route checks ``Host`` (DNS rebinding), not only ``POST /control``.

A page of ``evil.example`` that re-resolves its name to 127.0.0.1 reads the daemon as its own origin; the
browser still sends ``Host: evil.example``. Before this check, ``GET /status``, previews, event streams and
result files answered it.
"""

from __future__ import annotations

import dataclasses
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ptylive.daemon.http.access import HostNames
from ptylive.daemon.http.server import StatusServer
from ptylive.daemon.service.metrics import DaemonMetrics
from tests.daemon.http_harness import FakeDaemon, request
from tests.daemon.test_metrics import snapshot

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md

ROUTES = ["/", "/viewer.js", "/status", "/tiles", "/preview.png", "/metrics", "/files/x.h5", "/events", "/nowhere"]


@pytest.fixture
def plain(fake_daemon: FakeDaemon, tmp_path: Path) -> Iterator[StatusServer]:
    """Control off (no token), as the default config runs."""
    fake_daemon.output_folder = tmp_path
    (tmp_path / "x.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    fake_daemon.png = b"\x89PNG"
    with StatusServer(fake_daemon.providers(), "127.0.0.1", 0, allowed_hosts=("ptylive.example.org",)) as running:
        yield running


def get(server: StatusServer, path: str, host: str | None) -> tuple[int, bytes]:
    """GET with exactly the given Host (None: no Host header at all); the status and the first bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read(64)
    finally:
        connection.close()


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost@evil.example", "localhost.evil.example"])
def test_every_get_route_refuses_a_foreign_host(plain: StatusServer, fake_daemon: FakeDaemon, path: str,
                                                host: str) -> None:
    status, body = get(plain, path, host.format(port=plain.port))
    assert status == 403 and b"Host" in body, (status, body)
    assert fake_daemon.refused == ["foreign_host"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}",
                                  "ptylive.example.org:{port}", "ptylive.example.org", "10.1.2.3:{port}", None])
def test_own_names_addresses_and_no_host_are_served(plain: StatusServer, fake_daemon: FakeDaemon,
                                                    host: str | None) -> None:
    # An address cannot be a rebound name; a request without Host is no browser's (HTTP/1.0 health checks).
    for path in ("/status", "/files/x.h5", "/preview.png"):
        status, _ = get(plain, path, None if host is None else host.format(port=plain.port))
        assert status == 200, (path, host, status)
    assert fake_daemon.refused == []


def test_two_host_headers_are_refused(plain: StatusServer, fake_daemon: FakeDaemon) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=10)
    try:
        connection.putrequest("GET", "/status", skip_host=True)
        connection.putheader("Host", "127.0.0.1")
        connection.putheader("Host", "evil.example")
        connection.endheaders()
        assert connection.getresponse().status == 403
    finally:
        connection.close()
    assert fake_daemon.refused == ["foreign_host"]


def test_post_elsewhere_is_checked_too(plain: StatusServer, fake_daemon: FakeDaemon) -> None:
    assert request(plain.url + "status", b"{}", {"Host": "evil.example"}).status == 403
    assert fake_daemon.refused == ["foreign_host"]


def test_allowed_hosts_come_from_control_access_when_not_given(fake_daemon: FakeDaemon) -> None:
    access = fake_daemon.access(("ptylive.example.org",))
    with StatusServer(fake_daemon.providers(control=True), "127.0.0.1", 0, access) as server:
        assert get(server, "/status", "ptylive.example.org")[0] == 200
        assert get(server, "/status", "other.example.org")[0] == 403


def test_a_server_bound_to_a_name_accepts_that_name() -> None:
    assert HostNames().refusal(_headers("ptylive-box:8080"), "PTYLIVE-BOX") is None
    assert HostNames().refusal(_headers("other-box:8080"), "ptylive-box") is not None


def test_refused_gets_are_counted_in_the_metric(fake_daemon: FakeDaemon) -> None:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, snapshot)
    providers = dataclasses.replace(fake_daemon.providers(), on_refused=metrics.count_refused)
    with StatusServer(providers, "127.0.0.1", 0) as server:
        assert get(server, "/status", "evil.example")[0] == 403
    assert registry.get_sample_value("ptylive_http_refused_total", {"reason": "foreign_host"}) == 1


def _headers(host: str) -> http.client.HTTPMessage:
    message = http.client.HTTPMessage()
    message["Host"] = host
    return message
