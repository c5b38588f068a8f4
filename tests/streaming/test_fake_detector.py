"""The fake detector over loopback: complete series, fault patterns, corrupt messages, pacing, errors."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from ptylive.gpu.simulate import SimulationSpec, simulate
from ptylive.streaming import fake_detector
from ptylive.streaming.fake_detector import (
    CORRUPT_REASONS,
    FakeDetector,
    FakeDetectorOptions,
    ScanSource,
    StreamAborted,
    send_order,
    stream_scan,
)
from ptylive.streaming.protocol import Frame, Message, ProtocolError, SeriesEnd, SeriesStart, decode
from ptylive.streaming.scanfile import read_frames, read_metadata, read_positions, write_scan

SPEC = SimulationSpec(detector_px=16, detector_pixel_mrad=6.0, scan_shape=(4, 5), scan_step_px=2.0, n_slices=1)
N_FRAMES = 20
Received = list[Message | ProtocolError]
Launch = Callable[[ScanSource, FakeDetectorOptions], tuple[FakeDetector, zmq.Socket]]


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated scan in counts; frame 0 starts with values to clip low, round, and clip high."""
    result = simulate(SPEC)
    intensities = result.intensities * 2e4
    intensities[0, 0, :3] = [-3.0, 2.5, 1e6]
    path = tmp_path_factory.mktemp("fake_detector") / "scan.h5"
    write_scan(path, result.metadata, intensities.astype(np.float32), result.positions_px)
    return path


@pytest.fixture
def launch() -> Iterator[Launch]:
    """Start detectors on loopback port 0, each with a connected PULL socket; always close them."""
    context = zmq.Context()
    detectors: list[FakeDetector] = []

    def start(source: ScanSource, options: FakeDetectorOptions) -> tuple[FakeDetector, zmq.Socket]:
        detector = FakeDetector(source, options, context=context)
        detectors.append(detector)
        assert detector.endpoint.startswith("tcp://127.0.0.1:") and not detector.endpoint.endswith(":0")
        pull = context.socket(zmq.PULL)
        pull.connect(detector.endpoint)
        detector.start()
        return detector, pull

    yield start
    for detector in detectors:
        detector.close()
    context.destroy(linger=0)


def receive_series(pull: zmq.Socket, timeout_s: float = 10.0) -> Received:
    """Decode every message up to and including ``series_end``; rejected ones as their ProtocolError."""
    received: Received = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        assert remaining_ms > 0 and pull.poll(remaining_ms), f"no series_end within {timeout_s} s: {received}"
        try:
            message = decode(pull.recv_multipart(copy=False))
        except ProtocolError as exc:
            received.append(exc)
            continue
        received.append(message)
        if isinstance(message, SeriesEnd):
            return received


def split(received: Received) -> tuple[SeriesStart, list[Frame], list[ProtocolError], SeriesEnd]:
    start, end = received[0], received[-1]
    assert isinstance(start, SeriesStart) and isinstance(end, SeriesEnd)
    assert not any(isinstance(m, SeriesStart | SeriesEnd) for m in received[1:-1])
    return (start, [m for m in received if isinstance(m, Frame)],
            [m for m in received if isinstance(m, ProtocolError)], end)


def tiny_source(n_frames: int, positions_A: np.ndarray | None = None) -> ScanSource:
    """``n_frames`` 4×4 frames whose pixels all equal their index."""
    start = SeriesStart(series_id="", scan_shape=(1, n_frames), scan_step_A=(1.0, 1.0), detector_shape=(4, 4),
                        dtype="", energy_eV=200e3, convergence_semiangle_mrad=25.0, defocus_A=0.0,
                        detector_pixel_mrad=2.0, positions_A=positions_A)
    return ScanSource(start, lambda indices: np.broadcast_to(indices[:, None, None], (len(indices), 4, 4)))


@pytest.mark.parametrize(("dtype", "first_pixels"),
                         [("uint16", [0, 2, 65535]), ("uint8", [0, 2, 255]), ("float32", [-3.0, 2.5, 1e6])])
