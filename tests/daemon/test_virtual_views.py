"""Rank 0's virtual images: placed per series view (and released with it), served over HTTP, published on the PUB
and as events, and written into the final file's ``virtual/`` group."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from PIL import Image

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.http.server import Providers, StatusServer
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.collector import Collector, CollectorHooks
from ptylive.daemon.service.config import ReconstructionConfig
from ptylive.daemon.service.final_writer import FinalOutcome
from ptylive.daemon.service.publisher import Publisher
from ptylive.daemon.service.results import write_final
from ptylive.daemon.service.series_views import SeriesViews
from ptylive.daemon.service.virtual_mosaic import VirtualMosaic
from ptylive.daemon.worker.rank import Worker, WorkerSettings
from ptylive.daemon.worker.virtual import series_detector
from ptylive.streaming.protocol import Frame, SeriesStart
from ptylive.streaming.series_book import SeriesProgress
from ptylive.streaming.virtual_images import VirtualDetector, frame_values
from tests.daemon.test_worker_virtual import START as WORKER_START
from tests.daemon.test_worker_virtual import Inbox, Outbox, patterns

START = SeriesStart(series_id="vv-1", scan_shape=(4, 6), scan_step_A=(1.0, 1.0), detector_shape=(32, 32),
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)
OTHER = SeriesStart(**{**START.__dict__, "series_id": "vv-2"})
KINDS = ["bf", "adf0", "com_x", "com_y"]


@pytest.fixture(scope="module")
def geometry() -> SeriesGeometry:
    return series_geometry(START, 2, 1)


def lookup(geometry: SeriesGeometry) -> Any:
    starts = {s.series_id: s for s in (START, OTHER)}
    return lambda series_id: (starts[series_id], geometry) if series_id in starts else None


def virtual_message(indices: list[int], series_id: str = "vv-1", worker: int = 0,
                    n_kinds: int | None = None) -> rank_messages.RankMessage:
    """Kind ``j``'s value of frame ``i`` is ``10 j + 1 + i``; ``n_kinds``: send that many value arrays instead."""
    index = np.asarray(indices, dtype=np.int64)
    header: rank_messages.VirtualHeader = {
        "series_id": series_id, "worker": worker, "kinds": KINDS, "convergence_semiangle_mrad": 20.0,
        "detector_pixel_mrad": 2.0, "annuli_mrad": [[30.0, 32.0]], "sent_s": time.time()}
    n = len(KINDS) if n_kinds is None else n_kinds
    arrays = [index, *(np.float32(10 * j + 1) + index.astype(np.float32) for j in range(n))]
    return rank_messages.decode([bytes(p) for p in rank_messages.encode("virtual", header, *arrays)])


def final_message(geometry: SeriesGeometry, worker: int, series_id: str = "vv-1") -> rank_messages.RankMessage:
    tile = geometry.domains[worker].tile
    header = {"series_id": series_id, "worker": worker, "status": "complete", "iterations": 2,
              "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "loss_history": [1.0, 0.5],
              "frames_history": [3, 3], "scale": 1.0, "slice_thickness_A": 1.0, "rejected": {},
              "received": [int(i) for i in geometry.domains[worker].positions], "stats": {},
              "frames_used": 3, "frames_received": 3, "frames_expected": 12, "loss": 0.5, "loss_per_frame": 0.2,
              "convergence_rate": None, "wait_fraction": 0.0, "staleness_max": 0}
    volume = np.ones((1, tile.row1 - tile.row0, tile.col1 - tile.col0), np.complex64)
    return rank_messages.decode([bytes(p) for p in rank_messages.encode(
        "final", header, volume, np.ones((32, 32), np.complex64))])  # type: ignore[call-overload]


def grey(png: bytes | None) -> np.ndarray:
    assert png is not None
    return np.asarray(Image.open(io.BytesIO(png)))


def test_values_land_per_series_and_unknown_or_malformed_ones_are_counted(geometry: SeriesGeometry) -> None:
    views = SeriesViews(lookup(geometry), 2)
    assert views.virtual_index() == {"series_id": None, "scan_shape": None, "frames_filled": 0,
                                     "frames_expected": 0, "images": []}
    assert views.virtual_png("bf") is None
    views.handle(virtual_message([0, 1, 2]))
    views.handle(virtual_message([23, 24, -1], worker=1))  # 24 and -1 lie outside the 4 × 6 scan
    views.handle(virtual_message([5], series_id="nobody"))  # an unknown series: counted, nothing raised
    views.handle(virtual_message([6, 7], n_kinds=2))  # arrays that do not match its kinds
    assert views.status()["virtual_frames_dropped"] == 2 + 1 + 2
    index = views.virtual_index()
    assert index["series_id"] == "vv-1" and index["scan_shape"] == [4, 6] and index["frames_filled"] == 4
    assert index["frames_expected"] == 24
    entries = {entry["kind"]: entry for entry in index["images"]}
    assert list(entries) == ["bf", "adf0", "com_x", "com_y", "idpc"]
    assert entries["bf"]["finite_min"] == 1.0 and entries["bf"]["finite_max"] == 24.0
    assert entries["bf"]["units"] == "counts" and entries["bf"]["outer_mrad"] == 20.0
    assert (entries["adf0"]["inner_mrad"], entries["adf0"]["outer_mrad"]) == (30.0, 32.0)
    assert entries["com_x"]["units"] == "mrad" and entries["idpc"]["units"] == "mrad·px"
    bf = grey(views.virtual_png("bf"))
    assert bf.shape == (4, 6) and bf[0, 0] == 0 and bf[3, 5] == 255  # finite min black, max white
    assert (bf[1:3] == 0).all()  # NaN (no frame yet) black
    assert views.virtual_png("adf7") is None


