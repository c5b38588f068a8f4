"""Run ``ptylive serve`` as a child process from Python: the demo and the end-to-end tests use it.

The daemon is started with a config file written here, announces itself through its ready file
(``service.ready_file``: the endpoints as JSON, with the actual ports after binding port 0), and is
stopped like systemd stops it: SIGTERM, then SIGKILL only if it is still running after the timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ptylive.daemon.service.config import DaemonConfig, config_to_toml

logger = logging.getLogger(__name__)


class ServeProcess:
    """``ptylive serve`` in a child process, its config, ready file and log under ``folder``."""

    def __init__(self, config: DaemonConfig, folder: Path, verbose: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.ready_file = folder / "ready.json"
        self.config_file = folder / "ptylive.toml"
        self.log_file = folder / "serve.log"
        service = dataclasses.replace(config.service, ready_file=str(self.ready_file))
        self.config = dataclasses.replace(config, service=service)
        self.verbose = verbose
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}

    def start(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Start the daemon and wait for its ready file; RuntimeError (with the log's tail) if it dies first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        self.config_file.write_text(config_to_toml(self.config))
        command = [sys.executable, "-m", "ptylive.daemon.cli.main", *(["-v"] if self.verbose else []),
                   "serve", "--config", str(self.config_file)]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"ptylive serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ptylive serve not ready after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.endpoints = json.loads(self.ready_file.read_text())
        return self.endpoints

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("ptylive serve ignored SIGTERM for %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
