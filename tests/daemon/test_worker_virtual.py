"""A worker's virtual detector values: computed per frame as the store takes it, sent as ``virtual`` messages that
rank 0's views place where the frames lie in the scan."""

from __future__ import annotations

import dataclasses
import logging
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.config import ReconstructionConfig, config_from_mapping
from ptylive.daemon.worker.frames import FrameStore
from ptylive.daemon.worker.rank import Worker, WorkerSettings
from ptylive.daemon.worker.virtual import VirtualFrames, probe_amplitude, series_detector
from ptylive.streaming.detector_frames import DetectorCrop
from ptylive.streaming.protocol import Frame, SeriesStart
from ptylive.streaming.virtual_images import default_detector, frame_values

D = 32
START = SeriesStart(series_id="v-1", scan_shape=(6, 8), scan_step_A=(1.0, 1.0), detector_shape=(D, D),
                    dtype="float32", energy_eV=300e3, convergence_semiangle_mrad=8.0, defocus_A=0.0,
                    detector_pixel_mrad=1.0)


def patterns(n: int, seed: int = 0) -> np.ndarray:
    """Poisson counts of a bright disk shifted per frame, so BF, ADF and CoM all vary."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:D, 0:D] - D // 2
    frames = []
    for k in range(n):
        dy, dx = rng.uniform(-2, 2, 2)
        disk = np.where((y - dy) ** 2 + (x - dx) ** 2 <= 8 ** 2, 50.0, 0.5 + 0.1 * k)
        frames.append(rng.poisson(disk).astype(np.float32))
    return np.stack(frames)


@pytest.mark.parametrize("upsampling", [1, 2])
def test_the_rings_are_the_stored_frames_angles(upsampling: int) -> None:
    geometry = series_geometry(START, 1, upsampling)
    assert geometry.detector_pixel_mrad == pytest.approx(START.detector_pixel_mrad, rel=1e-12)
    detector = series_detector(START, geometry)
    assert detector.convergence_semiangle_mrad == 8.0
    np.testing.assert_allclose(detector.annuli_mrad, [[12.0, 16.0]], rtol=1e-12)  # 1.5 α to the edge, (D // 2)·Δθ


def test_a_cropped_binned_detectors_rings_use_the_binned_pixel() -> None:
    """A 514 × 1030 detector cropped to 64 px and binned 2 × 2: 32-px frames of pixels twice the detector's."""
    start = dataclasses.replace(START, detector_shape=(514, 1030), detector_pixel_mrad=0.5,
                                detector_crop=DetectorCrop(200, 500, 64, 2))
    geometry = series_geometry(start, 1, 1)
    assert geometry.detector_px == 32
    assert geometry.detector_pixel_mrad == pytest.approx(1.0, rel=1e-12)  # 0.5 mrad binned 2 x 2
    np.testing.assert_allclose(series_detector(start, geometry).annuli_mrad, [[12.0, 16.0]], rtol=1e-12)
    store = FrameStore.allocate(geometry, 0, "amplitude", np, np.float32)
    store.virtual = VirtualFrames(series_detector(start, geometry), store.global_index, geometry.detector_px)
    raw = np.random.default_rng(6).poisson(3.0, (514, 1030)).astype(np.float32)
    assert store.add(Frame(start.series_id, 3, raw))
    taken = store.virtual.take()
    assert taken is not None  # the values of the frame as stored: cropped and binned
    stored = geometry.detector.apply(raw, np.float32)[None]
    np.testing.assert_allclose(taken[1]["bf"], frame_values(stored, store.virtual.detector)["bf"], rtol=1e-6)


def test_virtual_frames_give_frame_values_and_each_frame_once() -> None:
    detector = default_detector(8.0, 1.0, D)
    frames = patterns(5)
    frames[3] = 0  # an empty frame: CoM NaN
    virtual = VirtualFrames(detector, np.array([10, 11, 12, 13, 14]), D)
    for row in (4, 1, 3):
        virtual.add(row, frames[row])
    assert virtual.pending == 3
    taken = virtual.take()
    assert taken is not None and virtual.take() is None  # sent once
    indices, values = taken
    assert indices.tolist() == [14, 11, 13] and list(values) == ["bf", "adf0", "com_x", "com_y"]
    expected = frame_values(frames[[4, 1, 3]], detector)
    for kind, got in values.items():
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected[kind], rtol=1e-6, equal_nan=True)
    assert np.isnan(values["com_x"][2]) and values["bf"][2] == 0


def test_the_frame_store_sums_what_it_stores_before_it_becomes_a_loss_target() -> None:
    geometry = series_geometry(START, 1, 1)
    store = FrameStore.allocate(geometry, 0, "amplitude", np, np.float32)
    store.virtual = VirtualFrames(series_detector(START, geometry), store.global_index, D)
    frames = patterns(3, seed=1)
    for index in (0, 7, 7):  # the duplicate is refused by the store, and not summed twice
        store.add(Frame(START.series_id, index, frames[min(index, 2)]))
    store.set_scale(2.0)  # the rows become loss targets; the sums were taken before
    taken = store.virtual.take()
    assert taken is not None
    indices, values = taken
    assert indices.tolist() == [0, 7]
    np.testing.assert_allclose(values["bf"], frame_values(frames[[0, 2]], store.virtual.detector)["bf"], rtol=1e-6)


