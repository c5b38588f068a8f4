"""The multi-rank launcher: its mpiexec and ranks end with it, whatever signal ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from ptylive.daemon.cli.launcher import find_mpiexec, mpiexec_command

pytestmark = pytest.mark.mpi


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's children lists)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
@pytest.mark.chaos
def test_a_launcher_killed_with_sigkill_takes_mpiexec_and_its_ranks_along(small_scan: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct", str(small_scan), "--ranks", "2",
               "--iterations", "100000", "--out", str(tmp_path / "r.h5"), "--quiet"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(below := descendants(launcher.pid)) < 3:  # mpiexec, its proxy and ranks
            assert time.monotonic() < deadline, f"the ranks did not start: {below}"
            time.sleep(0.2)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 30
        while left := {pid for pid in below if alive(pid)}:
            assert time.monotonic() < deadline, f"still running 30 s after the launcher died: {left}"
            time.sleep(0.2)
    finally:  # whatever happened, nothing of this test may keep running (orphans are no longer below the launcher)
        if launcher.poll() is None:
            launcher.kill()
        for pid in below | descendants(launcher.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.chaos
def test_sighup_to_the_launcher_stops_every_rank_as_sigterm_and_the_result_is_written(small_scan: Path,
                                                                                     tmp_path: Path) -> None:
    """docs/daemon.md: SIGHUP (a closed terminal, ``systemctl kill -s HUP``) means SIGTERM. The launcher forwards
    it to mpiexec as SIGTERM, every rank stops and the result so far is written (``stop_signal`` SIGTERM: what
    the ranks received), exit 0, nothing left running. Without the forwarding, SIGHUP's default action ends the
    launcher at once (exit -1, a failed unit) and its ranks are left to stop on their own, unwaited for (measured:
    the parent-death signal still had them write the file)."""
    out = tmp_path / "r.h5"
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct", str(small_scan), "--ranks", "2",
               "--iterations", "100000", "--out", str(out)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    below: set[int] = set()
    try:
        assert launcher.stderr is not None
        lines = []
        while not (line := launcher.stderr.readline()).startswith("iteration"):  # the ranks' handlers are in
            assert line, f"the run ended before its first iteration: {''.join(lines)}"
            lines.append(line)
        below = descendants(launcher.pid)
        began = time.monotonic()
        os.kill(launcher.pid, signal.SIGHUP)
        code = launcher.wait(60)
        elapsed = time.monotonic() - began
        rest = launcher.stderr.read()
        assert code == 0, (code, rest)
        with h5py.File(out) as f:
            assert f.attrs["status"] == "interrupted" and f.attrs["stop_signal"] == "SIGTERM", dict(f.attrs)
        assert "interrupted (SIGTERM)" in rest and elapsed < 30, (elapsed, rest)
        assert not {pid for pid in below if alive(pid)}, "ranks left running after the launcher exited"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in below | descendants(launcher.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ranks_start_the_installed_package_whatever_folder_they_start_in(small_scan: Path, tmp_path: Path) -> None:
    """A working directory holding a ``ptylive/`` folder was reported to shadow the package in every rank
    (``python -m`` puts the working directory first on sys.path): "module 'ptylive' has no attribute
    '__version__'". With this checkout's editable install the failure did not reproduce without ``-P``
    either, so this guards the behaviour rather than demonstrating the fix."""
    (tmp_path / "ptylive").mkdir()  # a folder of results, say: a namespace package to ``python -m``
    script = Path(sys.executable).with_name("ptylive")
    done = subprocess.run([str(script), "reconstruct", str(small_scan), "--ranks", "2", "--iterations", "1",
                           "--out", str(tmp_path / "r.h5"), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.h5").is_file()


def test_a_hostfile_goes_to_mpiexec_as_f_and_one_that_names_no_host_is_refused(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# rank 0 first\nnode1:1\nnode2:4\n")
    command = mpiexec_command(5, ["serve"], "ptylive.daemon.cli.main", hosts)
    assert command[:5] == [find_mpiexec(), "-f", str(hosts.resolve()), "-n", "5"]
    assert command[-3:] == ["-m", "ptylive.daemon.cli.main", "serve"]
    assert "-f" not in mpiexec_command(2, [], "m")
    hosts.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match=r"hostfile .*hosts names no host"):
        mpiexec_command(2, [], "m", hosts)
    with pytest.raises(ValueError, match=r"hostfile .*missing: cannot be read"):
        mpiexec_command(2, [], "m", tmp_path / "missing")