def test_a_workers_own_message_lands_where_its_frames_lie_in_the_scan() -> None:
    """A worker's ``virtual`` message, as it sends it (the round trip), placed by rank 0's views."""
    outbox = Outbox()
    worker = Worker(WorkerSettings(0, 1, ReconstructionConfig()), Inbox(), outbox, None)  # type: ignore[arg-type]
    worker.handle(WORKER_START)
    frames = patterns(WORKER_START.n_positions, seed=5)
    arrived = [5, 6, 40]
    for index in arrived:
        worker.handle(Frame(WORKER_START.series_id, index, frames[index]))
    worker._send_virtual(worker.slots[WORKER_START.series_id].store)  # noqa: SLF001 - what drain() sends when due
    message = outbox.of("virtual")[0]
    geometry = series_geometry(WORKER_START, 1, 1)
    views = SeriesViews(lambda series_id: (WORKER_START, geometry) if series_id == WORKER_START.series_id else None, 1)
    update = views.handle(message)
    assert update.started is not None and update.started["series_id"] == WORKER_START.series_id  # starts a view
    index = views.virtual_index()
    assert index["scan_shape"] == [6, 8] and index["frames_filled"] == 3 and index["frames_expected"] == 48
    snapshot = views.virtual_snapshot()
    assert snapshot is not None
    expected = frame_values(frames[arrived], series_detector(WORKER_START, geometry))
    for kind in ("bf", "adf0", "com_x", "com_y"):
        image = snapshot.images[kind]
        assert image.shape == (6, 8) and np.isnan(image).sum() == 48 - 3
        np.testing.assert_allclose([image[0, 5], image[0, 6], image[5, 0]], expected[kind], rtol=1e-6)


def test_a_view_keeps_its_virtual_images_until_it_is_released(geometry: SeriesGeometry, tmp_path: Path) -> None:
    views = SeriesViews(lookup(geometry), 2)
    views.handle(virtual_message(list(range(24))))
    job = None
    for worker in (0, 1):
        job = views.handle(final_message(geometry, worker)).final_job
    assert job is not None and job.virtual is not None and job.virtual.frames_filled == 24
    views.finished(FinalOutcome(job, tmp_path / "vv-1.h5"))
    assert views.virtual_index()["frames_filled"] == 24  # the finished series stays the latest until the next
    views.handle(virtual_message([3], series_id="vv-2"))  # the next series: the first one's view is released
    assert views.virtual_index()["series_id"] == "vv-2" and views.virtual_index()["frames_filled"] == 1
    assert "vv-1" not in views._views  # noqa: SLF001 - its mosaic went with it
    views.handle(virtual_message([0, 1], series_id="vv-1"))  # a late message about the written series: dropped
    assert views.status()["virtual_frames_dropped"] == 2