def test_file_scan_arrives_complete(launch: Launch, scan_file: Path, dtype: str, first_pixels: list[float]) -> None:
    detector, pull = launch(ScanSource.from_file(scan_file), FakeDetectorOptions(series_id="a", dtype=dtype,
                                                                                 send_position=True))
    start, frames, errors, end = split(receive_series(pull))
    stats = detector.join(timeout=10)
    meta = read_metadata(scan_file)
    positions_A = read_positions(scan_file) * meta.pixel_size_A
    assert (start.series_id, start.scan_shape, start.detector_shape, start.dtype) == ("a", (1, N_FRAMES), (16, 16),
                                                                                      dtype)
    assert (start.energy_eV, start.convergence_semiangle_mrad, start.defocus_A, start.detector_pixel_mrad) == (
        meta.energy_eV, meta.convergence_semiangle_mrad, meta.defocus_A, meta.detector_pixel_mrad)
    np.testing.assert_array_equal(start.positions_A, positions_A)
    intensities = read_frames(scan_file, np.arange(N_FRAMES), dtype=np.float64)
    if dtype != "float32":
        info = np.iinfo(dtype)
        intensities = np.clip(np.rint(intensities), info.min, info.max)
    assert not errors and [f.frame_index for f in frames] == list(range(N_FRAMES))
    for frame in frames:
        assert frame.series_id == "a" and frame.pixels.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.pixels, intensities[frame.frame_index].astype(dtype))
        assert frame.position_A == tuple(positions_A[frame.frame_index])
    np.testing.assert_array_equal(frames[0].pixels[0, :3], np.array(first_pixels, dtype=dtype))
    assert end == SeriesEnd("a", N_FRAMES)
    assert (stats.frames_sent, stats.distinct_frames, stats.corrupt_sent) == (N_FRAMES, N_FRAMES, {})
    assert stats.bytes_sent > N_FRAMES * 16 * 16 * np.dtype(dtype).itemsize and stats.achieved_rate_hz > 0


def test_simulated_source_streams_its_raster(launch: Launch) -> None:
    source = ScanSource.from_simulation(SPEC)
    truth = simulate(SPEC)
    assert source.n_frames == N_FRAMES and source.start.scan_shape == SPEC.scan_shape
    assert source.start.scan_step_A == pytest.approx((2.0 * SPEC.pixel_size_A,) * 2)
    np.testing.assert_allclose(source.start.positions_A, truth.positions_px * SPEC.pixel_size_A)
    _, pull = launch(source, FakeDetectorOptions(dtype="float32"))
    start, frames, _, end = split(receive_series(pull))
    assert start.scan_shape == SPEC.scan_shape and end.n_frames == N_FRAMES
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), truth.intensities)
    assert all(f.position_A is None for f in frames)


