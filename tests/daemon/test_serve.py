"""``ptylive serve`` end to end: real processes (mpiexec, 2 workers + rank 0), loopback only.

One daemon (``tests/daemon/conftest.py``) serves these tests series after series (which also shows
back-to-back series work); each test streams its own series id.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.service.process import ServeProcess
from ptylive.gpu.quality import phase_correlation
from ptylive.streaming import protocol
from ptylive.streaming.fake_detector import ScanSource
from ptylive.streaming.scanfile import read_optional, read_positions
from tests.daemon.serve_harness import (
    FINAL_ITERATIONS,
    PreviewListener,
    get_json,
    read_final,
    registry_series,
    stream,
)

pytestmark = pytest.mark.mpi


def group_sizes(source: ScanSource, series_id: str, n_workers: int = 2) -> list[int]:
    start = dataclasses.replace(source.start, series_id=series_id)
    return [len(d.positions) for d in series_geometry(start, n_workers, 1).domains]


def test_streamed_series_gives_live_previews_a_good_final_and_loses_no_frame(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    began, stats = stream(process, source, series_id="e2e", rate_hz=100.0, dtype="uint16")
    final = listener.wait_final("e2e")
    previews = listener.log.previews("e2e")
    assert previews, "no preview was published"
    first_s = previews[0][0] - began
    assert first_s < 2.0, f"first preview {first_s:.2f} s after the series started"
    running = [h for _, h, _ in previews if h["frames_received"] < h["frames_expected"]]
    assert running, "no preview arrived while frames were still streaming"
    image = previews[-1][2]
    assert image is not None and image.dtype == np.float32 and np.isfinite(image).all()

    result = read_final(final["path"])
    assert final["status"] == "complete" and result["attrs"]["status"] == "complete"
    truth = read_optional(dosed_scan, "object_truth")
    correlation = phase_correlation(result["object"], truth, read_positions(dosed_scan))
    assert correlation >= 0.9, correlation

    status = get_json(process.endpoints["http"] + "status")
    record = registry_series(status, "e2e")
    expected = group_sizes(source, "e2e")
    assert stats.frames_sent == record["received"] == source.n_frames and record["missing"] == 0
    assert [w["forwarded"] for w in status["ingest"]["workers"]] >= expected  # earlier series add to these
    assert list(result["ranks/frames_received"]) == expected  # received equals sent, per rank
    assert result["received"].all() and result["frames_used"][-1] == source.n_frames
    tiles = get_json(process.endpoints["http"] + "tiles")
    assert tiles["series_id"] == "e2e" and [t["frames_received"] for t in tiles["tiles"]] == expected
    with urllib.request.urlopen(process.endpoints["http"] + "preview.png", timeout=5) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_streaming_matches_offline_reconstruction(daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path,
                                                  tmp_path: Path) -> None:
    """Same frames, same iteration budget after the last frame: within the engine's async tolerance (5 %).

    Streamed at full speed, so (nearly) every iteration sees every frame; the comparison is of the
    loss (as in the engine's async-vs-sync test) and of the phase images themselves.
    """
    process, listener = daemon
    offline = tmp_path / "offline.h5"
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct", str(dosed_scan), "--ranks", "2",
               "--mode", "async", "--iterations", str(FINAL_ITERATIONS), "--out", str(offline), "--quiet",
               "--no-correct-positions", "--no-refine-probe"]  # like for like: serve defaults
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stream(process, ScanSource.from_file(dosed_scan), series_id="versus-offline", dtype="uint16")
    streamed = read_final(listener.wait_final("versus-offline")["path"])
    from tests.conftest import read_result

    reference = read_result(offline)
    assert streamed["attrs"]["iterations"] >= FINAL_ITERATIONS
    assert streamed["attrs"]["detector_scale"] == pytest.approx(reference["attrs"]["detector_scale"], rel=1e-5)
    assert abs(streamed["loss"][-1] / reference["loss"][-1] - 1) <= 0.05
    positions = read_positions(dosed_scan)
    assert phase_correlation(streamed["object"], reference["object"], positions) >= 0.98


def test_a_frame_whose_header_position_lies_in_another_tile_is_reconstructed(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    """One frame of worker 0's group carries a header position in worker 1's tile (less than a scan step from its
    nominal one). It must be routed to worker 0, which holds its row, and be used in every last iteration."""
    from tests.daemon.test_frame_owner import crossing_frame

    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    start = dataclasses.replace(source.start, series_id="header-across", dtype="uint16")
    geometry = series_geometry(start, 2, 1)
    index, position_A = crossing_frame(start, geometry)
    frames = np.clip(np.rint(source.read(np.arange(source.n_frames))), 0, 65535).astype(np.uint16)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(process.endpoints["ingest"])
        push.send_multipart(protocol.encode_series_start(start))
        for k, pixels in enumerate(frames):
            push.send_multipart(protocol.encode_frame(start.series_id, k, pixels,
                                                      position_A=position_A if k == index else None))
        push.send_multipart(protocol.encode_series_end(start.series_id, source.n_frames))
        result = read_final(listener.wait_final(start.series_id)["path"])

    expected = [len(d.positions) for d in geometry.domains]
    assert result["received"].all() and list(result["ranks/frames_received"]) == expected
    assert result["frames_used"][-1] == source.n_frames  # the moved frame among them
    assert not any(key.startswith("worker_rejected_") and value for key, value in result["attrs"].items())
    record = registry_series(get_json(process.endpoints["http"] + "status"), start.series_id)
    assert record["received"] == source.n_frames and record["rejected"]["position_outside"] == 0


def test_streamed_probe_refinement_moves_the_probe_and_keeps_the_image(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    """A series that asks for probe refinement (per-series override): the final probe moved, both workers'
    probes stayed one (the final file holds worker 0's), and the phase image is as good as without it."""
    from ptylive.gpu.probe import ProbeOptics, make_probe

    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    start = dataclasses.replace(source.start, overrides={"refine_probe": True})
    stream(process, dataclasses.replace(source, start=start), series_id="probe-refined", dtype="uint16")
    streamed = read_final(listener.wait_final("probe-refined")["path"])
    initial = make_probe(ProbeOptics(start.energy_eV, start.convergence_semiangle_mrad, start.defocus_A),
                         streamed["probe"].shape[-1], streamed["attrs"]["pixel_size_A"], dtype=np.complex128)
    assert np.isfinite(streamed["probe"]).all() and np.isfinite(streamed["object"]).all()
    assert np.abs(streamed["probe"] - initial).max() > 1e-4 * np.abs(initial).max()
    truth = read_optional(dosed_scan, "object_truth")
    assert phase_correlation(streamed["object"], truth, read_positions(dosed_scan)) >= 0.9


def test_streamed_probe_modes_are_refined_and_stay_orthogonal(daemon: tuple[ServeProcess, PreviewListener],
                                                               dosed_scan: Path) -> None:
    """Two incoherent probe modes, refined in the final iterations of a streamed series (per-series override): the
    file holds (2, N, N) modes, orthogonal, sorted by power, total power 1; the image is as good as with one."""
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    start = dataclasses.replace(source.start, overrides={"refine_probe": True, "probe_modes": 2})
    stream(process, dataclasses.replace(source, start=start), series_id="probe-modes", dtype="uint16")
    final = listener.wait_final("probe-modes")
    assert final["status"] == "complete", final
    streamed = read_final(final["path"])
    modes = streamed["probe"]
    assert modes.shape[0] == 2 and np.isfinite(modes).all()
    flat = modes.reshape(2, -1).astype(np.complex128)
    gram = flat.conj() @ flat.T
    powers = np.real(np.diag(gram))
    assert powers.sum() == pytest.approx(1.0, rel=1e-4) and powers[0] >= powers[1] > 0
    assert abs(gram[0, 1]) <= 1e-5 * powers.sum()  # orthogonal to float32 rounding
    truth = read_optional(dosed_scan, "object_truth")
    assert phase_correlation(streamed["object"], truth, read_positions(dosed_scan)) >= 0.9


@pytest.mark.chaos
def test_a_dark_series_ends_dark_and_the_daemon_serves_the_next(daemon: tuple[ServeProcess, PreviewListener],
                                                                 dosed_scan: Path) -> None:
    """A closed shutter: every frame all zero. There is no detector scale to fit (a worker once raised on it and
    MPI_Abort took the whole daemon down); the series ends ``dark``, its file is written, the next series completes."""
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    dark = ScanSource(source.start, lambda indices: np.zeros((len(indices), *source.read(indices[:1]).shape[1:])))
    stream(process, dark, series_id="shutter-closed", dtype="uint16")
    final = listener.wait_final("shutter-closed")
    assert final["status"] == "dark", final
    result = read_final(final["path"])
    assert result["attrs"]["status"] == "dark" and result["attrs"]["iterations"] == 0
    stream(process, source, series_id="after-dark", dtype="uint16")
    assert listener.wait_final("after-dark")["status"] == "complete"


@pytest.mark.chaos
def test_a_second_start_with_a_live_id_is_counted_and_the_series_completes(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    """Mid-series, a ``series_start`` with the same id and a 10×10 raster arrives. It is counted as duplicate_id and
    dropped before admission (its geometry once replaced the first's in rank 0's books, and the collector's thread
    died on a tile outside the object: no preview or file for any later series)."""
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    start = dataclasses.replace(source.start, series_id="started-twice", dtype="uint16")
    other = dataclasses.replace(start, scan_shape=(10, 10), positions_A=None)
    frames = np.clip(np.rint(source.read(np.arange(source.n_frames))), 0, 65535).astype(np.uint16)
    before = get_json(process.endpoints["http"] + "status")["ingest"]["registry"]["starts"].get("duplicate_id", 0)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(process.endpoints["ingest"])
        push.send_multipart(protocol.encode_series_start(start))
        for k, pixels in enumerate(frames):
            push.send_multipart(protocol.encode_frame(start.series_id, k, pixels))
            if k == len(frames) // 2:
                push.send_multipart(protocol.encode_series_start(other))
        push.send_multipart(protocol.encode_series_end(start.series_id, source.n_frames))
        final = listener.wait_final(start.series_id)
    assert final["status"] == "complete"
    assert read_final(final["path"])["received"].all()
    status = get_json(process.endpoints["http"] + "status")
    assert status["ingest"]["registry"]["starts"]["duplicate_id"] == before + 1
    stream(process, source, series_id="after-duplicate", dtype="uint16")  # the collector still serves
    assert listener.wait_final("after-duplicate")["status"] == "complete"


@pytest.mark.chaos
def test_a_start_reusing_a_finished_id_is_refused_and_later_series_are_still_written(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    """A series is written; then a ``series_start`` with its id and a 10×10 raster comes, with frames and an end.
    It is counted duplicate_id and recorded as refused, saying why, its frames rejected as ``refused_series``;
    the first file stays the only one of that id, and the next series is written. (It was admitted: the
    collector's thread died on a tile outside the first series' object, and no later series got a file.)"""
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    stream(process, source, series_id="used-once", dtype="uint16")
    first = listener.wait_final("used-once")
    before = get_json(process.endpoints["http"] + "status")["ingest"]["registry"]["starts"]["duplicate_id"]
    again = dataclasses.replace(source.start, series_id="used-once", dtype="uint16", scan_shape=(10, 10),
                                positions_A=None)
    frames = np.clip(np.rint(source.read(np.arange(20))), 0, 65535).astype(np.uint16)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(process.endpoints["ingest"])
        push.send_multipart(protocol.encode_series_start(again))
        for k, pixels in enumerate(frames):
            push.send_multipart(protocol.encode_frame(again.series_id, k, pixels))
        push.send_multipart(protocol.encode_series_end(again.series_id, len(frames)))
    stream(process, source, series_id="after-reuse", dtype="uint16")
    assert listener.wait_final("after-reuse")["status"] == "complete"
    status = get_json(process.endpoints["http"] + "status")
    assert status["ingest"]["registry"]["starts"]["duplicate_id"] == before + 1
    record = registry_series(status, "used-once")
    assert record["refusal"].startswith("duplicate_id") and record["scan_shape"] == [10, 10]
    assert record["rejected"]["refused_series"] == len(frames)
    assert listener.log.finals["used-once"] == first  # no second final under the id
    assert [e["path"] for e in status["finished"] if e["series_id"] == "used-once"] == [first["path"]]
