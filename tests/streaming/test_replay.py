"""``ptylive replay``: scan files, 4-D arrays and recordings to a PULL socket (in-process), pacing, refusals seen
through ``/status``; and the round trip through real daemons (DECTRIS v1 recording vs ptylive stream v1)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from ptylive.daemon.cli.main import main as cli_main
from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming import dectris_v2 as v2
from ptylive.streaming.protocol import (
    Frame,
    SeriesEnd,
    SeriesStart,
    decode,
    encode_frame,
    encode_series_end,
    encode_series_start,
)
from ptylive.streaming.recording import RecordingWriter, detect_format, read_parts, sidecar
from ptylive.streaming.scanfile import read_frames, read_metadata


class Receiver:
    """A bound PULL collecting every multipart message (as bytes) in a thread."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.bind("tcp://127.0.0.1:0")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.messages: list[list[bytes]] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(20):
                self.messages.append(self.socket.recv_multipart())
                self.times.append(time.monotonic())

    def wait(self, n: int, timeout_s: float = 10.0) -> list[list[bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.messages

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def replay(*args: str) -> int:
    return cli_main(["replay", *args, "--quiet"])


def test_a_scan_file_goes_out_as_ptylive_stream_v1(small_scan: Path, receiver: Receiver,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert replay(str(small_scan), "--endpoint", receiver.endpoint, "--max-rate", "--encoding", "bslz4",
                  "--series-id", "scan") == 0
    n = read_metadata(small_scan).n_positions
    messages = [decode(m) for m in receiver.wait(n + 2)]
    assert isinstance(messages[0], SeriesStart) and messages[0].positions_A is not None
    assert messages[-1] == SeriesEnd("scan", n)
    truth = np.clip(np.rint(read_frames(small_scan, np.arange(n), np.float64)), 0, 65535).astype(np.uint16)
    for frame in messages[1:-1]:
        assert isinstance(frame, Frame) and frame.encoding == "bslz4"
        np.testing.assert_array_equal(frame.pixels, truth[frame.frame_index])
    assert f"sent {n} frames ({n + 2} messages" in capsys.readouterr().out


def test_a_4d_array_with_optics_options(tmp_path: Path, receiver: Receiver) -> None:
    data = np.random.default_rng(0).integers(0, 100, (3, 4, 8, 8)).astype(np.uint16)
    np.save(tmp_path / "cube.npy", data)
    optics = ["--step-A", "0.5", "--energy-eV", "300e3", "--convergence-mrad", "20", "--detector-pixel-mrad", "2"]
    assert replay(str(tmp_path / "cube.npy"), "--endpoint", receiver.endpoint, "--max-rate", *optics) == 0
    messages = [decode(m) for m in receiver.wait(14)]
    start = messages[0]
    assert isinstance(start, SeriesStart) and start.scan_shape == (3, 4) and start.scan_step_A == (0.5, 0.5)
    assert start.positions_A is None and start.detector_pixel_mrad == 2.0
    for frame in messages[1:-1]:
        assert isinstance(frame, Frame)
        np.testing.assert_array_equal(frame.pixels, data.reshape(12, 8, 8)[frame.frame_index])
    np.save(tmp_path / "flat.npy", data.reshape(12, 8, 8))
    assert replay(str(tmp_path / "flat.npy"), "--endpoint", receiver.endpoint, "--max-rate", *optics) == 2
    assert replay(str(tmp_path / "cube.npy"), "--endpoint", receiver.endpoint, "--max-rate") == 2  # no optics


def dectris_recording(path: Path, pixels: np.ndarray, series_id: int = 9) -> list[list[bytes]]:
    messages = ([v1.header_message(series_id)] + [v1.image_message(series_id, k, p) for k, p in enumerate(pixels)]
                + [v1.end_message(series_id)])
    with RecordingWriter(path) as writer:
        for message in messages:
            writer.write(message)
    return messages


def test_a_recording_is_replayed_exactly_and_paced(tmp_path: Path, receiver: Receiver) -> None:
    pixels = np.random.default_rng(2).integers(0, 50, (20, 8, 8)).astype(np.uint16)
    messages = dectris_recording(tmp_path / "d.zmq", pixels)
    began = time.monotonic()
    assert replay(str(tmp_path / "d.zmq"), "--endpoint", receiver.endpoint, "--rate", "200") == 0
    assert receiver.wait(len(messages)) == messages
    assert receiver.times[-1] - began >= 19 / 200  # 20 images at 200 per second
    receiver.messages.clear()
    sidecar(tmp_path / "d.zmq").unlink()  # boundaries re-derived from DECTRIS v1 itself
    assert replay(str(tmp_path / "d.zmq"), "--endpoint", receiver.endpoint, "--max-rate") == 0
    assert receiver.wait(len(messages)) == messages
    receiver.messages.clear()
    assert replay(str(tmp_path / "d.zmq"), "--endpoint", receiver.endpoint, "--max-rate", "--single-parts") == 0
    parts = [[part] for part in read_parts(tmp_path / "d.zmq")]
    assert receiver.wait(len(parts)) == parts


class Status(BaseHTTPRequestHandler):
    """``/status`` with one refused series."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        refused = {"series_id": "9", "refusal": "needs 9 GiB on worker 0; the budget is 1 GiB"}
        body = json.dumps({"ingest": {"registry": {"current": None, "queued": [], "finished": [refused]}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def dectris_v2_recording(path: Path, pixels: np.ndarray, series_id: int = 9) -> None:
    """A SIMPLON stream v2 series (one channel, bslz4) as the detector sends it: start, images, end."""
    with RecordingWriter(path) as writer:
        writer.write([v2.start_message(series_id, ["threshold_1"], pixels.shape[1:], len(pixels))])
        for k, frame in enumerate(pixels):
            writer.write([v2.image_message(series_id, k, {"threshold_1": frame})])
        writer.write([v2.end_message(series_id)])


def ptylive_recording(path: Path, pixels: np.ndarray, series_id: str = "9") -> None:
    """A ptylive stream v1 series (``series_start``, frames, ``series_end``) as ``[ingest] record_to`` keeps it."""
    start = SeriesStart(series_id=series_id, scan_shape=(1, len(pixels)), scan_step_A=(1.0, 1.0),
                        detector_shape=pixels.shape[1:], dtype="uint16", energy_eV=300e3,
                        convergence_semiangle_mrad=20.0, defocus_A=0.0, detector_pixel_mrad=1.0)
    with RecordingWriter(path) as writer:
        writer.write(encode_series_start(start))
        for k, frame in enumerate(pixels):
            writer.write(encode_frame(series_id, k, frame))
        writer.write(encode_series_end(series_id, len(pixels)))


RECORDINGS = {"dectris_v1": dectris_recording, "dectris_v2": dectris_v2_recording, "ptylive": ptylive_recording}


@pytest.mark.parametrize("format", list(RECORDINGS))
def test_a_refused_series_exits_with_status_3(tmp_path: Path, receiver: Receiver, format: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Each format's series id is read from its own start message (SIMPLON v1 header, v2 CBOR start, msgpack
    series_start) and looked up in the daemon's registry."""
    RECORDINGS[format](tmp_path / "d.zmq", np.zeros((2, 4, 4), np.uint16))
    assert detect_format(next(read_parts(tmp_path / "d.zmq"))) == format
    server = ThreadingHTTPServer(("127.0.0.1", 0), Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert replay(str(tmp_path / "d.zmq"), "--endpoint", receiver.endpoint, "--max-rate", "--status-url",
                      url) == 3
    finally:
        server.shutdown()
        server.server_close()
    assert "refused series '9': needs 9 GiB" in capsys.readouterr().err


class MismatchStatus(BaseHTTPRequestHandler):
    """``/status`` with one series whose image count and scan disagreed (the daemon's ``count_mismatch``)."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        record = {"series_id": "9", "refusal": None, "count_mismatch": "the detector takes 320 images, the scan 256"}
        body = json.dumps({"ingest": {"registry": {"current": record, "queued": [], "finished": []}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_count_mismatch_exits_with_status_4(tmp_path: Path, receiver: Receiver,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """[scan] 16×16 and 320 triggers once replayed with exit status 0 (tests/daemon/test_serve_scan_geometry.py)."""
    dectris_recording(tmp_path / "d.zmq", np.zeros((2, 4, 4), np.uint16))
    server = ThreadingHTTPServer(("127.0.0.1", 0), MismatchStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert replay(str(tmp_path / "d.zmq"), "--endpoint", receiver.endpoint, "--max-rate", "--status-url",
                      url) == 4
    finally:
        server.shutdown()
        server.server_close()
    assert ("error: series '9': the detector's image count and the scan disagree: the detector takes 320 images"
            in capsys.readouterr().err)


def test_bad_sources_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.zmq").write_bytes(b"\x05\x00")
    assert replay(str(tmp_path / "missing.h5"), "--endpoint", "tcp://127.0.0.1:9", "--max-rate") == 2
    assert replay(str(tmp_path / "broken.zmq"), "--endpoint", "tcp://127.0.0.1:9", "--max-rate") == 2
    assert replay(str(tmp_path / "broken.zmq"), "--endpoint", "tcp://127.0.0.1:9", "--rate", "-1") == 2
    assert capsys.readouterr().err.count("error:") == 3


def test_nothing_listening_is_one_error_line_and_exit_2(small_scan: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay to an endpoint where nothing listens once printed "sent 320 frames" and exited 0."""
    import ptylive.streaming.replay as replay_module

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(replay_module, "CONNECT_TIMEOUT_S", 0.5)
    assert replay(str(small_scan), "--endpoint", f"tcp://127.0.0.1:{port}", "--max-rate", "--quiet") == 2
    err = capsys.readouterr()
    assert "error: nothing is listening at" in err.err and "sent" not in err.out


def test_an_unreachable_status_url_is_one_error_line(small_scan: Path, receiver: Receiver,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert replay(str(small_scan), "--endpoint", receiver.endpoint, "--max-rate", "--quiet", "--status-url",
                  f"http://127.0.0.1:{port}/") == 2
    assert "error: cannot read the daemon's status at" in capsys.readouterr().err


# ------------------------------------------------------------------------------- through real daemons (MPI)


def run_daemon(folder: Path, config: Any, source: Path, series_id: str, *replay_args: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start ``ptylive serve``, replay ``source`` into it, wait for the series' final; (final file, /status)."""
    from ptylive.daemon.service.process import ServeProcess
    from tests.daemon.serve_harness import PreviewListener, get_json, read_final

    process = ServeProcess(config, folder)
    context = zmq.Context()
    try:
        endpoints = process.start()
        listener = PreviewListener(context, endpoints["preview"])
        try:
            assert replay(str(source), "--endpoint", endpoints["ingest"], "--max-rate", "--status-url",
                          endpoints["http"], *replay_args) == 0
            final = listener.wait_final(series_id)
            status = get_json(endpoints["http"] + "status")
        finally:
            listener.close()
    finally:
        code = process.stop()
        context.term()
    assert code == 0, process.log_tail()
    assert final["status"] == "complete"
    return read_final(final["path"]), status


@pytest.mark.mpi
@pytest.mark.slow
def test_a_dectris_v1_recording_reconstructs_like_ptylive_stream_v1(tmp_path: Path) -> None:
    """Simulate; write a DECTRIS v1 recording (bslz4, with malformed messages between the images); replay it into
    a daemon speaking DECTRIS v1 and the same frames as a 4-D array into one speaking ptylive stream v1.

    Both daemons receive identical frames on an identical raster, so the workers' received sets and the fitted
    detector scale (sums of integer counts in float64: exact) are equal exactly. The reconstructions themselves
    are asynchronous (which iteration first sees a frame depends on timing), so the volumes are compared like the
    streaming-vs-offline test compares them: phase correlation over the scanned area."""
    import dataclasses

    from ptylive.daemon.service.config import ScanConfig
    from ptylive.gpu.quality import phase_correlation
    from ptylive.streaming.compression import compress
    from tests.daemon.serve_harness import daemon_config

    scan = tmp_path / "scan.h5"
    assert cli_main(["simulate", str(scan), "--scan", "10", "10", "--detector-px", "32", "--detector-pixel-mrad",
                     "3.0", "--dose", "1e5"]) == 0
    meta = read_metadata(scan)
    counts = np.rint(read_frames(scan, np.arange(100), np.float64)).astype(np.uint16)
    step_A = 3.0 * meta.pixel_size_A  # ptylive simulate's default --step-px
    optics = {"energy_eV": meta.energy_eV, "convergence_semiangle_mrad": meta.convergence_semiangle_mrad,
              "defocus_A": meta.defocus_A, "detector_pixel_mrad": meta.detector_pixel_mrad}

    recording = tmp_path / "dectris.zmq"
    good = [v1.image_message(42, k, frame) for k, frame in enumerate(counts)]
    blob = compress(counts[5], "bslz4")
    data = json.loads(good[5][1])
    malformed = [[json.dumps({"htype": "dmystery-1.0", "series": 42}).encode()],  # unknown_htype
                 good[5][:2],  # missing_parts (the next image begins)
                 [good[6][0], json.dumps({**data, "size": 3}).encode(), blob, good[6][3]],  # payload_size
                 [good[7][0], json.dumps({**data, "size": 40}).encode(), blob[:40], good[7][3]]]  # corrupt_payload
    with RecordingWriter(recording) as writer:
        header = v1.header_message(42, "all", {"x_pixels_in_detector": 32, "y_pixels_in_detector": 32})
        for message in [header, *good[:10], *malformed, *good[10:], v1.end_message(42)]:
            writer.write(message)

    (tmp_path / "a").mkdir()
    base = daemon_config(tmp_path / "a", final_iterations=20)
    received_copy = tmp_path / "a" / "received.zmq"
    dectris = dataclasses.replace(
        base, ingest=dataclasses.replace(base.ingest, format="dectris_v1", record_to=str(received_copy)),
        scan=ScanConfig(rows=10, cols=10, step_row_A=step_A, step_col_A=step_A, **optics))
    streamed, status = run_daemon(tmp_path / "a", dectris, recording, "42")

    (tmp_path / "b").mkdir()
    np.save(tmp_path / "cube.npy", counts.reshape(10, 10, 32, 32))
    reference, _ = run_daemon(tmp_path / "b", daemon_config(tmp_path / "b", final_iterations=20),
                              tmp_path / "cube.npy", "cube", "--step-A", repr(step_A), "--energy-eV",
                              repr(meta.energy_eV), "--convergence-mrad", repr(meta.convergence_semiangle_mrad),
                              "--defocus-A", repr(meta.defocus_A), "--detector-pixel-mrad",
                              repr(meta.detector_pixel_mrad))

    reasons = ("unknown_htype", "missing_parts", "payload_size", "corrupt_payload")
    assert {r: status["ingest"]["registry"]["rejected"][r] for r in reasons} == dict.fromkeys(reasons, 1)
    assert streamed["received"].all() and np.array_equal(streamed["received"], reference["received"])
    assert list(streamed["ranks/frames_received"]) == list(reference["ranks/frames_received"])
    assert streamed["attrs"]["detector_scale"] == reference["attrs"]["detector_scale"]
    # the same raster exactly; the corrected positions, like the volumes, depend on when each frame was first seen
    np.testing.assert_array_equal(streamed["positions_nominal_px"], reference["positions_nominal_px"])
    correlation = phase_correlation(streamed["object"], reference["object"], streamed["positions_nominal_px"])
    print(f"detector scale {streamed['attrs']['detector_scale']!r}, phase correlation {correlation:.4f}")
    assert correlation >= 0.95, correlation
    assert list(read_parts(received_copy)) == list(read_parts(recording))  # the daemon recorded what it got
