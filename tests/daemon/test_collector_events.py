"""Rank 0's collector as the viewer sees it: events on its hub, per-slice mosaics, the final coverage map.

Tile previews are pushed into a real collector over loopback ZMQ, as worker ranks send them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.collector import Collector, coverage_map
from ptylive.daemon.http.sse import ServerEvent, Subscription
from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.streaming.protocol import SeriesStart

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
    running = Collector(context, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0",
                        lambda series_id: (START, geometry, 17) if series_id == START.series_id else None,
                        tmp_path, n_workers=2, rate_hz=50.0)
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

    projected = np.asarray(Image.open(io.BytesIO(running.preview_png() or b"")))
    slice_images = [np.asarray(Image.open(io.BytesIO(running.slice_png(k) or b""))) for k in range(N_SLICES)]
    assert all(image.shape == projected.shape for image in slice_images)
    assert running.slice_png(N_SLICES) is None and running.slice_png(-1) is None
    tiles = running.tiles()
    assert tiles["n_slices"] == N_SLICES and tiles["object_shape"] == list(geometry.object_shape)
    assert tiles["coverage"] is None  # only once the series is finished


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
