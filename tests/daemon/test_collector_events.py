"""Rank 0's collector as the viewer sees it: events on its hub, per-slice mosaics, the final coverage map.

Tile previews and finals are pushed into a real collector over loopback ZMQ, as worker ranks send them.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.http.sse import ServerEvent, Subscription
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.collector import Collector, CollectorHooks
from ptylive.daemon.service.final_writer import FinalWriter
from ptylive.daemon.service.series_views import coverage_map
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.series_book import SeriesProgress

START = SeriesStart(series_id="c-1", scan_shape=(6, 8), scan_step_A=(1.0, 1.0), detector_shape=(32, 32),
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)
N_SLICES = 3


@pytest.fixture
def geometry() -> SeriesGeometry:
    return series_geometry(START, 2, 1)


@pytest.fixture
def collector(geometry: SeriesGeometry, tmp_path: Path) -> Iterator[tuple[Collector, zmq.Socket]]:
    context = zmq.Context()
    hooks = CollectorHooks(series=lambda series_id: (START, geometry) if series_id == START.series_id else None,
                           progress=lambda series_id: SeriesProgress(START, 17, START.n_positions))
    running = Collector(context, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", hooks, tmp_path, n_workers=2,
                        rate_hz=50.0)
    push = context.socket(zmq.PUSH)
    push.linger = 0
    push.connect(running.pull_endpoint)
    running.start()
    try:
        yield running, push
    finally:
        push.close()
        running.close()
        context.term()


def send_preview(push: zmq.Socket, geometry: SeriesGeometry, worker: int, iteration: int, factor: int = 2) -> None:
    tile = geometry.domains[worker].tile
    shape = (-(-(tile.row1 - tile.row0) // factor), -(-(tile.col1 - tile.col0) // factor))
    slices = np.stack([np.full(shape, 10.0 * worker + s + iteration, np.float32) for s in range(N_SLICES)])
    header = {"series_id": START.series_id, "worker": worker, "iteration": iteration, "factor": factor,
              "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "frames_used": 5, "frames_received": 5 + worker,
              "frames_expected": 24, "loss": 2.0, "loss_per_frame": 0.4, "convergence_rate": float("nan"),
              "wait_fraction": 0.1, "staleness_max": 1}
    push.send_multipart(rank_messages.encode("preview", header, slices.sum(axis=0), slices), copy=False)


def next_event(subscription: Subscription, name: str) -> ServerEvent:
    while True:
        event = subscription.next(5.0)
        assert event is not None, f"no {name!r} event within 5 s"
        if event.name == name:
            return event


def test_previews_become_events_and_slice_mosaics(collector: tuple[Collector, zmq.Socket],
                                                   geometry: SeriesGeometry) -> None:
    running, push = collector
    with running.events.subscribe() as subscription:
        send_preview(push, geometry, worker=0, iteration=1)
        start = json.loads(next_event(subscription, "series_start").data)
        assert start == {"series_id": "c-1", "frames_expected": 48, "object_shape": list(geometry.object_shape)}
        preview = json.loads(next_event(subscription, "preview").data)
        send_preview(push, geometry, worker=1, iteration=2)
        while len(preview["tiles"]) < 2:
            preview = json.loads(next_event(subscription, "preview").data)
    assert "htype" not in preview and "dtype" not in preview
    assert preview["series_id"] == "c-1" and preview["n_slices"] == N_SLICES and preview["version"] == 2
    assert preview["object_shape"] == list(geometry.object_shape) and preview["frames_received"] == 17
    assert [t["frames_received"] for t in preview["tiles"]] == [5, 6]
    assert preview["tiles"][0]["convergence_rate"] is None  # NaN travels as null

    projected = np.asarray(Image.open(io.BytesIO(running.views.preview_png() or b"")))
    slice_images = [np.asarray(Image.open(io.BytesIO(running.views.slice_png(k) or b""))) for k in range(N_SLICES)]
    assert all(image.shape == projected.shape for image in slice_images)
    assert running.views.slice_png(N_SLICES) is None and running.views.slice_png(-1) is None
    tiles = running.views.tiles()
    assert tiles["n_slices"] == N_SLICES and tiles["object_shape"] == list(geometry.object_shape)
    assert tiles["coverage"] is None  # only once the series is finished


@pytest.mark.chaos
def test_a_message_whose_handling_raises_is_counted_and_the_collector_goes_on(
        collector: tuple[Collector, zmq.Socket], geometry: SeriesGeometry, caplog: pytest.LogCaptureFixture) -> None:
    """A preview whose tile lies outside its series' object (a reused series id with another raster did that)
    raises in the views; it is counted and logged with its series, and the thread serves the next message. It
    once ended the collector thread: no preview and no file for any later series."""
    running, push = collector
    header = {"series_id": START.series_id, "worker": 0, "iteration": 1, "factor": 2, "tile": [0, 61, 30, 61],
              "frames_used": 5, "frames_received": 5, "frames_expected": 48, "loss": 2.0, "loss_per_frame": 0.4,
              "convergence_rate": 0.0, "wait_fraction": 0.1, "staleness_max": 1}
    with caplog.at_level(logging.ERROR, logger="ptylive.daemon.service.collector"), \
            running.events.subscribe() as subscription:
        push.send_multipart(rank_messages.encode("preview", header, np.zeros((31, 16), np.float32)), copy=False)
        send_preview(push, geometry, worker=0, iteration=2)
        preview = json.loads(next_event(subscription, "preview").data)
    assert preview["iteration"] == 2 and running.thread_state() == (True, None)
    assert running.failed_messages == 1 and running.bad_messages == 0
    assert running.status()["worker_messages_failed"] == {"undecodable": 0, "unhandled": 1}
    assert "a preview message of worker 0 about series 'c-1' could not be handled" in caplog.text
    assert "outside the object" in caplog.text  # the traceback names the fault


@pytest.mark.chaos
@pytest.mark.parametrize("pub_endpoint", ["tcp://*:0", "tcp://0.0.0.0:0", "tcp://127.0.0.1:0"])
def test_a_preview_pub_bound_to_every_interface_logs_one_warning(pub_endpoint: str, geometry: SeriesGeometry,
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Whoever reaches the PUB port reads every preview: said where it is bound, with the endpoint and the setting
    (the internal PULL is never a wildcard: docs/operations.md)."""
    context = zmq.Context()
    hooks = CollectorHooks(series=lambda series_id: None, progress=lambda series_id: None)
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.service.collector"):
        running = Collector(context, "tcp://127.0.0.1:0", pub_endpoint, hooks, tmp_path, n_workers=2)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if pub_endpoint.startswith("tcp://127."):
            assert not warnings, warnings
        else:
            assert len(warnings) == 1, warnings
            assert f"every interface ({running.pub_endpoint})" in warnings[0] and "preview.endpoint" in warnings[0]
    finally:
        running.close()
        context.term()


