"""The README's main job (``ptylive demo``) and ``ptylive serve``'s start-up errors, through the CLI.

The demo runs in a real process (it starts ``mpiexec``); the start-up errors come before any rank starts
and run in this interpreter (:mod:`tests.daemon.cli_harness`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

from ptylive.daemon.cli.demo import DemoOptions
from tests.conftest import run_cli
from tests.daemon.cli_harness import InProcessCli


@pytest.mark.mpi
def test_demo_streams_reconstructs_and_prints_the_final_file(tmp_path: Path) -> None:
    done = run_cli("demo", "--out", str(tmp_path / "demo"), "--scan", "12", "12", "--rate", "200",
                   "--final-iterations", "10", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "viewer: http://127.0.0.1:" in done.stderr and "first preview after" in done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == (tmp_path / "demo" / "results").resolve()
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["frames_received"] == 144
        assert f["received"][...].all()
    assert "phase correlation with the simulated truth" in done.stderr


@pytest.mark.parametrize("text, message", [
    ("[ingest]\nendpont = 'tcp://127.0.0.1:0'\n", "unknown key 'ingest.endpont'"),
    ("[workers]\nranks = 0\n", "'workers.ranks'"),
    ("[output]\nfolder = '/nonexistent/ptylive'\n", "output folder /nonexistent/ptylive does not exist"),
    ("[workers\n", "invalid TOML"),
])
def test_serve_rejects_a_bad_config_with_one_line(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "ptylive.toml"
    config.write_text(text)
    done = InProcessCli(capfd, monkeypatch)("serve", "--config", str(config))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and done.stdout == ""


def test_the_demo_default_output_folder_is_ignored_by_git() -> None:
    """``ptylive demo`` from a checkout leaves its config, log and results out of ``git status``."""
    root = Path(__file__).resolve().parents[2]
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("ptylive.toml", "serve.log", "results/demo-1.h5"):
        path = str(DemoOptions().out / name)
        done = subprocess.run([git, "check-ignore", "-q", path], cwd=root, capture_output=True, timeout=30)
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"
