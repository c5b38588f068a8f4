"""Rank 0's internal sockets: ``ipc://`` in a private 0700 folder, never published (issue 12, security)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptylive.daemon.service.config import ConfigError, config_from_mapping
from ptylive.daemon.service.internal_sockets import (
    IPC_PATH_LIMIT,
    TCP_ANY_PORT,
    InternalSockets,
    check_reachable,
    host_identity,
)
from ptylive.daemon.service.process import ServeProcess
from tests.daemon.serve_harness import daemon_config, get_json


@pytest.fixture
def runtime_folder() -> Iterator[Path]:
    """A short folder standing in for systemd's ``$RUNTIME_DIRECTORY`` (pytest's tmp_path can be too long)."""
    folder = Path(tempfile.mkdtemp(prefix="rt-"))
    yield folder
    for leftover in sorted(folder.rglob("*"), reverse=True):
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    folder.rmdir()


@pytest.mark.chaos
def test_ipc_endpoints_are_in_a_private_folder_removed_by_close(runtime_folder: Path) -> None:
    sockets = InternalSockets("ipc", 2, environ={"RUNTIME_DIRECTORY": f"{runtime_folder}:/elsewhere"})
    assert sockets.folder is not None and sockets.folder.parent == runtime_folder
    assert stat.S_IMODE(sockets.folder.stat().st_mode) == 0o700
    assert sockets.worker(1) == f"ipc://{sockets.folder}/w1" and sockets.collector() == f"ipc://{sockets.folder}/c"
    sockets.close()
    sockets.close()
    assert not sockets.folder.exists()


def test_the_runtime_folder_falls_back_to_xdg_then_the_temporary_folder(runtime_folder: Path) -> None:
    xdg = InternalSockets("ipc", 1, environ={"XDG_RUNTIME_DIR": str(runtime_folder)})
    bare = InternalSockets("ipc", 1, environ={})
    try:
        assert xdg.folder is not None and xdg.folder.parent == runtime_folder
        assert bare.folder is not None and bare.folder.parent == Path(tempfile.gettempdir())
    finally:
        xdg.close()
        bare.close()


def test_a_socket_path_too_long_for_unix_sockets_is_refused_by_name(runtime_folder: Path) -> None:
    deep = runtime_folder / ("d" * (IPC_PATH_LIMIT - len(str(runtime_folder))))
    deep.mkdir()
    with pytest.raises(ValueError, match=rf"internal socket path '{deep}/ptylive-.*/w0' is \d+ bytes; a Unix "
                                         rf"socket takes at most {IPC_PATH_LIMIT}: set a shorter RUNTIME_DIRECTORY"):
        InternalSockets("ipc", 1, environ={"RUNTIME_DIRECTORY": str(deep)})
    assert list(deep.iterdir()) == []  # the folder it made is gone


def test_tcp_stays_available_on_request() -> None:
    sockets = InternalSockets("tcp", 2, environ={})
    assert sockets.folder is None and sockets.worker(0) == sockets.collector() == TCP_ANY_PORT


def test_a_worker_on_another_host_is_told_why_it_cannot_connect(tmp_path: Path) -> None:
    check_reachable(f"ipc://{tmp_path}/w0")
    check_reachable("tcp://127.0.0.1:5000")
    with pytest.raises(ValueError, match=r"not on this host .* internal_transport = \"tcp\""):
        check_reachable(f"ipc://{tmp_path}/gone/w0")
    here = host_identity()
    check_reachable("tcp://127.0.0.1:5000", here)
    check_reachable("tcp://10.213.0.1:5000", "another-boot/net:[1]")  # routable: ZeroMQ's to reach
    with pytest.raises(ValueError, match=r"'tcp://127.0.0.1:5000' is rank 0's loopback, and this worker runs on "
                                         r"another host .* set \[workers\] internal_interface"):
        check_reachable("tcp://127.0.0.1:5000", here.split("/")[0] + "/net:[1]")  # same kernel, other namespace


def test_tcp_binds_the_interface_or_address_it_is_given() -> None:
    by_address = InternalSockets("tcp", 2, environ={}, interface="127.0.0.1")
    by_name = InternalSockets("tcp", 1, environ={}, interface="lo")
    assert by_address.worker(1) == by_address.collector() == "tcp://127.0.0.1:0"
    assert by_name.worker(0) == "tcp://lo:0"  # ZeroMQ binds the interface's address; LAST_ENDPOINT names it


@pytest.mark.parametrize("interface, message", [
    ("no-such-if0", r"'no-such-if0' is not an interface of this host \(.*lo.*\) nor an IPv4 address"),
    ("0.0.0.0", "a wildcard binds every interface"), ("*", "a wildcard binds every interface"),
    ("::1", "IPv6 is not supported"), ("eth0/1", "neither an IPv4 address nor an interface name")])
def test_an_interface_that_cannot_be_bound_or_advertised_is_refused_by_name(interface: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InternalSockets("tcp", 1, environ={}, interface=interface)


def test_the_workers_section_checks_the_interface_where_it_is_read() -> None:
    config = config_from_mapping({"workers": {"internal_transport": "tcp", "internal_interface": "ib0"}})
    assert config.workers.internal_interface == "ib0"  # not checked against this host: rank 0's may differ
    with pytest.raises(ConfigError, match=r"'workers.internal_interface'; expected it only with "
                                          r"internal_transport = \"tcp\" \(got 'ipc'\)"):
        config_from_mapping({"workers": {"internal_interface": "ib0"}})
    with pytest.raises(ConfigError, match=r"'workers.internal_interface'; expected .*: a wildcard"):
        config_from_mapping({"workers": {"internal_transport": "tcp", "internal_interface": "0.0.0.0"}})
    with pytest.raises(ValueError, match="needs the 'tcp' transport"):
        InternalSockets("ipc", 1, environ={}, interface="lo")


@pytest.mark.chaos
def test_serve_binds_workers_in_the_runtime_folder_and_publishes_no_internal_endpoint(
        tmp_path: Path, runtime_folder: Path) -> None:
    (tmp_path / "results").mkdir()
    process = ServeProcess(daemon_config(tmp_path / "results", ranks=1), tmp_path,
                           env={"RUNTIME_DIRECTORY": str(runtime_folder)})
    with process:
        endpoints = process.start()  # ready: the worker said hello over the ipc socket
        [private] = runtime_folder.glob("ptylive-*")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert sorted(p.name for p in private.iterdir() if stat.S_ISSOCK(p.stat().st_mode)) == ["c", "w0"]
        status = get_json(endpoints["http"] + "status")
        text = json.dumps(status)
        assert "ipc://" not in text and str(private) not in text and "tcp://127.0.0.1" not in text.replace(
            endpoints["ingest"], "")  # the detector's endpoint is the only one left
        assert all("endpoint" not in worker for worker in status["ingest"]["workers"])
        assert status["threads"] == {"ingest": "running", "collector": "running", "http": "running"}
        assert status["ok"] is True
        assert set(endpoints) == {"ingest", "preview", "http", "pid"}
        assert stat.S_IMODE(os.stat(process.ready_file).st_mode) == 0o600
        assert process.stop() == 0
    assert not private.exists()
    assert not list(runtime_folder.iterdir())  # the launcher's rank-reports folder is gone too
