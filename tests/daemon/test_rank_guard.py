"""The rank guard: it names the rank that died, ends as the rank ended, forwards signals, and the launcher
logs the first death and tells systemd it is stopping."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptylive.daemon.cli import launcher
from ptylive.daemon.cli.rank_guard import REPORTS_ENV, Death, read_reports
from ptylive.daemon.service.roster import process_alive

GUARD = [sys.executable, "-P", "-m", "ptylive.daemon.cli.rank_guard"]


def guarded(code: str, reports: Path, rank: str = "3", **kwargs: object) -> subprocess.Popen[str]:
    """``python -c code`` as MPI rank ``rank`` under a guard that reports to ``reports``."""
    env = {**os.environ, "PMI_RANK": rank, REPORTS_ENV: str(reports)}
    return subprocess.Popen([*GUARD, sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM])
def test_a_rank_killed_by_a_signal_is_named_with_its_own_pid_and_the_guard_ends_the_same_way(
        tmp_path: Path, signum: signal.Signals) -> None:
    process = guarded(f"import os; print(os.getpid(), flush=True); os.kill(os.getpid(), {int(signum)})", tmp_path)
    out, err = process.communicate(timeout=60)
    assert process.returncode == -signum  # what mpiexec would have seen without the guard
    [death] = read_reports(tmp_path)
    assert (death.rank, death.pid, death.signal_number, death.exit_code) == (3, int(out), signum, 0)
    assert death.host == socket.gethostname() and abs(death.time_unix_s - time.time()) < 60
    assert f"ptylive rank guard: MPI rank 3 (pid {int(out)} on {death.host}) was killed by {signum.name}" in err
    assert not list(tmp_path.glob("*.partial"))


def test_an_exit_code_is_passed_through_and_a_clean_exit_is_not_reported(tmp_path: Path) -> None:
    failed = guarded("import sys; sys.exit(3)", tmp_path, rank="1")
    _, err = failed.communicate(timeout=60)
    assert failed.returncode == 3 and "MPI rank 1" in err and "exited with code 3" in err
    assert [(d.rank, d.exit_code, d.signal_number) for d in read_reports(tmp_path)] == [(1, 3, 0)]
    clean = guarded("print('fine')", tmp_path / "none")
    out, err = clean.communicate(timeout=60)
    assert clean.returncode == 0 and out == "fine\n" and err == ""


def test_without_a_report_folder_here_the_line_on_stderr_still_names_the_rank(tmp_path: Path) -> None:
    process = guarded("import sys; sys.exit(4)", tmp_path / "on-another-host")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 4 and "MPI rank 3" in err and not (tmp_path / "on-another-host").exists()


def test_sigterm_to_the_guard_reaches_the_rank_which_stops_in_its_own_way(tmp_path: Path) -> None:
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    process = guarded(code, tmp_path)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == 0 and read_reports(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_guard_killed_with_sigkill_takes_its_rank_along(tmp_path: Path) -> None:
    process = guarded("import os, time; print(os.getpid(), flush=True); time.sleep(120)", tmp_path)
    assert process.stdout is not None
    rank = int(process.stdout.readline())
    process.kill()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while process_alive(rank):
        assert time.monotonic() < deadline, "the rank outlived its guard"
        time.sleep(0.05)


def test_reports_are_read_earliest_first_and_junk_is_skipped(tmp_path: Path) -> None:
    late = Death(rank=0, pid=10, signal_number=9, exit_code=0, host="h", time_unix_s=2.0)
    early = Death(rank=2, pid=12, signal_number=9, exit_code=0, host="h", time_unix_s=1.0)
    (tmp_path / "rank-0.json").write_text(late.to_json())
    (tmp_path / "rank-2.json").write_text(early.to_json())
    (tmp_path / "rank-5.json").write_text("{not json")
    assert read_reports(tmp_path) == [early, late]
    assert early.describe() == "MPI rank 2 (pid 12 on h) was killed by SIGKILL"


def test_the_launcher_logs_the_first_death_as_the_cause_and_sends_stopping(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two guarded 'ranks' stand in for mpiexec: rank 2 is killed first, rank 0 a moment later (as MPICH's clean-up
    does); the launcher's watch names rank 2 as the cause, rank 0 after it, and sends STOPPING=1 once."""
    reports = tmp_path / "reports"
    reports.mkdir()
    guard = " ".join(GUARD)
    script = (f"{guard} {sys.executable} -c 'import os; os.kill(os.getpid(), 9)' & sleep 0.3; "
              f"PMI_RANK=0 {guard} {sys.executable} -c 'import sys; sys.exit(1)'; wait; exit 7")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "n.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        job = subprocess.Popen(["sh", "-c", script], env={**os.environ, "PMI_RANK": "2", REPORTS_ENV: str(reports)},
                               stderr=subprocess.DEVNULL)
        with caplog.at_level(logging.WARNING, logger=launcher.__name__):
            assert launcher._wait_watching(job, reports, poll_s=0.05) == 7
        systemd.setblocking(False)
        states = [systemd.recv(4096).decode()]
        with pytest.raises(BlockingIOError):
            systemd.recv(4096)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == launcher.__name__]
    assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines
    assert lines[0][1].startswith("MPI rank 2 (pid ") and lines[0][1].endswith("was killed by SIGKILL; mpiexec ends "
                                                                              "the job")
    assert lines[1][1].startswith("then MPI rank 0 (pid ") and lines[1][1].endswith("exited with code 1")
    assert states[0].startswith("STOPPING=1\nSTATUS=MPI rank 2 (pid ")