def test_gaps_duplicates_and_reordering(launch: Launch, scan_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_detector, "CHUNK_BYTES", 3 * 16 * 16 * 8)  # read 3 frames at a time
    source = ScanSource.from_file(scan_file)
    reads: list[np.ndarray] = []

    def recording_read(indices: np.ndarray) -> np.ndarray:
        reads.append(indices.copy())
        return source.read(indices)

    recording = dataclasses.replace(source, read=recording_read)
    options = FakeDetectorOptions(drop_frames=(3, 7), duplicate_frames=(0, 7, 12), reorder_window=4, seed=1)
    detector, pull = launch(recording, options)
    _, frames, _, end = split(receive_series(pull))
    stats = detector.join(timeout=10)
    indices = [f.frame_index for f in frames]
    assert Counter(indices) == {i: 2 if i in (0, 12) else 1 for i in range(N_FRAMES) if i not in (3, 7)}
    for duplicate in (0, 12):
        assert indices[indices.index(duplicate) + 1] == duplicate  # sent twice in a row
    first_seen = list(dict.fromkeys(indices))
    assert [i // 4 for i in first_seen] == sorted(i // 4 for i in first_seen)  # shuffled only within blocks of 4
    assert first_seen != sorted(first_seen) and indices == send_order(N_FRAMES, options).tolist()
    expected = np.clip(np.rint(read_frames(scan_file, np.arange(N_FRAMES), np.float64)), 0, 65535)
    for frame in frames:
        np.testing.assert_array_equal(frame.pixels, expected[frame.frame_index])
    assert end.n_frames == 18 and (stats.frames_sent, stats.distinct_frames) == (20, 18)
    assert all(len(r) <= 3 and np.all(np.diff(r) > 0) for r in reads)  # lazy, ascending, unique chunks
    assert set(np.concatenate(reads).tolist()) == set(indices)


def test_corrupt_messages_are_rejected_and_valid_frames_still_arrive(launch: Launch, scan_file: Path) -> None:
    detector, pull = launch(ScanSource.from_file(scan_file), FakeDetectorOptions(corrupt_every=3))
    received = receive_series(pull)
    _, frames, errors, end = split(received)
    stats = detector.join(timeout=10)
    assert [e.reason for e in errors] == ["parts", "payload_size", "not_msgpack", "unknown_htype", "bad_field", "parts"]
    assert list(CORRUPT_REASONS.values()) == [e.reason for e in errors[:5]]
    for position, message in enumerate(received):
        if isinstance(message, ProtocolError):  # after every third valid frame
            frames_before = sum(isinstance(m, Frame) for m in received[:position])
            assert frames_before % 3 == 0 and isinstance(received[position - 1], Frame)
    assert [f.frame_index for f in frames] == list(range(N_FRAMES)) and end.n_frames == N_FRAMES
    assert stats.corrupt_sent == {**dict.fromkeys(CORRUPT_REASONS, 1), "truncated_multipart": 2}
    assert stats.frames_sent == N_FRAMES


def test_rate_limit_paces_frames(launch: Launch) -> None:
    began = time.monotonic()
    detector, pull = launch(tiny_source(40), FakeDetectorOptions(rate_hz=200.0))
    _, frames, _, end = split(receive_series(pull))
    elapsed_s = time.monotonic() - began
    stats = detector.join(timeout=10)
    assert len(frames) == 40 and end.n_frames == 40
    assert elapsed_s >= 0.19 and stats.seconds >= 0.19 and stats.achieved_rate_hz <= 200.0  # lower bounds only


def test_thousands_of_explicit_positions_travel_in_the_series_start(launch: Launch) -> None:
    positions_A = np.random.default_rng(0).uniform(0, 100, (4000, 2))
    _, pull = launch(tiny_source(4000, positions_A), FakeDetectorOptions(dtype="uint8"))
    start, frames, _, end = split(receive_series(pull))
    assert end.n_frames == 4000 and len(frames) == 4000
    np.testing.assert_array_equal(np.asarray(start.positions_A), positions_A)
    assert all(f.pixels[0, 0] == min(f.frame_index, 255) for f in frames)  # clipped to uint8


def test_error_in_the_thread_is_reraised_by_join(launch: Launch) -> None:
    def broken(indices: np.ndarray) -> np.ndarray:
        raise OSError("disk on fire")

    detector, pull = launch(dataclasses.replace(tiny_source(5), read=broken), FakeDetectorOptions())
    with pytest.raises(OSError, match="disk on fire"):
        detector.join(timeout=10)
    assert pull.poll(5000) and isinstance(decode(pull.recv_multipart()), SeriesStart)


def test_close_aborts_a_stream_nobody_receives() -> None:
    with FakeDetector(tiny_source(5), FakeDetectorOptions()) as detector:
        detector.start()
        with pytest.raises(TimeoutError):
            detector.join(timeout=0.2)
    with pytest.raises(StreamAborted):
        detector.join(timeout=10)


def test_stream_scan_connects_to_a_bound_receiver(scan_file: Path) -> None:
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        pull.bind("tcp://127.0.0.1:0")
        options = FakeDetectorOptions(drop_frames=(5,))
        stats = stream_scan(scan_file, pull.getsockopt_string(zmq.LAST_ENDPOINT), options, bind=False)
        _, frames, _, end = split(receive_series(pull))
    finally:
        context.destroy(linger=0)
    assert len(frames) == stats.frames_sent == N_FRAMES - 1 and end.n_frames == N_FRAMES - 1


@pytest.mark.parametrize("options", [{"dtype": "int8"}, {"rate_hz": 0.0}, {"rate_hz": float("nan")},
                                     {"reorder_window": -1}, {"corrupt_every": -2}])
def test_invalid_options_are_rejected(options: dict) -> None:
    with pytest.raises(ValueError):
        FakeDetectorOptions(**options)


@pytest.mark.parametrize("options", [{"drop_frames": (20,)}, {"duplicate_frames": (-1,)}])
def test_frame_indices_outside_the_scan_are_rejected(options: dict) -> None:
    with pytest.raises(ValueError, match="outside the scan's 20 frames"):
        FakeDetector(tiny_source(20), FakeDetectorOptions(**options))