def test_the_final_file_holds_the_scan_shaped_virtual_images(geometry: SeriesGeometry, tmp_path: Path) -> None:
    mosaic = VirtualMosaic("vv-1", (4, 6), VirtualDetector(20.0, 2.0, ((30.0, 32.0),)))
    arrived = np.array([0, 1, 2, 3, 10, 23])
    mosaic.add(arrived, {kind: arrived + 0.5 for kind in KINDS})
    finals = [final_message(geometry, w) for w in (0, 1)]
    path = write_final(tmp_path, START, geometry, finals, {}, virtual=mosaic.snapshot())  # type: ignore[arg-type]
    with h5py.File(path, "r") as f:
        group = f["virtual"]
        assert sorted(group) == ["adf0", "bf", "com_x", "com_y", "idpc"]
        bf = group["bf"][...]
        assert bf.dtype == np.float32 and bf.shape == (4, 6)
        assert np.isfinite(bf.reshape(-1)[arrived]).all() and np.isnan(bf).sum() == 24 - len(arrived)
        assert bf[1, 4] == 10.5
        assert group["bf"].attrs["units"] == "counts" and group["com_x"].attrs["units"] == "mrad"
        assert group["adf0"].attrs["inner_mrad"] == 30.0 and np.isnan(group["com_x"].attrs["inner_mrad"])
        assert group.attrs["convergence_semiangle_mrad"] == 20.0 and group.attrs["frames_filled"] == 6
        np.testing.assert_array_equal(group.attrs["annuli_mrad"], [[30.0, 32.0]])
    no_virtual = write_final(tmp_path, START, geometry, finals, {})  # type: ignore[arg-type]
    with h5py.File(no_virtual, "r") as f:
        assert "virtual" not in f


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_http_serves_virtual_json_and_png(geometry: SeriesGeometry) -> None:
    views = SeriesViews(lookup(geometry), 2)
    providers = Providers(status=dict, tiles=dict, preview_png=lambda: None, virtual_index=views.virtual_index,
                          virtual_png=views.virtual_png)
    with StatusServer(providers) as server:
        status, kind, body = get(server.url + "virtual.json")
        assert status == 200 and json.loads(body)["images"] == [] and json.loads(body)["series_id"] is None
        status, kind, body = get(server.url + "virtual.png?kind=bf")
        assert status == 404 and kind == "application/json" and "no virtual image 'bf'" in json.loads(body)["error"]
        views.handle(virtual_message([0, 7]))
        status, kind, body = get(server.url + "virtual.json")
        assert status == 200 and json.loads(body)["frames_filled"] == 2
        status, kind, body = get(server.url + "virtual.png?kind=com_x&v=vv-1.2")
        assert status == 200 and kind == "image/png" and grey(body).shape == (4, 6)
        assert get(server.url + "virtual.png?kind=idpc")[0] == 200
        assert get(server.url + "virtual.png?kind=adf9")[0] == 404
        assert get(server.url + "virtual.png")[0] == 400  # no kind
        assert get(server.url + "virtual.png?kind=../x")[0] == 400
    with StatusServer(Providers(status=dict, tiles=dict, preview_png=lambda: None)) as bare:
        assert get(bare.url + "virtual.json")[0] == 404  # a daemon without virtual images: the viewer stops asking


class Recorder:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, parts: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        self.sent.append([bytes(p) for p in parts])


def test_each_change_is_published_once_with_one_image_per_kind(geometry: SeriesGeometry) -> None:
    views = SeriesViews(lookup(geometry), 2)
    recorder = Recorder()
    publisher = Publisher(recorder, rate_hz=2.0)
    assert views.take_virtual() is None
    views.handle(virtual_message([0, 1, 2, 3]))
    with publisher.events.subscribe() as subscription:
        snapshot = views.take_virtual()
        assert snapshot is not None and views.take_virtual() is None  # published once per change
        publisher.virtual(snapshot)
        event = subscription.next(1.0)
    assert event is not None and event.name == "virtual"
    data = json.loads(event.data)
    assert data["frames_filled"] == 4 and data["kinds"] == ["bf", "adf0", "com_x", "com_y", "idpc"]
    assert "htype" not in data and "dtype" not in data
    header = msgpack.unpackb(recorder.sent[0][0])
    assert header["htype"] == "virtual" and header["scan_shape"] == [4, 6] and len(recorder.sent[0]) == 1 + 5
    bf = np.frombuffer(recorder.sent[0][1], dtype=header["dtype"]).reshape(header["scan_shape"])
    np.testing.assert_array_equal(bf.reshape(-1)[:4], [1, 2, 3, 4])
    assert np.isnan(bf.reshape(-1)[4:]).all()
    assert not publisher.virtual_due()  # at most rate_hz


