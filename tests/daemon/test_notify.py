"""sd_notify over a real AF_UNIX datagram socket; watchdog period and pings."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptylive.daemon.service.notify import Watchdog, notify, watchdog_period_s


def receive_all(receiver: socket.socket) -> list[str]:
    """Every datagram waiting on ``receiver``, decoded."""
    received = []
    receiver.setblocking(False)
    while True:
        try:
            received.append(receiver.recv(4096).decode())
        except BlockingIOError:
            return received


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in ``tmp_path`` (short name: AF_UNIX paths are limited to 107 bytes)."""
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        yield receiver, str(path)


def test_states_arrive_as_one_datagram_each(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, path = notify_socket
    env = {"NOTIFY_SOCKET": path}
    states = ["READY=1", "STATUS=reconstructing series 3\nWATCHDOG=1", "STOPPING=1"]
    assert all(notify(state, env) for state in states)
    assert receive_all(receiver) == states


def test_os_environ_is_used_by_default(notify_socket: tuple[socket.socket, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    receiver, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1")
    assert receive_all(receiver) == ["READY=1"]


def test_abstract_namespace_socket() -> None:
    name = f"ptylive-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert receive_all(receiver) == ["READY=1"]


def test_unset_notify_socket_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_vanished_socket_warns_and_returns_false(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.service.notify"):
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(path)}) is False
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@ptylive-nobody-listens-" + uuid.uuid4().hex}) is False
    assert [record.levelno for record in caplog.records] == [logging.WARNING, logging.WARNING]
    assert "WATCHDOG=1" in caplog.records[0].getMessage()


def test_closed_but_present_socket_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "closed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
    assert path.exists()
    assert notify("READY=1", {"NOTIFY_SOCKET": str(path)}) is False


@pytest.mark.parametrize("env, configured_s, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 0.0, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 0.0, 15.0),
    ({"WATCHDOG_USEC": "30000000"}, 4.0, 15.0),  # systemd's value wins over the configured one
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, 0.0, None),  # another process's
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, 4.0, 2.0),
    ({}, 0.0, None),
    ({}, 8.0, 4.0),
    ({"WATCHDOG_USEC": "soon"}, 6.0, 3.0),
    ({"WATCHDOG_USEC": "0"}, 0.0, None),
    ({"WATCHDOG_USEC": "-5"}, 0.0, None),
])
def test_watchdog_period(env: dict[str, str], configured_s: float, expected: float | None) -> None:
    assert watchdog_period_s(env, configured_s) == expected


def test_invalid_watchdog_usec_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.service.notify"):
        assert watchdog_period_s({"WATCHDOG_USEC": "soon"}) is None
    assert "WATCHDOG_USEC" in caplog.text and "'soon'" in caplog.text


def test_watchdog_period_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_period_s() == 1.0


class Recorder:
    """A fake ``send`` that records what it was given."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, state: str) -> bool:
        self.sent.append(state)
        return True


def test_watchdog_pings_at_the_period_and_not_more_often() -> None:
    recorder = Recorder()
    watchdog = Watchdog(5.0, healthy=lambda: True, send=recorder)
    pinged_at = [now for now in [100.0 + 0.5 * step for step in range(31)] if watchdog.maybe_ping(now)]
    assert pinged_at == [100.0, 105.0, 110.0, 115.0]
    assert recorder.sent == ["WATCHDOG=1"] * 4


def test_watchdog_withholds_pings_while_unhealthy() -> None:
    recorder = Recorder()
    health = {"ok": True}
    watchdog = Watchdog(1.0, healthy=lambda: health["ok"], send=recorder)
    assert watchdog.maybe_ping(0.0)
    health["ok"] = False
    assert not any(watchdog.maybe_ping(now) for now in (1.0, 2.0, 3.5))
    assert recorder.sent == ["WATCHDOG=1"]
    health["ok"] = True
    assert watchdog.maybe_ping(3.6)  # healthy again: the overdue ping goes out at once
    assert not watchdog.maybe_ping(4.0)
    assert recorder.sent == ["WATCHDOG=1"] * 2


def test_watchdog_asks_health_only_when_a_ping_is_due() -> None:
    calls: list[None] = []

    def healthy() -> bool:
        calls.append(None)
        return True

    watchdog = Watchdog(2.0, healthy=healthy, send=Recorder())
    for now in (0.0, 0.5, 1.0, 1.5, 2.0):
        watchdog.maybe_ping(now)
    assert len(calls) == 2


def test_watchdog_sends_through_notify_by_default(notify_socket: tuple[socket.socket, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    receiver, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Watchdog(1.0, healthy=lambda: True).maybe_ping(0.0)
    assert receive_all(receiver) == ["WATCHDOG=1"]


@pytest.mark.parametrize("period_s", [0.0, -1.0, float("nan"), float("inf")])
def test_watchdog_rejects_bad_periods(period_s: float) -> None:
    with pytest.raises(ValueError, match="period_s"):
        Watchdog(period_s, healthy=lambda: True)