class Outbox:
    """What a worker's PUSH to rank 0 would carry: every message, decoded."""

    def __init__(self) -> None:
        self.messages: list[rank_messages.RankMessage] = []

    def send_multipart(self, parts: list[Any], copy: bool = True) -> None:
        self.messages.append(rank_messages.decode([bytes(part) for part in parts]))

    def of(self, htype: str) -> list[Any]:
        return [m for m in self.messages if m.htype == htype]


class Inbox:
    def poll(self, timeout_ms: int = 0) -> list[Any]:
        return []


def test_a_worker_sends_the_virtual_values_of_the_frames_it_stored() -> None:
    outbox = Outbox()
    settings = WorkerSettings(0, 1, ReconstructionConfig(), preview_rate_hz=2.0)
    worker = Worker(settings, Inbox(), outbox, None)  # type: ignore[arg-type]
    worker.handle(START)
    frames = patterns(START.n_positions, seed=2)
    for index in (5, 6, 40):
        worker.handle(Frame(START.series_id, index, frames[index]))
    worker.drain()
    assert outbox.of("virtual") == []  # only the running series' values are sent (a queued one's wait)
    worker._running = START.series_id  # noqa: SLF001 - what run() sets while it refines the series
    worker.drain()
    worker.drain()  # not due again yet
    sent = outbox.of("virtual")
    assert len(sent) == 1
    header, arrays = sent[0].header, sent[0].arrays
    assert header["series_id"] == "v-1" and header["worker"] == 0 and header["kinds"] == ["bf", "adf0", "com_x",
                                                                                            "com_y"]
    assert header["convergence_semiangle_mrad"] == 8.0
    assert header["annuli_mrad"] == [pytest.approx([12.0, 16.0], rel=1e-12)]
    assert arrays[0].dtype == np.int64 and arrays[0].tolist() == [5, 6, 40]
    assert all(a.dtype == np.float32 and a.shape == (3,) for a in arrays[1:])

    expected = frame_values(frames[[5, 6, 40]], series_detector(START, series_geometry(START, 1, 1)))
    for kind, got in zip(header["kinds"], arrays[1:], strict=True):
        np.testing.assert_allclose(got, expected[kind], rtol=1e-6)

    worker.handle(Frame(START.series_id, 47, frames[47]))
    worker._send_virtual(worker.slots["v-1"].store)  # noqa: SLF001 - what _send_final does first
    assert outbox.of("virtual")[-1].arrays[0].tolist() == [47]


def test_per_frame_cost_of_128_px_frames() -> None:
    """The worker's cost per stored frame (numpy, the product and the frame sum): printed; bounded loosely against
    regressions. ``ptylive serve`` runs its ranks with one BLAS thread (``OPENBLAS_NUM_THREADS=1``): run it so to
    see the daemon's figure (docs/daemon.md, "Virtual images")."""
    detector = default_detector(20.0, 0.5, 128)
    virtual = VirtualFrames(detector, np.arange(2000), 128)
    frames = np.random.default_rng(3).poisson(5.0, (16, 128, 128)).astype(np.float32)
    for row in range(16):
        virtual.add(row, frames[row])  # warm
    began = time.perf_counter()
    for row in range(2000):
        virtual.add(row, frames[row % 16])
    per_frame_us = (time.perf_counter() - began) / 2000 * 1e6
    taken = virtual.take()
    assert taken is not None and len(taken[0]) == 2016
    print(f"virtual values: {per_frame_us:.1f} µs per 128×128 frame")
    assert per_frame_us < 2000


@pytest.mark.gpu
def test_cupy_sums_stay_on_the_device_until_taken() -> None:
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    detector = default_detector(8.0, 1.0, D)
    frames = patterns(4, seed=4)
    virtual = VirtualFrames(detector, np.arange(4), D, cupy)
    for row in range(4):
        virtual.add(row, cupy.asarray(frames[row]))
    taken = virtual.take()
    assert taken is not None
    expected = frame_values(frames, detector)
    for kind, got in taken[1].items():
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, expected[kind], rtol=1e-6)