@pytest.fixture
def collector(geometry: SeriesGeometry, tmp_path: Path) -> Iterator[tuple[Collector, zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    hooks = CollectorHooks(series=lookup(geometry), progress=lambda series_id: SeriesProgress(START, 1, 24))
    running = Collector(context, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", hooks, tmp_path, n_workers=2,
                        rate_hz=50.0)
    push, sub = context.socket(zmq.PUSH), context.socket(zmq.SUB)
    push.linger = sub.linger = 0
    push.connect(running.pull_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(running.pub_endpoint)
    running.start()
    time.sleep(0.2)  # the subscription reaches the PUB
    try:
        yield running, push, sub
    finally:
        push.close()
        sub.close()
        running.close()
        context.term()


def test_the_collector_takes_virtual_messages_and_publishes_them_before_the_final(
        collector: tuple[Collector, zmq.Socket, zmq.Socket], geometry: SeriesGeometry, tmp_path: Path) -> None:
    running, push, sub = collector

    def send(message: rank_messages.RankMessage) -> None:
        push.send_multipart(rank_messages.encode(message.htype, message.header, *message.arrays))  # type: ignore

    with running.events.subscribe() as subscription:
        send(virtual_message([0, 1]))
        send(virtual_message([99], series_id="nobody"))  # never crashes the collector thread
        send(virtual_message(list(range(2, 24)), worker=1))
        for worker in (0, 1):
            send(final_message(geometry, worker))
        names = []
        while "series_end" not in names:
            event = subscription.next(10.0)
            assert event is not None, f"events so far: {names}"
            names.append(event.name)
    assert names[0] == "series_start" and "virtual" in names and names.index("virtual") < names.index("series_end")
    published = []
    while sub.poll(1000):
        parts = sub.recv_multipart()
        published.append((msgpack.unpackb(parts[0]), parts[1:]))
    htypes = [header["htype"] for header, _ in published]
    assert htypes[-1] == "final" and "virtual" in htypes
    last = [header for header, _ in published if header["htype"] == "virtual"][-1]
    assert last["frames_filled"] == 24  # every frame's values went out before the final
    assert running.thread_state() == (True, None) and running.views.status()["virtual_frames_dropped"] == 1
    with h5py.File(tmp_path / "vv-1.h5", "r") as f:
        assert np.isfinite(f["virtual/bf"][...]).all()


def pattern_message(worker: int, total: np.ndarray, frames: int, probe: np.ndarray | None = None,
                    series_id: str = "vv-1") -> rank_messages.RankMessage:
    header: rank_messages.PatternHeader = {
        "series_id": series_id, "worker": worker, "frames_summed": frames, "probe_factor": 0 if probe is None else 2,
        "iteration": 0 if probe is None else 5, "sent_s": time.time()}
    arrays = (total,) if probe is None else (total, probe)
    return rank_messages.decode([bytes(p) for p in rank_messages.encode("pattern", header, *arrays)])


def test_the_mean_pattern_sums_every_workers_frames_and_the_probe_is_worker_0s(geometry: SeriesGeometry,
                                                                                 tmp_path: Path) -> None:
    views = SeriesViews(lookup(geometry), 2)
    assert views.diffraction_png() is None and views.probe_png() is None and views.take_pattern() is None
    y, x = np.mgrid[0:32, 0:32] - 16
    disk = np.where(x * x + y * y <= 36, 1000.0, 1.0)  # a bright-field disk over a faint dark field
    views.handle(pattern_message(0, 3 * disk, 3))
    views.handle(pattern_message(1, 2 * disk, 1))  # this worker's frames are twice as bright
    views.handle(pattern_message(1, 6 * disk, 3))  # its running sum replaces the one before
    views.handle(pattern_message(1, np.ones((8, 8)), 1))  # not the series' D x D: ignored
    view = views._views["vv-1"]  # noqa: SLF001
    mean = view.mean_pattern()
    assert mean is not None and mean[1] == 6
    np.testing.assert_allclose(mean[0], 1.5 * disk)
    event = views.take_pattern()
    assert event == {"series_id": "vv-1", "frames_summed": 6, "detector_px": 32, "probe_shape": None, "version": 3}
    assert views.take_pattern() is None  # once per change
    shown = grey(views.diffraction_png())
    assert shown.shape == (32, 32) and shown[16, 16] == 255 and shown[0, 0] == 0  # log(1 + mean): min black
    expected = np.log1p(1.5 * disk)
    assert shown[16, 22] == 255 and shown[16, 23] == 0  # the disk's edge at 6 px, nothing between on this scale
    assert np.array_equal(shown, np.rint((expected - expected.min()) / np.ptp(expected) * 255))

    probe = np.outer(np.hanning(16), np.hanning(16)).astype(np.float32)
    views.handle(pattern_message(0, 4 * disk, 4, probe))
    image = grey(views.probe_png())
    assert image.shape == (16, 16) and image.max() == 255 and image[0, 0] == 0
    assert views.take_pattern()["probe_shape"] == [16, 16]  # type: ignore[index]
    views.handle(pattern_message(0, 5 * disk, 5))  # later sums without a probe keep the last one
    assert views.probe_png() is not None
    providers = Providers(status=dict, tiles=dict, preview_png=lambda: None, diffraction_png=views.diffraction_png,
                          probe_png=views.probe_png)
    with StatusServer(providers) as server:
        for path in ("diffraction.png", "probe.png"):
            status, kind, body = get(server.url + path + "?v=vv-1.4")
            assert status == 200 and kind == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    empty = SeriesViews(lookup(geometry), 2)
    with StatusServer(Providers(status=dict, tiles=dict, preview_png=lambda: None,
                                diffraction_png=empty.diffraction_png, probe_png=empty.probe_png)) as server:
        for path in ("diffraction.png", "probe.png"):
            status, kind, body = get(server.url + path)
            assert status == 404 and "image (yet)" in json.loads(body)["error"]
