"""Helpers for tests that run the real daemon (``ptylive serve`` under mpiexec) on loopback."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import zmq

from ptylive.daemon.service.config import DaemonConfig, ReconstructionConfig, loopback_config
from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource

ANY_PORT = "tcp://127.0.0.1:0"
FINAL_ITERATIONS = 30


def daemon_config(out: Path, ranks: int = 2, final_iterations: int = 30, **sections: Any) -> DaemonConfig:
    """Loopback, port 0 everywhere, 3 slices like ``ptylive simulate``'s default."""
    config = loopback_config(out, ranks, ReconstructionConfig(n_slices=3, slice_thickness_A=1.9525,
                                                              final_iterations=final_iterations), control=True)
    return replace(config, **sections)


def stream(daemon: ServeProcess, source: ScanSource, **options: Any) -> tuple[float, Any]:
    """Stream ``source`` to the daemon; returns (monotonic time before the start was sent, stats)."""
    with zmq.Context() as context, FakeDetector(source, FakeDetectorOptions(**options), daemon.endpoints["ingest"],
                                                 bind=False, context=context) as detector:
        began = time.monotonic()
        detector.start()
        return began, detector.join(120.0)


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class PreviewLog:
    """Every message published on the preview PUB, with the monotonic time it arrived."""

    messages: list[tuple[float, dict[str, Any], np.ndarray | None]] = field(default_factory=list)
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def previews(self, series_id: str) -> list[tuple[float, dict[str, Any], np.ndarray | None]]:
        return [m for m in self.messages if m[1]["htype"] == "preview" and m[1]["series_id"] == series_id]

    def virtuals(self, series_id: str) -> list[dict[str, Any]]:
        """The series' ``virtual`` headers, each with its images as ``images_by_kind``."""
        return [m[1] for m in self.messages if m[1]["htype"] == "virtual" and m[1]["series_id"] == series_id]


class PreviewListener:
    """A SUB socket in a thread; ``wait_final(series_id)`` returns that series' ``final`` message."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.log = PreviewLog()
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # the subscription must reach the publisher before anything is sent

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(50):
                continue
            parts = self._socket.recv_multipart()
            header = msgpack.unpackb(parts[0])
            image = None
            if header["htype"] == "preview":
                image = np.frombuffer(parts[1], dtype=header["dtype"]).reshape(header["shape"])
            elif header["htype"] == "virtual":  # one image per kind: kept by kind, in the header
                header["images_by_kind"] = {kind: np.frombuffer(part, dtype=header["dtype"]).reshape(
                    header["scan_shape"]) for kind, part in zip(header["kinds"], parts[1:], strict=True)}
            else:
                self.log.finals[header["series_id"]] = header
            self.log.messages.append((time.monotonic(), header, image))

    def wait_final(self, series_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        return wait_for(lambda: self.log.finals.get(series_id), timeout_s, f"the final of {series_id!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def read_final(path: str | Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        out: dict[str, Any] = {name: f[name][...] for name in ("object", "probe", "loss", "frames_used",
                                                                 "positions_px", "positions_nominal_px",
                                                                 "received")}
        out.update({f"ranks/{k}": f["ranks"][k][...] for k in f["ranks"]})
        out["attrs"] = dict(f.attrs)
    return out


def registry_series(status: dict[str, Any], series_id: str) -> dict[str, Any]:
    """The ingest registry's record of ``series_id`` (current, queued or finished); {} before its start."""
    registry = status["ingest"]["registry"]
    candidates = [registry["current"], *registry["queued"], *reversed(registry["finished"])]
    return next((s for s in candidates if s is not None and s["series_id"] == series_id), {})


def series_count(url: str, series_id: str, key: str, reason: str | None = None) -> int:
    """``received`` (or another count) of a series from ``/status``; ``rejected[reason]`` with ``reason``; 0 if
    the ingest has not seen the series yet."""
    record = registry_series(get_json(url + "status"), series_id)
    value = record.get(key, 0) if reason is None else record.get(key, {}).get(reason, 0)
    return int(value)


@contextmanager
def serving(config: DaemonConfig, folder: Path) -> Iterator[tuple[ServeProcess, PreviewListener]]:
    """``ptylive serve`` with ``config`` (working folder ``folder``) and a listener on its previews.

    Stopped afterwards unless the body stopped it; a daemon that exits with a non-zero code fails the test.
    """
    process = ServeProcess(config, folder)
    context = zmq.Context()
    try:
        listener = PreviewListener(context, process.start()["preview"])
        try:
            yield process, listener
        finally:
            listener.close()
    finally:
        code = process.stop()
        context.term()
    assert code == 0, process.log_tail()


def stop_by_sigterm(process: ServeProcess, timeout_s: float) -> tuple[int, float]:
    """SIGTERM to the daemon's launcher, as systemd sends it: ``(exit code, seconds until it exited)``."""
    assert process.process is not None
    began = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    code = process.process.wait(timeout_s)
    return code, time.monotonic() - began
