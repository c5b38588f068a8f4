"""Scan geometry per series through ``ptylive serve`` (MPI): a SIMPLON v1 series whose scan shape comes from the
detector config alone (``nimages × ntrigger``, no ``[scan]`` raster), reconstructed like the same frames sent as
ptylive stream v1; a count that is no square refused with a clear message; a count mismatch (``[scan]`` raster
against the detector's count) logged, in ``/status`` and the final file, ``incomplete``, and ``ptylive replay``
exiting 4; then a ``POST /control`` scan request that sets the next series' raster before it is armed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from ptylive.daemon.cli.main import main as cli_main
from ptylive.daemon.service.config import DaemonConfig, ScanConfig, control_token
from ptylive.daemon.service.process import ServeProcess
from ptylive.gpu.quality import phase_correlation
from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming.recording import RecordingWriter
from ptylive.streaming.scanfile import read_frames, read_metadata
from tests.daemon.http_harness import post_json
from tests.daemon.serve_harness import (
    PreviewListener,
    daemon_config,
    get_json,
    read_final,
    registry_series,
    wait_for,
)

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

SCAN = (10, 10)
DETECTOR_CONFIG = {"nimages": 1, "trigger_mode": "exts", "x_pixels_in_detector": 32, "y_pixels_in_detector": 32}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 10×10 scan (32 px detector) as integer counts, its step and optics."""
    scan = tmp_path_factory.mktemp("scan") / "scan.h5"
    assert cli_main(["simulate", str(scan), "--scan", *map(str, SCAN), "--detector-px", "32",
                     "--detector-pixel-mrad", "3.0", "--dose", "1e5"]) == 0
    meta = read_metadata(scan)
    n = SCAN[0] * SCAN[1]
    return {"counts": np.rint(read_frames(scan, np.arange(n), np.float64)).astype(np.uint16),
            "step_A": 3.0 * meta.pixel_size_A,  # ptylive simulate's default --step-px
            "optics": {"energy_eV": meta.energy_eV, "convergence_semiangle_mrad": meta.convergence_semiangle_mrad,
                       "defocus_A": meta.defocus_A, "detector_pixel_mrad": meta.detector_pixel_mrad}}


def recording(path: Path, series_id: int, counts: np.ndarray, ntrigger: int) -> Path:
    """A SIMPLON v1 series as the detector sends it: header (basic, with its config), images, end."""
    with RecordingWriter(path) as writer:
        writer.write(v1.header_message(series_id, "basic", {**DETECTOR_CONFIG, "ntrigger": ntrigger}))
        for k, frame in enumerate(counts):
            writer.write(v1.image_message(series_id, k, frame))
        writer.write(v1.end_message(series_id))
    return path


def dectris_config(folder: Path, simulated: dict[str, Any], **scan: Any) -> DaemonConfig:
    base = daemon_config(folder, final_iterations=20)
    step = simulated["step_A"]
    return dataclasses.replace(base, ingest=dataclasses.replace(base.ingest, format="dectris_v1"),
                               scan=ScanConfig(step_row_A=step, step_col_A=step, **simulated["optics"], **scan))


def replay(source: Path, endpoints: dict[str, Any], *args: str) -> int:
    return cli_main(["replay", str(source), "--endpoint", endpoints["ingest"], "--max-rate", "--quiet",
                     "--status-url", endpoints["http"], *args])


class Daemon:
    """``ptylive serve`` with a listener on its previews, for a test that sends several series."""

    def __init__(self, config: DaemonConfig, folder: Path) -> None:
        self.process = ServeProcess(config, folder)
        self.context = zmq.Context()
        self.endpoints = self.process.start()
        self.listener = PreviewListener(self.context, self.endpoints["preview"])

    def status(self) -> dict[str, Any]:
        return get_json(self.endpoints["http"] + "status")  # type: ignore[no-any-return]

    def close(self) -> None:
        self.listener.close()
        code = self.process.stop()
        self.context.term()
        assert code == 0, self.process.log_tail()


