"""Progress of long work on stderr: ``simulate`` (positions, rate) and ``reconstruct`` (time left); ``--quiet``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ptylive.daemon.cli.offline import progress_printer
from tests.daemon.cli_harness import InProcessCli


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> InProcessCli:
    return InProcessCli(capfd, monkeypatch)


def test_the_time_left_is_the_mean_time_per_iteration_times_the_iterations_left(
        capsys: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    show = progress_printer(10, started=98.0, clock=lambda: now[0])
    show(0, 1.5, 2.0)  # 1 of 10 after 2 s
    now[0] = 118.0
    show(9, 1.0, 2.0)  # 10 of 10 after 20 s
    first, last = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"iteration +1/10  loss 1\.500000e\+00 +2\.000 s/it  elapsed +2\.0 s  remaining +18\.0 s",
                        first), first
    assert last.endswith("elapsed    20.0 s  remaining     0.0 s"), last


def test_reconstruct_prints_each_iteration_with_the_time_left(cli: InProcessCli, small_scan: Path,
                                                               tmp_path: Path) -> None:
    result = cli("reconstruct", str(small_scan), "--iterations", "2", "-o", str(tmp_path / "r.h5"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("iteration ")]
    assert len(lines) == 2 and all(re.search(r"remaining +\d+\.\d s$", line) for line in lines), result.stderr
    quiet = cli("reconstruct", str(small_scan), "--iterations", "1", "-o", str(tmp_path / "q.h5"), "--quiet")
    assert quiet.returncode == 0 and "iteration" not in quiet.stderr


def test_simulate_reports_positions_and_rate_unless_quiet(cli: InProcessCli, tmp_path: Path) -> None:
    small = ("--detector-px", "16", "--scan", "3", "4", "--slices", "1")
    result = cli("simulate", str(tmp_path / "s.h5"), *small)
    assert result.returncode == 0, result.stderr
    assert "simulating 12 positions: 1 slices, window 16 px" in result.stderr
    assert re.search(r"simulated 12/12 positions in \d+\.\d s \([\d,.]+ positions/s\)", result.stderr), result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 's.h5'}: 12 positions")
    quiet = cli("simulate", str(tmp_path / "q.h5"), *small, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("wrote ")
