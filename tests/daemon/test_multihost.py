"""Ranks on several hosts: two network namespaces stand in for two nodes (issue 13, item 2).

The test makes its own namespaces, joined by one veth pair whose ends alone hold addresses
(:data:`SUBNET`); nothing else is routed, so no packet can reach any address outside them::

    namespace A: lo, veth 10.213.0.1/24  ──  namespace B: lo, veth 10.213.0.2/24
      mpiexec (hydra), rank 0                   rank 1 (…), started by hydra through
      the detector (netns_stream.py)            netns_launcher.sh = "ssh" into namespace B

mpiexec runs in A with a hostfile of the two addresses; hydra forks the proxy of its own host and
starts the other through ``HYDRA_LAUNCHER=ssh`` with ``HYDRA_LAUNCHER_EXEC`` = :data:`LAUNCHER`, whose
proxy connects back to mpiexec's control port on 10.213.0.1. ``UCX_TLS=tcp,self`` makes MPI itself go
over the veth too: by default UCX sees one machine (same boot id) and would use shared memory between
the namespaces. The one-host runs it is compared with are the same commands in the test's own namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ptylive.daemon.service.config import DaemonConfig, config_to_toml
from ptylive.daemon.service.process import ServeProcess
from ptylive.gpu.fft import PLANNER_ENV
from tests.conftest import read_result
from tests.daemon.serve_harness import daemon_config, read_final, wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("netns_launcher.sh")
SUBNET = "10.213.0"  # addresses only inside the test's namespaces
SERIES = "exact"
FINAL_ITERATIONS = 8
ARRAYS = ("object", "probe", "loss", "positions_px", "frames_used", "received")


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@dataclass(frozen=True)
class Namespaces:
    """Two network namespaces (``names``) and the address and veth end each one holds."""

    names: tuple[str, str]
    veths: tuple[str, str]
    addresses: tuple[str, str]

    def inside(self, which: int) -> list[str]:
        """The prefix that runs a command in namespace ``which``."""
        return ["ip", "netns", "exec", self.names[which]]

    def hydra_env(self, launches: Path) -> dict[str, str]:
        """What mpiexec needs to start a host's proxy in its namespace (each start noted in ``launches``), MPI's
        traffic on the veth."""
        hosts = ",".join(f"{address}={name}" for address, name in zip(self.addresses, self.names, strict=True))
        return {**os.environ, "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(LAUNCHER),
                "PTYLIVE_TEST_NETNS": hosts, "PTYLIVE_TEST_NETNS_LOG": str(launches), "UCX_TLS": "tcp,self"}

    def hostfile(self, folder: Path) -> Path:
        path = folder / "hosts"
        path.write_text("".join(f"{address}:1\n" for address in self.addresses))
        return path

    def holds(self, which: int, pid: int) -> bool:
        """Whether process ``pid`` runs in namespace ``which``."""
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{self.names[which]}").st_ino


def _remove(names: list[str]) -> None:
    """Kill what still runs in the test's namespaces (only the test started anything there), then delete them."""
    for name in names:
        for pid in ip("netns", "pids", name).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("netns", "del", name)  # takes its veth end along, and with it the pair


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be created: ip(8) (iproute2) is not installed")
    tag = uuid.uuid4().hex[:6]
    names, veths = (f"ptylive-{tag}-a", f"ptylive-{tag}-b"), (f"ptyv{tag}a", f"ptyv{tag}b")
    created: list[str] = []
    try:
        for name in names:
            done = ip("netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"network namespaces cannot be created here (ip netns add: {done.stderr.strip()}); "
                            "the test needs root or CAP_SYS_ADMIN and CAP_NET_ADMIN")
            created.append(name)
        steps: list[tuple[str, ...]] = [("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])]
        addresses = (f"{SUBNET}.1", f"{SUBNET}.2")
        for name, veth, address in zip(names, veths, addresses, strict=True):
            steps += [("link", "set", veth, "netns", name), ("-n", name, "addr", "add", f"{address}/24", "dev", veth),
                      ("-n", name, "link", "set", veth, "up"), ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                pytest.skip(f"a veth pair between network namespaces cannot be made here (ip {' '.join(step)}: "
                            f"{done.stderr.strip()})")
        yield Namespaces(names, veths, addresses)
    finally:
        _remove(created)


def serve_config(folder: Path, **workers: str) -> DaemonConfig:
    """One worker, so the result does not depend on the async exchange's timing; ``workers`` fields replaced."""
    (folder / "results").mkdir(parents=True)
    config = daemon_config(folder / "results", ranks=1, final_iterations=FINAL_ITERATIONS)
    return dataclasses.replace(config, workers=dataclasses.replace(config.workers, **workers))


def stream_held_series(endpoint: str, scan: Path, prefix: list[str]) -> None:
    """netns_stream.py (behind ``prefix``: in a namespace) sends the whole series before the worker starts it."""
    done = subprocess.run([*prefix, sys.executable, "-m", "tests.daemon.netns_stream", endpoint, str(scan), SERIES],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def final_arrays(path: Path) -> dict[str, np.ndarray]:
    result = read_final(path)
    assert result["attrs"]["status"] == "complete" and result["attrs"]["iterations"] == FINAL_ITERATIONS
    return {name: result[name] for name in ARRAYS}


def one_host_serve(folder: Path, scan: Path) -> dict[str, np.ndarray]:
    """The reference: the default one-host daemon (ipc:// internal sockets), here."""
    with ServeProcess(serve_config(folder), folder) as process:
        stream_held_series(process.start()["ingest"], scan, [])
        final = wait_for(lambda: next((folder / "results").glob(f"{SERIES}.h5"), None), 60, "the final file")
        assert process.stop() == 0, process.log_tail()
    return final_arrays(final)


class NamespacedServe:
    """``ptylive serve --hostfile`` started in namespace A (so is its mpiexec); stopped with SIGTERM."""

    def __init__(self, config: DaemonConfig, folder: Path, spaces: Namespaces) -> None:
        self.folder, self.ready = folder, folder / "ready.json"
        config = dataclasses.replace(config, service=dataclasses.replace(config.service, ready_file=str(self.ready)))
        (folder / "ptylive.toml").write_text(config_to_toml(config))
        command = [*spaces.inside(0), sys.executable, "-m", "ptylive.daemon.cli.main", "-v", "serve",
                   "--config", str(folder / "ptylive.toml"), "--hostfile", str(spaces.hostfile(folder))]
        self.log = folder / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=spaces.hydra_env(folder / "launches"), stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60) -> dict[str, object]:
        wait_for(lambda: self.ready.exists() or self.process.poll() is not None, timeout_s, "the ready file")
        assert self.ready.exists(), f"serve exited with {self.process.returncode}:\n{self.log.read_text()}"
        return dict(json.loads(self.ready.read_text()))

    def stop(self, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def worker_pids(spaces: Namespaces) -> list[int]:
    """The ranks of ptylive running in namespace B (their guards left out)."""
    pids = [int(pid) for pid in ip("netns", "pids", spaces.names[1]).stdout.split()]
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids}
    return [pid for pid, argv in commands.items()
            if b"ptylive.daemon.cli.main" in argv and b"ptylive.daemon.cli.rank_guard" not in argv]


def test_a_series_streamed_to_rank_0_in_one_namespace_reconstructs_on_a_worker_in_another_exactly_as_on_one_host(
        namespaces: Namespaces, small_scan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bit for bit across processes needs the same FFT plans in both: FFTW_MEASURE times its candidates, and on
    # a loaded machine the two runs once chose differently (1.8e-4 apart after the iterations).
    monkeypatch.setenv(PLANNER_ENV, "FFTW_ESTIMATE")
    reference = one_host_serve(tmp_path / "one-host", small_scan)

    folder = tmp_path / "two-hosts"
    config = serve_config(folder, internal_transport="tcp", internal_interface=namespaces.veths[0])
    daemon = NamespacedServe(config, folder, namespaces)
    try:
        endpoints = daemon.wait_ready()  # the worker said hello, over the veth
        assert namespaces.holds(0, int(endpoints["pid"]))  # type: ignore[call-overload]
        [worker] = worker_pids(namespaces)
        assert namespaces.holds(1, worker)
        assert f"{PLANNER_ENV}=FFTW_ESTIMATE".encode() in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        assert (folder / "launches").read_text() == f"{namespaces.addresses[1]} {namespaces.names[1]}\n"
        connected = subprocess.run([*namespaces.inside(1), "ss", "-Htn", "state", "established"],
                                   capture_output=True, text=True, timeout=10).stdout
        assert f"{namespaces.addresses[0]}:" in connected, connected  # the worker's sockets go to rank 0's veth
        stream_held_series(str(endpoints["ingest"]), small_scan, namespaces.inside(0))
        final = wait_for(lambda: next((folder / "results").glob(f"{SERIES}.h5"), None), 60, "the final file")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log.read_text()
    across = final_arrays(final)
    for name in ARRAYS:
        np.testing.assert_array_equal(across[name], reference[name], err_msg=name)


def test_a_worker_in_another_namespace_given_rank_0s_loopback_stops_and_says_why(
        namespaces: Namespaces, tmp_path: Path) -> None:
    folder = tmp_path / "loopback"
    daemon = NamespacedServe(serve_config(folder, internal_transport="tcp"), folder, namespaces)
    try:
        code = daemon.process.wait(60)
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert code != 0 and not daemon.ready.exists(), log
    assert "is rank 0's loopback, and this worker runs on another host (or network namespace)" in log, log


def test_the_offline_job_from_a_hostfile_across_namespaces_matches_one_host(
        namespaces: Namespaces, small_scan: Path, tmp_path: Path) -> None:
    def reconstruct(out: Path, prefix: list[str], *extra: str, env: dict[str, str] | None = None) -> None:
        done = subprocess.run([*prefix, sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct",
                               str(small_scan), "--ranks", "2", "--mode", "sync", "--iterations", "3",
                               "--out", str(out), "--quiet", *extra], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr

    reconstruct(tmp_path / "one-host.h5", [])
    reconstruct(tmp_path / "two-hosts.h5", namespaces.inside(0), "--hostfile", str(namespaces.hostfile(tmp_path)),
                env=namespaces.hydra_env(tmp_path / "launches"))
    assert (tmp_path / "launches").read_text() == f"{namespaces.addresses[1]} {namespaces.names[1]}\n"  # rank 1 in B
    one, two = read_result(tmp_path / "one-host.h5"), read_result(tmp_path / "two-hosts.h5")
    assert two["attrs"]["n_ranks"] == 2
    for name in ("object", "probe", "loss", "positions_px"):
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