def test_a_simplon_v1_series_takes_its_scan_shape_from_the_detector_config_alone(
        tmp_path: Path, simulated: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """No raster in [scan] (rows = cols = 0): 1 image × 100 triggers make a 10×10 scan; its reconstruction matches
    the same frames sent as a ptylive 4-D array on the same raster (received sets, detector scale and nominal
    positions exactly, phases by correlation: asynchronous runs). 99 triggers are no square: refused, said why."""
    counts = simulated["counts"]
    (tmp_path / "a").mkdir()
    daemon = Daemon(dectris_config(tmp_path / "a", simulated), tmp_path / "a")
    try:
        assert replay(recording(tmp_path / "s42.zmq", 42, counts, ntrigger=100), daemon.endpoints) == 0
        final = daemon.listener.wait_final("42")
        record = registry_series(daemon.status(), "42")
        capsys.readouterr()
        assert replay(recording(tmp_path / "s43.zmq", 43, counts[:99], ntrigger=99), daemon.endpoints) == 3
        refused_err = capsys.readouterr().err
        refused = wait_for(lambda: (r := registry_series(daemon.status(), "43"))["rejected"]["refused_series"] == 99
                           and r, 30.0, "every image of series 43 counted as refused")
    finally:
        daemon.close()
    assert final["status"] == "complete"
    assert record["scan_shape"] == list(SCAN) and record["count_mismatch"] is None
    assert record["scan"]["source"] == "count" and record["scan"]["detector_images"] == 100
    assert record["scan"]["count_source"] == "nimages 1 × ntrigger 100 (exts)"
    streamed = read_final(final["path"])
    assert streamed["received"].all() and streamed["attrs"]["scan_source"] == "count"
    assert streamed["attrs"]["detector_images"] == 100 and "count_mismatch" not in streamed["attrs"]
    message = "series '43': the detector's 99 images are not a square scan (n × n); set the shape"
    assert refused["refusal"].startswith(message) and message in refused_err

    (tmp_path / "b").mkdir()
    np.save(tmp_path / "cube.npy", counts.reshape(*SCAN, 32, 32))
    optics = simulated["optics"]
    reference_daemon = Daemon(daemon_config(tmp_path / "b", final_iterations=20), tmp_path / "b")
    try:
        assert replay(tmp_path / "cube.npy", reference_daemon.endpoints, "--step-A", repr(simulated["step_A"]),
                      "--energy-eV", repr(optics["energy_eV"]), "--convergence-mrad",
                      repr(optics["convergence_semiangle_mrad"]), "--defocus-A", repr(optics["defocus_A"]),
                      "--detector-pixel-mrad", repr(optics["detector_pixel_mrad"])) == 0
        reference = read_final(reference_daemon.listener.wait_final("cube")["path"])
    finally:
        reference_daemon.close()
    assert np.array_equal(streamed["received"], reference["received"])
    assert streamed["attrs"]["detector_scale"] == reference["attrs"]["detector_scale"]
    np.testing.assert_array_equal(streamed["positions_nominal_px"], reference["positions_nominal_px"])
    correlation = phase_correlation(streamed["object"], reference["object"], streamed["positions_nominal_px"])
    assert correlation >= 0.95, correlation


def test_a_count_mismatch_is_logged_in_the_status_and_the_file_and_replay_exits_4(
        tmp_path: Path, simulated: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """[scan] says 8×10, the detector takes 100 images: the lines come from the count (10×10, every frame placed),
    and everyone is told. Then acquisition software sets the next series' raster over HTTP before arming."""
    counts = simulated["counts"]
    config = dectris_config(tmp_path, simulated, rows=8, cols=10)
    daemon = Daemon(config, tmp_path)
    try:
        assert replay(recording(tmp_path / "s44.zmq", 44, counts, ntrigger=100), daemon.endpoints) == 4
        err = capsys.readouterr().err
        final = daemon.listener.wait_final("44")
        status = daemon.status()
        token = control_token(config.http, {})
        reply = post_json(daemon.endpoints["http"] + "control", {"action": "scan", "shape": [10, 10]}, token=token)
        assert reply.status == 200, reply.body
        assert get_json(daemon.endpoints["http"] + "status")["scan"]["pending"]["next"]["shape"] == [10, 10]
        assert replay(recording(tmp_path / "s45.zmq", 45, counts, ntrigger=100), daemon.endpoints) == 0
        second = daemon.listener.wait_final("45")
        second_record = registry_series(daemon.status(), "45")
    finally:
        daemon.close()
    said = ("series '44': the detector takes 100 images (nimages 1 × ntrigger 100 (exts)), the config scan 8×10 "
            "takes 80; using 10×10 (the line kept, the number of lines from the detector's count)")
    log = daemon.process.log_file.read_text()
    assert f"count mismatch: {said}" in log
    assert "WARNING" in next(line for line in log.splitlines() if "count mismatch:" in line)
    assert f"error: series '44': the detector's image count and the scan disagree: {said}" in err
    record = registry_series(status, "44")
    assert record["count_mismatch"] == said and record["scan_shape"] == [10, 10] and record["received"] == 100
    assert record["rejected"]["index_out_of_range"] == 0  # every image placed, none dropped
    assert final["status"] == "incomplete"
    entry = next(e for e in status["finished"] if e["series_id"] == "44")
    assert entry["status"] == "incomplete" and entry["count_mismatch"] == said
    attrs = read_final(final["path"])["attrs"]
    assert attrs["status"] == "incomplete" and attrs["count_mismatch"] == said and attrs["detector_images"] == 100

    assert second["status"] == "complete" and second_record["count_mismatch"] is None
    assert second_record["scan"]["source"] == "request" and second_record["scan_shape"] == [10, 10]
    assert "count_mismatch" not in read_final(second["path"])["attrs"]
