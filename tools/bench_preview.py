"""Frame-to-preview latency through the whole daemon (section 3 of ``ptylive bench ingest``).

``ptylive serve`` (rank 0 + 2 workers, under mpiexec) receives a simulated scan from the fake
detector at a fixed rate; a subscriber records every preview. A frame is *in* a preview once its
worker's tile reports ``frames_used`` covering it: a worker receives its probe group in index order
and an iteration uses every frame received before it started, so frame ``k`` of a group (in index
order) is used once ``frames_used > k``. Its latency is that preview's arrival time minus the frame's
scheduled send time (the detector sends frame ``i`` at ``t0 + i / rate`` on a monotonic clock); the
bookkeeping is the daemon's own (:class:`~ptylive.daemon.service.metrics.PreviewLatency`).

The reference measured in the same run is the preview interval ``1 / preview.rate_hz``: a preview
can only show a frame after an iteration that used it, and is published at most that often.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.service.config import ReconstructionConfig, loopback_config
from ptylive.daemon.service.metrics import PreviewLatency
from ptylive.daemon.service.process import ServeProcess


def frame_to_preview_latency(rate_hz: float = 200.0, scan_shape: tuple[int, int] = (24, 24),
                             n_workers: int = 2) -> dict[str, Any]:
    """Stream a simulated scan at ``rate_hz``; per-frame latency to the first preview showing it (seconds)."""
    from ptylive.gpu.simulate import SimulationSpec
    from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource

    source = ScanSource.from_simulation(SimulationSpec(scan_shape=scan_shape, dose_e_per_A2=1e6))
    series_id = "latency"
    geometry = series_geometry(dataclasses.replace(source.start, series_id=series_id), n_workers, 1)
    owner = geometry.owner
    with tempfile.TemporaryDirectory(prefix="ptylive-bench-") as tmp, zmq.Context() as context:
        config = loopback_config(Path(tmp), n_workers, ReconstructionConfig(
            n_slices=3, slice_thickness_A=1.9525, final_iterations=20))
        with ServeProcess(config, Path(tmp), verbose=False) as daemon:
            endpoints = daemon.start()
            subscriber = context.socket(zmq.SUB)
            subscriber.setsockopt(zmq.SUBSCRIBE, b"")
            subscriber.connect(endpoints["preview"])
            time.sleep(0.3)
            previews: list[tuple[float, dict[str, Any]]] = []
            with FakeDetector(source, FakeDetectorOptions(rate_hz=rate_hz, series_id=series_id),
                              endpoints["ingest"], bind=False, context=context) as detector:
                began = time.monotonic()
                detector.start()
                while True:
                    if not subscriber.poll(60_000):
                        raise RuntimeError("no preview for 60 s")
                    parts = subscriber.recv_multipart()
                    arrived = time.monotonic()
                    header = msgpack.unpackb(parts[0])
                    if header["htype"] == "final":
                        break
                    if header["htype"] == "preview":  # not the virtual images
                        previews.append((arrived, header))
                detector.join(10)
            subscriber.close()
    sent = began + np.arange(len(owner)) / rate_hz  # the daemon's metric uses acceptance times instead
    tracker = PreviewLatency()
    latency = np.array([seconds for arrived, header in previews
                        for seconds in tracker.newly_shown(header, sent, owner, arrived)])
    return {"latency_s": latency, "preview_interval_s": 1.0 / config.preview.rate_hz, "rate_hz": rate_hz,
            "n_frames": len(owner), "previews": len(previews)}


def latency_lines(result: dict[str, Any]) -> list[str]:
    latency = result["latency_s"]
    shown = latency[np.isfinite(latency)]
    interval = result["preview_interval_s"]
    median, p99 = np.median(shown), np.percentile(shown, 99)
    return ["| frames | rate fps | previews | frames shown | median s | p99 s | median / preview interval | "
            "p99 / preview interval |", "|---|---|---|---|---|---|---|---|",
            f"| {result['n_frames']} | {result['rate_hz']:.0f} | {result['previews']} | {len(shown)} | "
            f"{median:.3f} | {p99:.3f} | **{median / interval:.2f}** | {p99 / interval:.2f} |"]
