"""Peer codes of ``ptylive bench quality``: their own virtual environments and their adapter runs.

Each peer is installed on first use into ``~/.cache/ptylive-peers/<name>`` (``python3 -m venv`` and pip
from the package registry), never into ptylive's environment and never in CI. Its adapter
(``tools/peers/<name>_run.py``, numpy and h5py plus the peer) is run there as a subprocess on the same
scan file as ptylive; the contract between the two is in ``tools/peers/_common.py``.

A peer that cannot be installed or run is reported with the reason (the last lines of pip's or the
adapter's output), and the benchmark goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PEERS_HOME = Path.home() / ".cache" / "ptylive-peers"
ADAPTERS = Path(__file__).resolve().parent / "peers"
INSTALL_TIMEOUT_S = 3600.0
RUN_TIMEOUT_S = 7200.0
READY_MARK = ".ptylive-peer-ready"


def _ptyrad_requirements() -> list[str]:
    """PtyRAD needs torch and torchvision; PyPI's torchvision must match the torch build exactly.

    On x86_64, torch 2.14.1 with torchvision 0.29.1 import together (a CPU torch 2.13.0 beside PyPI's
    torchvision fails: "operator torchvision::nms does not exist"); on aarch64, 2.9.1 with 0.24.1.
    PtyRAD 1.0.0 needs Python >= 3.12 (its f-strings nest quotes), where PyPI's torch is the CUDA
    build (several GB; it runs on the CPU).
    """
    if platform.machine() == "aarch64":
        return ["torch==2.9.1", "torchvision==0.24.1", "ptyrad", "h5py"]
    return ["torch==2.14.1", "torchvision==0.29.1", "ptyrad", "h5py"]


@dataclass(frozen=True)
class Peer:
    """A peer code: its name (venv folder and adapter ``<name>_run.py``), packages and import check."""

    name: str
    label: str
    requirements: tuple[str, ...]
    import_check: str
    min_python: tuple[int, int] = (3, 11)

    @property
    def venv(self) -> Path:
        return PEERS_HOME / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def adapter(self) -> Path:
        return ADAPTERS / f"{self.name}_run.py"


PEERS = {
    "py4dstem": Peer("py4dstem", "py4DSTEM", ("py4DSTEM", "h5py"), "import py4DSTEM, h5py"),
    "ptyrad": Peer("ptyrad", "PtyRAD", tuple(_ptyrad_requirements()),
                   "import torch, torchvision.transforms.functional, ptyrad.solver, h5py", (3, 12)),
}


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or run; the message says why."""


def _run(command: list[str], timeout_s: float, cwd: Path | None = None) -> tuple[int | None, str]:
    """Run a command in its own process group: (exit status, or None if killed at the timeout; its output)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        out = proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, f"killed after {timeout_s:.0f} s: " + proc.communicate()[0]
    return proc.returncode, out


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return " | ".join(kept[-lines:])


def find_python(minimum: tuple[int, int]) -> str:
    """A Python interpreter of at least ``minimum`` that runs: python3, python3.X on PATH, then pyenv's.

    Raises
    ------
    PeerUnavailable
        When none is found.
    """
    candidates = ["python3", *(f"python3.{minor}" for minor in range(minimum[1], 15))]
    candidates += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.*/bin/python3"))
    for candidate in candidates:
        if shutil.which(candidate) is None:
            continue
        rc, out = _run([candidate, "-c", "import sys; print(*sys.version_info[:2])"], 60)
        if rc == 0 and tuple(int(x) for x in out.split()[:2]) >= minimum:
            return candidate
    raise PeerUnavailable(f"no Python >= {minimum[0]}.{minimum[1]} found (tried {', '.join(candidates)})")


def ensure_installed(peer: Peer) -> None:
    """Create the peer's venv and pip-install it unless a previous install was checked ready.

    Raises
    ------
    PeerUnavailable
        With pip's (or the import check's) last lines.
    """
    if (peer.venv / READY_MARK).is_file():
        return
    if not peer.python.is_file():
        logger.warning("creating %s for %s", peer.venv, peer.label)
        rc, out = _run([find_python(peer.min_python), "-m", "venv", str(peer.venv)], 300)
        if rc != 0:
            raise PeerUnavailable(f"python3 -m venv {peer.venv} failed ({rc}): {_tail(out)}")
    logger.warning("installing %s into %s: pip install %s", peer.label, peer.venv, " ".join(peer.requirements))
    rc, out = _run([str(peer.python), "-m", "pip", "install", "-q", *peer.requirements], INSTALL_TIMEOUT_S)
    if rc != 0:
        raise PeerUnavailable(f"pip install {' '.join(peer.requirements)} failed ({rc}): {_tail(out)}")
    rc, out = _run([str(peer.python), "-c", peer.import_check], 600)
    if rc != 0:
        raise PeerUnavailable(f"installed, but '{peer.import_check}' fails: {_tail(out, 3)}")
    (peer.venv / READY_MARK).write_text(" ".join(peer.requirements) + "\n")


@dataclass(frozen=True)
class PeerRequest:
    """One adapter run: the scan, K, T, the slices and the object grid, and the probe file if any."""

    scan: Path
    iterations: int
    budget_s: float
    slices: int
    slice_thickness_A: float
    object_shape: tuple[int, int]
    probe: Path | None


def run_peer(peer: Peer, request: PeerRequest, out: Path) -> dict[str, Any]:
    """Run the peer's adapter; return its ``summary.json`` plus the arrays it wrote.

    Returns
    -------
    dict
        ``summary`` (the adapter's JSON), ``wall_s`` (the whole adapter run: imports, set-up, warm-up,
        every iteration) and ``phase_iterations``, ``positions_iterations``,
        ``phase_time``, ``positions_time`` ((S, H, W) and (n, 2) arrays; the last two None when not
        even one iteration fitted in the budget).

    Raises
    ------
    PeerUnavailable
        When the adapter fails or times out (with its last lines of output).
    """
    command = [str(peer.python), str(peer.adapter), "--scan", str(request.scan), "--out", str(out),
               "--iterations", str(request.iterations), "--time-budget-s", f"{request.budget_s:.6f}",
               "--slices", str(request.slices), "--slice-thickness-A", repr(request.slice_thickness_A),
               "--object-shape", *map(str, request.object_shape)]
    if request.probe is not None:
        command += ["--probe", str(request.probe)]
    logger.warning("running %s on %s (%d iterations, budget %.1f s)", peer.label, request.scan.name,
                   request.iterations, request.budget_s)
    start = time.perf_counter()
    rc, text = _run(command, RUN_TIMEOUT_S, cwd=out.parent)
    wall_s = time.perf_counter() - start
    if rc != 0 or not (out / "summary.json").is_file():
        raise PeerUnavailable(f"{peer.adapter.name} failed ({rc}): {_tail(text, 8)}")

    def optional(name: str) -> np.ndarray | None:
        path = out / f"{name}.npy"
        return np.load(path) if path.is_file() else None

    return {"summary": json.loads((out / "summary.json").read_text()), "wall_s": wall_s,
            "phase_iterations": np.load(out / "phase_iterations.npy"),
            "positions_iterations": np.load(out / "positions_iterations.npy"),
            "phase_time": optional("phase_time"), "positions_time": optional("positions_time")}