def test_closing_the_collector_ends_event_streams(collector: tuple[Collector, zmq.Socket]) -> None:
    running, _ = collector
    subscription = running.events.subscribe()
    running.events.close()
    assert subscription.next(1.0) is None and subscription.closed


def test_coverage_map_marks_every_frame_some_worker_received() -> None:
    start = SeriesStart(series_id="m", scan_shape=(2, 3), scan_step_A=(1.0, 1.0), detector_shape=(8, 8),
                        dtype="uint16", energy_eV=3e5, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                        detector_pixel_mrad=2.0)
    assert coverage_map(start, [[0, 1], [5], []]) == {"series_id": "m", "scan_shape": [2, 3], "rows": ["110", "001"]}
    explicit = SeriesStart(**{**start.__dict__, "positions_A": ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))})
    assert coverage_map(explicit, [[3]])["rows"] == ["0001"]  # positions that do not fill the raster: one row


def send_final(push: zmq.Socket, geometry: SeriesGeometry, worker: int) -> None:
    tile = geometry.domains[worker].tile
    header = {"series_id": START.series_id, "worker": worker, "status": "complete", "iterations": 4,
              "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "loss_history": [1.0] * 4,
              "frames_history": [2] * 4, "scale": 1.0, "slice_thickness_A": 1.0, "rejected": {}, "received": [worker],
              "stats": {},
              "frames_used": 2, "frames_received": 2, "frames_expected": 24, "loss": 1.0, "loss_per_frame": 0.5,
              "convergence_rate": None, "wait_fraction": 0.0, "staleness_max": 0}
    push.send_multipart(rank_messages.encode("final", header, np.ones((N_SLICES, 2, 2), np.complex64)), copy=False)


