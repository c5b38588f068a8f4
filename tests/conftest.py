"""Shared fixtures: small simulated scans written once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.cli.main import main as cli_main


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``ptylive ARGS`` in a fresh interpreter (multi-rank runs start mpiexec themselves)."""
    return subprocess.run([sys.executable, "-m", "ptylive.daemon.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 slices, 32-px window, 14×10 positions 2 px apart: object 59×51 px (non-square).

    At 4 ranks a tile is about 30×26 px, smaller than the window.
    """
    path = tmp_path_factory.mktemp("scans") / "small.h5"
    assert cli_main(["simulate", str(path), "--detector-px", "32", "--detector-pixel-mrad", "3.0",
                     "--slices", "3", "--scan", "14", "10", "--step-px", "2"]) == 0
    return path


@pytest.fixture(scope="session")
def default_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ptylive simulate`` defaults, noise-free."""
    path = tmp_path_factory.mktemp("scans") / "default.h5"
    assert cli_main(["simulate", str(path)]) == 0
    return path


def read_result(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {name: f[name][...] for name in ("object", "probe", "loss", "positions_px", "positions_nominal_px")
               if name in f}
        out.update({f"ranks/{k}": f["ranks"][k][...] for k in f["ranks"]})
        out["attrs"] = dict(f.attrs)
    return out