def test_the_frames_running_sum_and_the_probe_amplitude() -> None:
    frames = patterns(4, seed=7)
    virtual = VirtualFrames(default_detector(8.0, 1.0, D), np.arange(4), D)
    assert virtual.pattern()[1] == 0
    for row in range(3):
        virtual.add(row, frames[row])
    total, n = virtual.pattern()
    assert n == 3 and total.dtype == np.float64
    np.testing.assert_allclose(total, frames[:3].sum(axis=0, dtype=np.float64))
    virtual.add(3, frames[3])
    assert virtual.pattern()[1] == 4 and n == 3 and total[0, 0] == frames[:3, 0, 0].sum()  # a copy, not the sum

    modes = np.stack([np.full((300, 300), 3.0 + 0j), np.full((300, 300), 4.0j)])  # √(3² + 4²) = 5 everywhere
    amplitude, factor = probe_amplitude(modes)
    assert factor == 3 and amplitude.shape == (100, 100) and amplitude.dtype == np.float32
    np.testing.assert_allclose(amplitude, 5.0, rtol=1e-6)
    single, factor = probe_amplitude(np.full((64, 64), 2j, np.complex64))
    assert factor == 1 and single.shape == (64, 64) and np.allclose(single, 2.0)


def test_a_worker_sends_its_frame_sum_and_worker_0_its_probe() -> None:
    outbox = Outbox()
    worker = Worker(WorkerSettings(0, 1, ReconstructionConfig()), Inbox(), outbox, None)  # type: ignore[arg-type]
    worker.handle(START)
    frames = patterns(START.n_positions, seed=8)
    for index in (1, 2):
        worker.handle(Frame(START.series_id, index, frames[index]))
    store = worker.slots[START.series_id].store
    worker._send_pattern(store, None)  # noqa: SLF001 - what drain() sends with the virtual values
    worker._send_pattern(store, None)  # noqa: SLF001 - nothing new: nothing sent
    sent = outbox.of("pattern")
    assert len(sent) == 1 and len(sent[0].arrays) == 1
    assert sent[0].header["frames_summed"] == 2 and sent[0].header["probe_factor"] == 0
    np.testing.assert_allclose(sent[0].arrays[0], frames[[1, 2]].sum(axis=0))

    probe = np.full((D, D), 0.5 + 0.5j, np.complex64)
    run = SimpleNamespace(store=store, iterations=3, state=SimpleNamespace(probe=probe))
    worker._send_pattern(store, run)  # type: ignore[arg-type]  # noqa: SLF001 - while worker 0 refines
    with_probe = outbox.of("pattern")[-1]
    assert with_probe.header["probe_factor"] == 1 and with_probe.header["iteration"] == 3
    np.testing.assert_allclose(with_probe.arrays[1], np.sqrt(0.5), rtol=1e-6)


def test_configured_rings_give_one_adf_image_each_cut_at_the_frames_edge(caplog: pytest.LogCaptureFixture) -> None:
    """``[virtual] adf_annuli_mrad`` reaches the worker: 32 px frames of 1 mrad have their inscribed edge at 16 mrad,
    so [12, 20] is cut to [12, 16] and [17, 30] (wholly past it) is left out, each said at WARNING. Each ADF value is
    the frame's counts at angles inner <= θ < outer, summed here straight from the pixel angles."""
    config = config_from_mapping({"virtual": {"adf_annuli_mrad": [[9, 12], [12, 20], [17, 30]]}})
    settings = WorkerSettings(0, 1, ReconstructionConfig(), adf_annuli_mrad=config.virtual.annuli_mrad)
    outbox = Outbox()
    worker = Worker(settings, Inbox(), outbox, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.worker.virtual"):
        worker.handle(START)
    assert [r.getMessage() for r in caplog.records] == [
        "series 'v-1': ADF ring 12–20 mrad cut to 12–16 mrad, the frames' edge ([virtual] adf_annuli_mrad; "
        "32 px frames of 1 mrad)",
        "series 'v-1': ADF ring 17–30 mrad left out: it lies past the frames' edge at 16 mrad ([virtual] "
        "adf_annuli_mrad; 32 px frames of 1 mrad)"]
    frames = patterns(START.n_positions, seed=9)
    for index in (3, 4):
        worker.handle(Frame(START.series_id, index, frames[index]))
    worker._send_virtual(worker.slots[START.series_id].store)  # noqa: SLF001 - what drain() sends
    (sent,) = outbox.of("virtual")
    assert sent.header["kinds"] == ["bf", "adf0", "adf1", "com_x", "com_y"]
    assert sent.header["annuli_mrad"] == [[9.0, 12.0], [12.0, 16.0]]
    y, x = np.mgrid[0:D, 0:D] - D // 2
    theta_mrad = np.hypot(y, x) * START.detector_pixel_mrad
    for kind, (inner, outer) in (("adf0", (9, 12)), ("adf1", (12, 16))):
        ring = (theta_mrad >= inner) & (theta_mrad < outer)
        got = sent.arrays[1 + sent.header["kinds"].index(kind)]
        np.testing.assert_allclose(got, frames[[3, 4]][:, ring].sum(axis=1), rtol=1e-6)  # float32 sums of counts


def test_no_configured_rings_means_no_adf_image_and_the_default_stays_one_ring() -> None:
    geometry = series_geometry(START, 1, 1)
    assert series_detector(START, geometry, ()).annuli_mrad == ()
    assert series_detector(START, geometry, None) == series_detector(START, geometry)
    np.testing.assert_allclose(series_detector(START, geometry).annuli_mrad, [[12.0, 16.0]], rtol=1e-12)
