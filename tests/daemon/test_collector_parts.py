"""The collector's pieces without sockets: roster, series views, publisher and final writer.

Worker messages are built with the real codec (``messages.encode`` then ``decode``), as the collector
receives them; the publisher sends into a recorder and reads an injected clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.http.sse import EventHub, ServerEvent, Subscription
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.final_writer import FinalJob, FinalOutcome, FinalWriter
from ptylive.daemon.service.publisher import Publisher
from ptylive.daemon.service.roster import Roster
from ptylive.daemon.service.series_views import SeriesViews
from ptylive.streaming.protocol import SeriesStart

START = SeriesStart(series_id="p-1", scan_shape=(6, 8), scan_step_A=(1.0, 1.0), detector_shape=(32, 32),
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)
QUALITY = {"frames_used": 5, "frames_expected": 24, "loss": 2.0, "loss_per_frame": 0.4, "convergence_rate": None,
           "wait_fraction": 0.1, "staleness_max": 1}


@pytest.fixture(scope="module")
def geometry() -> SeriesGeometry:
    return series_geometry(START, 2, 1)


def received(htype: str, header: dict[str, Any], *arrays: np.ndarray) -> rank_messages.RankMessage:
    """What the collector decodes from a worker's ``encode(htype, header, *arrays)``."""
    return rank_messages.decode([bytes(part) for part in rank_messages.encode(htype, header, *arrays)])


