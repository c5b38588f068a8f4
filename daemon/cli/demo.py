"""``ptylive demo``: the daemon, a fake detector streaming a simulated PbTiO3 scan, and live progress.

Everything runs on loopback: ``ptylive serve`` (rank 0 + ``ranks`` workers) in a child process, the
fake detector in a thread of this process, and a subscriber to the preview PUB that prints progress.
The viewer URL is printed as soon as the daemon is ready; open it in a browser to watch the mosaic.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from ptylive.daemon.service.config import DaemonConfig, ReconstructionConfig, loopback_config
from ptylive.daemon.service.process import ServeProcess

logger = logging.getLogger(__name__)

SILENCE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DemoOptions:
    ranks: int = 2
    out: Path = Path("ptylive-demo")
    rate_hz: float = 100.0
    scan_shape: tuple[int, ...] = (24, 24)
    dose_e_per_A2: float | None = 1e6
    final_iterations: int = 20
    http_port: int = 0
    keep_running: bool = False


def demo_config(options: DemoOptions, results: Path, n_slices: int, slice_thickness_A: float) -> DaemonConfig:
    return loopback_config(results, options.ranks, ReconstructionConfig(
        n_slices=n_slices, slice_thickness_A=slice_thickness_A, final_iterations=options.final_iterations),
        http_port=options.http_port)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(options: DemoOptions) -> int:
    from ptylive.gpu.quality import phase_correlation
    from ptylive.gpu.simulate import SimulationSpec, simulate
    from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource

    if options.ranks < 1 or not options.rate_hz > 0 or len(options.scan_shape) != 2 or min(options.scan_shape) < 2:
        raise ValueError("--ranks must be >= 1, --rate > 0 and --scan at least 2 x 2")
    spec = SimulationSpec(scan_shape=(options.scan_shape[0], options.scan_shape[1]),
                          dose_e_per_A2=options.dose_e_per_A2)
    _say(f"simulating PbTiO3 [001]: {spec.scan_shape[0]}x{spec.scan_shape[1]} positions, {spec.n_slices} slices, "
         f"dose {options.dose_e_per_A2} e/Å² ...")
    simulation = simulate(spec)
    results = options.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    config = demo_config(options, results.resolve(), spec.n_slices, spec.slice_thickness_A)
    with ServeProcess(config, options.out.resolve()) as daemon, zmq.Context() as context:
        _say(f"starting ptylive serve with {options.ranks} worker ranks (log: {daemon.log_file}) ...")
        endpoints = daemon.start()
        _say(f"viewer: {endpoints['http']}   previews: {endpoints['preview']}   ingest: {endpoints['ingest']}")
        previews = context.socket(zmq.SUB)
        previews.setsockopt(zmq.SUBSCRIBE, b"")
        previews.connect(endpoints["preview"])
        time.sleep(0.2)  # let the subscription reach the publisher before the first preview
        source = ScanSource.from_simulation(spec, simulation)
        series_id = time.strftime("demo-%Y%m%d-%H%M%S")
        detector = FakeDetector(source, FakeDetectorOptions(rate_hz=options.rate_hz, series_id=series_id),
                                endpoints["ingest"], bind=False, context=context)
        with detector:
            detector.start()
            final = _follow(previews, series_id)
            stats = detector.join(10.0)
        _say(f"fake detector: {stats.frames_sent} frames at {stats.achieved_rate_hz:.0f} frames/s")
        if final.get("path") is None:
            _say(f"error: no final file for {series_id} (status {final.get('status')}); see {daemon.log_file}")
            return 1
        import h5py

        with h5py.File(final["path"], "r") as f:
            volume, iterations = f["object"][...], int(f.attrs["iterations"])
        correlation = phase_correlation(volume, simulation.object_truth, simulation.positions_px)
        _say(f"phase correlation with the simulated truth: {correlation:.3f} after {iterations} iterations")
        print(final["path"], flush=True)
        if options.keep_running:
            _say(f"still serving at {endpoints['http']}; press Ctrl-C to stop")
            try:
                while daemon.process is not None and daemon.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    return 0


def _follow(previews: zmq.Socket, series_id: str) -> dict[str, object]:
    """Print progress from the preview stream until the series' ``final`` message; return it."""
    first_s, last_print = None, 0.0
    began = time.monotonic()
    while True:
        if not previews.poll(int(SILENCE_TIMEOUT_S * 1000)):
            raise RuntimeError(f"no preview for {SILENCE_TIMEOUT_S:.0f} s")
        header = msgpack.unpackb(previews.recv_multipart()[0])
        if header.get("series_id") != series_id:
            continue
        if header["htype"] == "final":
            _say(f"final: {header['path']} ({header['status']})")
            return dict(header)
        if header["htype"] != "preview":  # virtual images, and whatever else the PUB adds
            continue
        now = time.monotonic()
        if first_s is None:
            first_s = now - began
            _say(f"first preview after {first_s:.1f} s")
        if now - last_print >= 1.0:
            last_print = now
            _say(f"  frames {header['frames_received']:5d}/{header['frames_expected']}  "
                 f"iteration {header['iteration']:4d}  coverage {100 * header['coverage']:5.1f} %")