def test_a_final_file_being_written_does_not_hold_up_previews(geometry: SeriesGeometry, tmp_path: Path) -> None:
    """The writer blocks on its first file; previews and /status go on, and the series ends once it is written."""
    release = threading.Event()

    def slow_write(folder: Path, start: SeriesStart, *_: object) -> Path:
        assert release.wait(10.0)
        return folder / "c-1.h5"

    context = zmq.Context()
    hooks = CollectorHooks(series=lambda series_id: (START, geometry),
                           progress=lambda series_id: SeriesProgress(START, 17, START.n_positions))
    running = Collector(context, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", hooks, tmp_path, n_workers=2,
                        rate_hz=50.0, writer=FinalWriter(tmp_path, slow_write))
    push = context.socket(zmq.PUSH)
    push.linger = 0
    push.connect(running.pull_endpoint)
    running.start()
    try:
        with running.events.subscribe() as subscription:
            send_final(push, geometry, 0)
            send_final(push, geometry, 1)
            assert json.loads(next_event(subscription, "series_start").data)["series_id"] == "c-1"
            deadline = time.monotonic() + 5.0
            while running.status()["finals_pending"] != 1:
                assert time.monotonic() < deadline, "the final job never reached the writer"
                time.sleep(0.01)
            send_preview(push, geometry, worker=0, iteration=9)
            assert json.loads(next_event(subscription, "preview").data)["iteration"] == 9  # while the file waits
            assert running.status()["finished"] == []
            release.set()
            ended = json.loads(next_event(subscription, "series_end").data)
        assert ended["path"] == str(tmp_path / "c-1.h5") and ended["error"] is None
        assert ended["coverage"]["rows"][0] == "11000000"
        assert running.status()["finals_pending"] == 0 and running.views.tiles()["coverage"] == ended["coverage"]
    finally:
        release.set()
        push.close()
        running.close()
        context.term()


def test_a_series_end_is_logged_with_its_status_and_final_file(geometry: SeriesGeometry, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The line plain ``ptylive serve`` leaves in the journal for every series (INFO)."""
    context = zmq.Context()
    hooks = CollectorHooks(series=lambda series_id: (START, geometry),
                           progress=lambda series_id: SeriesProgress(START, 2, START.n_positions))
    running = Collector(context, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", hooks, tmp_path, n_workers=2,
                        rate_hz=50.0, writer=FinalWriter(tmp_path, lambda folder, *_: folder / "c-1.h5"))
    push = context.socket(zmq.PUSH)
    push.linger = 0
    push.connect(running.pull_endpoint)
    running.start()
    try:
        with caplog.at_level(logging.INFO, logger="ptylive.daemon.service.collector"), \
                running.events.subscribe() as subscription:
            send_final(push, geometry, 0)
            send_final(push, geometry, 1)
            next_event(subscription, "series_end")
    finally:
        push.close()
        running.close()
        context.term()
    assert f"series 'c-1' ended: complete after 4 iterations; final file {tmp_path / 'c-1.h5'}" in caplog.messages