def preview(geometry: SeriesGeometry, worker: int, iteration: int,
            series_id: str = "p-1") -> rank_messages.PreviewMessage:
    tile = geometry.domains[worker].tile
    image = np.full((-(-(tile.row1 - tile.row0) // 2), -(-(tile.col1 - tile.col0) // 2)), worker, np.float32)
    header = {"series_id": series_id, "worker": worker, "iteration": iteration, "factor": 2, "sent_s": 0.0,
              "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "frames_received": 5 + worker, **QUALITY}
    message = received("preview", header, image)
    assert isinstance(message, rank_messages.PreviewMessage)
    return message


def final(geometry: SeriesGeometry, worker: int, indices: list[int]) -> rank_messages.FinalMessage:
    tile = geometry.domains[worker].tile
    header = {"series_id": "p-1", "worker": worker, "status": "complete", "iterations": 7,
              "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "loss_history": [1.0] * 7,
              "frames_history": [3] * 7, "scale": 1.0, "slice_thickness_A": 0.0, "rejected": {}, "received": indices,
              "stats": {},
              "frames_received": len(indices), **QUALITY}
    message = received("final", header, np.ones((1, 2, 2), np.complex64), np.ones((4, 4), np.complex64))
    assert isinstance(message, rank_messages.FinalMessage)
    return message


def final_of(geometry: SeriesGeometry, series_id: str, worker: int) -> rank_messages.FinalMessage:
    """:func:`final` of ``worker`` (no frames) for series ``series_id``."""
    message = final(geometry, worker, [])
    return dataclasses.replace(message, header={**message.header, "series_id": series_id})


def views_for(geometry: SeriesGeometry) -> SeriesViews:
    return SeriesViews(lambda series_id: (START, geometry) if series_id == "p-1" else None, n_workers=2)


# --- roster ----------------------------------------------------------------------------------------------------

def test_the_roster_keeps_hello_heartbeats_errors_and_byes() -> None:
    now = [100.0]
    heartbeats: list[tuple[int, dict[str, Any]]] = []
    roster = Roster(lambda worker, report: heartbeats.append((worker, report)), clock=lambda: now[0])
    roster.record(received("hello", {"worker": 0, "pid": 4242}))
    now[0] = 101.0
    roster.record(received("heartbeat", {"worker": 1, "series_id": None, "messages_taken": 3, "unknown_frames": 0,
                                         "totals": {}, "iteration_s": [0.5]}))
    roster.record(received("error", {"worker": 1, "series_id": "p-1", "error": "no memory"}))
    now[0] = 103.0
    assert roster.said_hello() == {0: 4242} and roster.said_bye() == set()
    assert roster.heartbeat_ages() == {0: 3.0, 1: 2.0}
    assert heartbeats == [(1, {"worker": 1, "series_id": None, "messages_taken": 3, "unknown_frames": 0,
                                "totals": {}, "iteration_s": [0.5]})]
    snapshot = roster.snapshot()
    assert snapshot["workers_up"] == [0] and snapshot["worker_pids"] == {0: 4242}
    assert snapshot["worker_reports"][1]["messages_taken"] == 3
    assert roster.messages_taken(1) == 3 and roster.messages_taken(0) is None  # the ingest's byte bound reads it
    assert snapshot["worker_errors"] == [{"worker": 1, "series_id": "p-1", "error": "no memory"}]
    snapshot["worker_reports"][1]["messages_taken"] = -1  # readers hold copies
    roster.record(received("bye", {"worker": 0}))
    assert roster.snapshot()["worker_reports"][1]["messages_taken"] == 3 and roster.said_bye() == {0}


# --- series views ----------------------------------------------------------------------------------------------

def test_views_start_a_series_once_and_publish_each_new_mosaic_once(geometry: SeriesGeometry) -> None:
    views = views_for(geometry)
    assert views.take_preview() is None and views.tiles()["tiles"] == [] and views.preview_png() is None
    first = views.handle(preview(geometry, 0, iteration=1))
    assert first.started == {"series_id": "p-1", "frames_expected": 48, "object_shape": list(geometry.object_shape)}
    pending = views.take_preview()
    assert pending is not None and pending.extra == {"version": 1, "object_shape": list(geometry.object_shape),
                                                     "n_slices": 1, "phase_range_rad": (0.0, 0.0)}
    assert views.take_preview() is None  # nothing new since
    second = views.handle(preview(geometry, 1, iteration=3))
    assert second.started is None and second.final_job is None
    pending = views.take_preview()
    assert pending is not None and pending.iteration == 3 and [t["worker"] for t in pending.tiles] == [0, 1]
    header = pending.header(frames_received=None)  # the ingest forgot the series: the tiles' own count
    assert header["frames_received"] == 11 and header["coverage"] == 11 / 48 and header["shape"] == list(
        pending.image.shape)
    assert pending.header(frames_received=40)["frames_received"] == 40
    assert views.status() == {"series_id": "p-1", "iteration": 3, "finished": [], "virtual_frames_dropped": 0}


def test_views_keep_each_tiles_loss_curve_and_the_colour_bars_range(geometry: SeriesGeometry) -> None:
    views = views_for(geometry)
    for iteration, loss in ((1, 0.8), (2, 0.5), (2, 0.45), (1, 0.9), (4, 0.3)):  # a repeat and a late one dropped
        message = preview(geometry, 0, iteration)
        views.handle(dataclasses.replace(message, header={**message.header, "loss_per_frame": loss}))
    message = preview(geometry, 1, 3)
    views.handle(dataclasses.replace(message, header={**message.header, "loss_per_frame": None}))  # no point
    views.handle(preview(geometry, 1, 5))
    tiles = views.tiles()
    assert tiles["loss_curves"] == [{"worker": 0, "iteration": [1, 2, 4], "loss_per_frame": [0.8, 0.5, 0.3]},
                                    {"worker": 1, "iteration": [5], "loss_per_frame": [0.4]}]
    low, high = tiles["phase_range_rad"]  # tile 0 drawn 0, tile 1 drawn 1: the percentiles lie between
    assert 0.0 <= low < high <= 1.0 and tiles["slice_ranges_rad"] == []
    pending = views.take_preview()
    assert pending is not None and pending.extra["phase_range_rad"] == (low, high)
    json.dumps(tiles)  # /tiles stays plain JSON


def test_views_ignore_series_that_were_not_admitted(geometry: SeriesGeometry, caplog: pytest.LogCaptureFixture) -> None:
    views = views_for(geometry)
    with caplog.at_level(logging.ERROR):
        update = views.handle(preview(geometry, 0, iteration=1, series_id="stranger"))
    assert update.started is None and update.final_job is None and views.status()["series_id"] is None
    assert "unknown series 'stranger'" in caplog.text


def test_views_hand_out_the_final_job_once_every_worker_is_done(geometry: SeriesGeometry, tmp_path: Path) -> None:
    views = views_for(geometry)
    assert views.handle(final(geometry, 1, [40, 41])).final_job is None
    job = views.handle(final(geometry, 0, [0, 1, 2])).final_job
    assert job is not None and sorted(m.header["worker"] for m in job.finals) == [0, 1]
    assert views.tiles()["coverage"] is None  # until the file is written
    entry, coverage = views.finished(FinalOutcome(job, tmp_path / "p-1.h5"))
    assert entry == {"series_id": "p-1", "path": str(tmp_path / "p-1.h5"), "file": "p-1.h5", "status": "complete",
                     "iterations": 7, "error": None, "fallback": False}
    assert coverage["rows"] == ["11100000", *["00000000"] * 4, "11000000"]  # frames 0-2 and 40-41 of 6 × 8
    tiles = views.tiles()
    assert tiles["coverage"] == coverage and [t["iteration"] for t in tiles["tiles"]] == [7, 7]
    assert views.status()["finished"] == [entry]


@pytest.mark.chaos
def test_a_failed_final_file_is_reported_not_swallowed(geometry: SeriesGeometry) -> None:
    views = views_for(geometry)
    views.handle(final(geometry, 0, [0]))
    job = views.handle(final(geometry, 1, [])).final_job
    assert job is not None
    entry, _ = views.finished(FinalOutcome(job, None, "OSError: disk full"))
    assert entry["path"] is None and entry["file"] is None and entry["error"] == "OSError: disk full"
    assert entry["status"] == "write_failed"  # announced so on the PUB and SSE, not as the workers' "complete"
    assert views.status()["finished"][0]["error"] == "OSError: disk full"


# --- publisher -------------------------------------------------------------------------------------------------

class Recorder:
    """Stands in for the PUB socket."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def send_multipart(self, msg_parts: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        self.sent.append([bytes(part) for part in msg_parts])


def next_event(subscription: Subscription) -> ServerEvent:
    event = subscription.next(1.0)
    assert event is not None
    return event


def test_the_publisher_sends_previews_at_most_at_its_rate_and_mirrors_them_as_events() -> None:
    now, socket, hub = [10.0], Recorder(), EventHub()
    publisher = Publisher(socket, rate_hz=4.0, events=hub, clock=lambda: now[0])
    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {"htype": "preview", "series_id": "p-1", "iteration": 2, "dtype": "<f4", "shape": [2, 3]}
    with hub.subscribe() as subscription:
        assert publisher.due()
        publisher.preview(header, image, {"version": 5})
        now[0] = 10.2
        assert not publisher.due()  # 1/4 s not yet gone
        now[0] = 10.25
        assert publisher.due()
        event = next_event(subscription)
    assert publisher.published == 1 and len(socket.sent) == 1
    assert msgpack.unpackb(socket.sent[0][0]) == header
    np.testing.assert_array_equal(np.frombuffer(socket.sent[0][1], np.float32).reshape(2, 3), image)
    assert event.name == "preview" and json.loads(event.data) == {"series_id": "p-1", "iteration": 2,
                                                                  "shape": [2, 3], "version": 5}
    with pytest.raises(ValueError, match="rate_hz"):
        Publisher(socket, rate_hz=0.0)


def test_the_publisher_announces_a_finished_series_as_event_then_on_the_pub() -> None:
    socket, hub = Recorder(), EventHub()
    publisher = Publisher(socket, rate_hz=1.0, events=hub)
    entry = {"series_id": "p-1", "path": "/spare/p-1.h5", "file": None, "status": "complete", "iterations": 3,
             "error": "OSError: disk full", "fallback": True}
    with hub.subscribe() as subscription:
        publisher.series_started({"series_id": "p-1"})
        publisher.series_ended(entry, {"rows": ["1"]})
        names = [next_event(subscription).name, next_event(subscription)]
    assert names[0] == "series_start" and names[1].name == "series_end"
    assert json.loads(names[1].data) == {**entry, "coverage": {"rows": ["1"]}}
    assert msgpack.unpackb(socket.sent[0][0]) == {"htype": "final", "series_id": "p-1", "path": "/spare/p-1.h5",
                                                  "status": "complete", "fallback": True}
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        hub.subscribe()


# --- final writer ----------------------------------------------------------------------------------------------

def job(geometry: SeriesGeometry, series_id: str) -> FinalJob:
    return FinalJob(SeriesStart(**{**START.__dict__, "series_id": series_id}), geometry, [])


def test_the_writer_writes_off_the_submitting_thread_and_reports_failures(
        geometry: SeriesGeometry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    release, writing = threading.Event(), threading.Event()
    threads: list[str] = []

    def write(folder: Path, start: SeriesStart, geometry_: SeriesGeometry, finals: list[Any],
              extra: dict[str, Any]) -> Path:
        threads.append(threading.current_thread().name)
        writing.set()
        if start.series_id == "bad":
            raise OSError("disk full")
        assert release.wait(5.0)
        return folder / f"{start.series_id}.h5"

    writer = FinalWriter(tmp_path, write, fallback_folder=tmp_path / "fallback", retry_delays_s=())
    writer.start()
    writer.submit(job(geometry, "slow"))  # returns at once, though the write blocks
    assert writing.wait(5.0) and writer.pending == 1 and writer.take_done() == []
    writer.submit(job(geometry, "bad"))
    writer.submit(job(geometry, "after"))
    with caplog.at_level(logging.ERROR):
        release.set()
        assert writer.wait_idle(5.0)
    outcomes = writer.take_done()
    assert [(o.job.start.series_id, o.path, o.error) for o in outcomes] == [
        ("slow", tmp_path / "slow.h5", None), ("bad", None, "OSError: disk full; fallback folder: OSError: disk full"),
        ("after", tmp_path / "after.h5", None)]  # "bad" fails in the fallback folder too
    assert "series 'bad': final file not written" in caplog.text and "disk full" in caplog.text
    assert set(threads) == {"ptylive-final-writer"}
    assert writer.close(1.0) == [] and writer.pending == 0


def test_closing_the_writer_writes_what_is_queued_first(geometry: SeriesGeometry, tmp_path: Path) -> None:
    writer = FinalWriter(tmp_path, lambda folder, start, *_: folder / f"{start.series_id}.h5")
    writer.submit(job(geometry, "a"))  # before start(): queued
    writer.submit(job(geometry, "b"))
    writer.start()
    assert [o.path for o in writer.close(5.0)] == [tmp_path / "a.h5", tmp_path / "b.h5"]


@pytest.mark.chaos
def test_finished_views_are_released_and_the_history_is_bounded(geometry: SeriesGeometry) -> None:
    """20 series back to back: one view is kept (the latest, for HTTP), at most ``history`` finished entries, and
    a late message about a released series is dropped instead of bringing its view back (rank 0 once grew by
    ~16 MiB per series)."""
    starts = {f"s-{k}": dataclasses.replace(START, series_id=f"s-{k}") for k in range(20)}
    views = SeriesViews(lambda series_id: (starts[series_id], geometry) if series_id in starts else None,
                        n_workers=2, history=4)

    for series_id in starts:
        views.handle(final_of(geometry, series_id, 0))
        job = views.handle(final_of(geometry, series_id, 1)).final_job
        assert job is not None
        views.finished(FinalOutcome(job, Path(f"/results/{series_id}.h5")))
        assert len(views._views) == 1  # the latest only
    assert [entry["series_id"] for entry in views.status()["finished"]] == ["s-16", "s-17", "s-18", "s-19"]
    late = views.handle(final_of(geometry, "s-18", 0))
    assert late.final_job is None and late.started is None and set(views._views) == {"s-19"}


@pytest.mark.chaos
def test_the_roster_ignores_messages_from_workers_that_do_not_exist() -> None:
    """A fake heartbeat for "worker 7" of a 2-worker daemon (from anyone who can reach the internal endpoint) once
    made the watchdog wait for that worker for ever; it is counted and ignored, as are undecodable worker fields."""
    roster = Roster(n_workers=2)
    roster.record(received("heartbeat", {"worker": 7, "series_id": None, "messages_taken": 0, "unknown_frames": 0,
                                         "totals": {}, "iteration_s": []}))
    roster.record(received("hello", {"worker": 1, "pid": 11}))
    assert roster.foreign == 1 and set(roster.heartbeat_ages()) == {1} and roster.said_hello() == {1: 11}


@pytest.mark.chaos
def test_views_hold_a_series_id_from_its_first_message_until_the_history_forgets_its_file(
        geometry: SeriesGeometry) -> None:
    """What the ingest asks before it admits a start (``holds``: a start of such an id is a duplicate): a series
    with a view or a written file is held; a recovered series being refined on is not (its run goes on)."""
    starts = {f"s-{k}": dataclasses.replace(START, series_id=f"s-{k}") for k in range(3)}
    views = SeriesViews(lambda series_id: (starts[series_id], geometry) if series_id in starts else None,
                        n_workers=2, history=1)

    assert not views.holds("s-0")
    views.handle(final_of(geometry, "s-0", 0))
    assert views.holds("s-0")  # a view, no file yet
    job = views.handle(final_of(geometry, "s-0", 1)).final_job
    assert job is not None
    views.finished(FinalOutcome(job, Path("/results/s-0.h5")))
    views.handle(final_of(geometry, "s-1", 0))  # the next series: s-0's view is released, its file is remembered
    assert "s-0" not in views._views and views.holds("s-0")
    views.expect_again("s-0")
    assert not views.holds("s-0")  # resumed from the recording: its messages are the new run's
    job = views.handle(final_of(geometry, "s-1", 1)).final_job
    assert job is not None
    views.finished(FinalOutcome(job, Path("/results/s-1.h5")))
    views.handle(final_of(geometry, "s-2", 0))
    assert views.holds("s-1") and not views.holds("stranger")
