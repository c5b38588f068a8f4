"""Rank 0's collector: tile previews in, stitched previews out, final files written.

A thread owns two sockets: a PULL that every worker pushes to (:mod:`ptylive.daemon.service.messages`)
and the preview PUB for operators. It places each tile preview into the series' mosaic and
publishes at most ``rate_hz`` times a second, whenever something new arrived::

    part 0  msgpack {"htype": "preview", "series_id", "iteration", "frames_received", "frames_expected",
                     "coverage", "tiles": [{"worker", "tile", "loss", "loss_per_frame", "convergence_rate",
                     "frames_used", "frames_received", "frames_expected", ...}], "shape", "dtype": "<f4",
                     "factor", "published_s"}
    part 1  (h, w) float32 mosaic of projected phase (NaN where no tile reported yet)

When every worker's ``final`` of a series is in, it writes the HDF5 file
(:mod:`ptylive.daemon.service.results`) and publishes ``{"htype": "final", "series_id", "path", "status"}``.
HTTP handlers read :meth:`Collector.status`, :meth:`tiles`, :meth:`preview_png` and :meth:`slice_png`
from other threads. The same moments go to the viewer as server-sent events on :attr:`Collector.events`:
``series_start`` (a worker's first message about a series), ``preview`` (the PUB header without the
image, plus the mosaic ``version``, ``object_shape`` and ``n_slices``) and ``series_end`` (``path``,
``file``, ``status``, ``iterations`` and the final ``coverage`` map, which ``/tiles`` then carries too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.http.sse import EventHub
from ptylive.daemon.service.results import write_final
from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.preview import Mosaic, to_png
from ptylive.daemon.service.messages import RankMessage
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

POLL_MS = 50


@dataclass
class SeriesView:
    """What rank 0 knows of one series' reconstruction."""

    start: SeriesStart
    geometry: SeriesGeometry
    mosaic: Mosaic | None = None
    slices: list[Mosaic] = field(default_factory=list)  # one per slice when workers send them (S > 1)
    tiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    finals: dict[int, RankMessage] = field(default_factory=dict)
    iteration: int = 0
    published_version: int = 0
    first_preview_s: float | None = None
    path: str | None = None
    status: str | None = None
    coverage: dict[str, Any] | None = None  # which frames reached a worker, once every final is in


def coverage_map(start: SeriesStart, received: list[list[int]]) -> dict[str, Any]:
    """``/status``' coverage format for a finished series: one 0/1 string per scan row, from every worker's
    ``received`` frame indices (frame ``k`` at row ``k // cols``; one row if the scan shape does not fit)."""
    covered = np.zeros(start.n_positions, dtype=bool)
    for indices in received:
        covered[np.asarray(indices, dtype=np.int64)] = True
    rows, cols = start.scan_shape
    if rows * cols != covered.size:
        rows, cols = 1, covered.size
    lines = ["".join("1" if c else "0" for c in row) for row in covered.reshape(rows, cols)]
    return {"series_id": start.series_id, "scan_shape": [rows, cols], "rows": lines}


class Collector:
    """Collects worker messages on ``pull_endpoint`` (bound) and publishes on ``pub_endpoint`` (bound).

    Parameters
    ----------
    series_info : callable
        ``series_info(series_id)`` → ``(start, geometry, frames_received)`` or None, from the ingest side.
    output_folder : Path
    n_workers : int
    rate_hz : float
    """

    def __init__(self, context: zmq.Context, pull_endpoint: str, pub_endpoint: str,
                 series_info: Callable[[str], tuple[SeriesStart, SeriesGeometry, int] | None],
                 output_folder: Path, n_workers: int, rate_hz: float = 2.0) -> None:
        self.series_info, self.output_folder, self.n_workers = series_info, output_folder, n_workers
        # Hooks for metrics (called in this thread): a worker's heartbeat, a published preview's header.
        self.on_report: Callable[[int, dict[str, Any]], None] | None = None
        self.on_publish: Callable[[dict[str, Any]], None] | None = None
        self.events = EventHub()  # the viewer's server-sent events, published from this thread
        self.min_interval_s = 1.0 / rate_hz
        self._pull, self._pub = context.socket(zmq.PULL), context.socket(zmq.PUB)
        self._pull.linger, self._pub.linger = 0, 1000
        self._pull.bind(pull_endpoint)
        self._pub.bind(pub_endpoint)
        self.pull_endpoint = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.hello: dict[int, int] = {}
        self.byes: set[int] = set()
        self.reports: dict[int, dict[str, Any]] = {}
        self.heartbeat_s: dict[int, float] = {}
        self.errors: list[dict[str, Any]] = []
        self.views: dict[str, SeriesView] = {}
        self.latest: str | None = None
        self.finished: list[dict[str, Any]] = []
        self.published = self.bad_messages = 0
        self._last_publish = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ptylive-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._pull.poll(POLL_MS):
                    while True:
                        try:
                            parts = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(parts)
                self._maybe_publish()
        except BaseException as exc:  # kept for close(), never swallowed silently
            logger.exception("collector thread failed")
            self._error = exc

    def _handle(self, parts: list[Any]) -> None:
        try:
            message = rank_messages.decode(parts)
        except (ValueError, msgpack.UnpackException) as exc:
            self.bad_messages += 1
            logger.error("undecodable message from a worker: %s", exc)
            return
        worker, view = int(message.header.get("worker", -1)), None
        with self._lock:
            self.heartbeat_s[worker] = time.monotonic()
            if message.htype == "heartbeat":
                self.reports[worker] = message.header
                if self.on_report is not None:
                    self.on_report(worker, message.header)
            elif message.htype == "hello":
                self.hello[worker] = int(message.header["pid"])
            elif message.htype == "bye":
                self.byes.add(worker)
            elif message.htype == "error":
                self.errors.append(message.header)
            elif message.htype in ("preview", "final"):
                view = self._view(str(message.header["series_id"]))
                if view is not None and message.htype == "preview":
                    self._place(view, worker, message)
                elif view is not None:
                    view.finals[worker] = message
                    skip = ("loss_history", "frames_history", "received")
                    view.tiles[worker] = {k: v for k, v in message.header.items() if k not in skip}
                    view.tiles[worker]["iteration"] = message.header["iterations"]
        if message.htype == "final" and view is not None and len(view.finals) == self.n_workers:
            self._finish(view)

    def _view(self, series_id: str) -> SeriesView | None:
        view = self.views.get(series_id)
        if view is None:
            info = self.series_info(series_id)
            if info is None:
                logger.error("message about unknown series %r ignored", series_id)
                return None
            view = self.views[series_id] = SeriesView(info[0], info[1])
            self.latest = series_id
            self.events.publish("series_start", {"series_id": series_id, "frames_expected": info[0].n_positions,
                                                 "object_shape": list(info[1].object_shape)})
        return view

    def _place(self, view: SeriesView, worker: int, message: RankMessage) -> None:
        if view.mosaic is None:
            view.mosaic = Mosaic(view.geometry.object_shape, int(message.header["factor"]))
        view.mosaic.place(tuple(message.header["tile"]), message.arrays[0])
        if len(message.arrays) > 1:  # each slice's phase, (S, h, w)
            if not view.slices:
                view.slices = [Mosaic(view.mosaic.object_shape, view.mosaic.factor) for _ in message.arrays[1]]
            for mosaic, layer in zip(view.slices, message.arrays[1], strict=True):
                mosaic.place(tuple(message.header["tile"]), layer)
        view.tiles[worker] = dict(message.header)
        view.iteration = max(view.iteration, int(message.header["iteration"]))
        if view.first_preview_s is None:
            view.first_preview_s = time.time()

    def _maybe_publish(self) -> None:
        now = time.monotonic()
        with self._lock:
            view = self.views.get(self.latest) if self.latest else None
            if (view is None or view.mosaic is None or view.mosaic.version == view.published_version
                    or now - self._last_publish < self.min_interval_s):
                return
            view.published_version = view.mosaic.version
            header, image = self._preview_header(view), view.mosaic.image
            extra = {"version": view.published_version, "object_shape": list(view.mosaic.object_shape),
                     "n_slices": len(view.slices) or 1}
        self._last_publish = now
        self._pub.send_multipart([msgpack.packb(header), memoryview(image).cast("B")], copy=False)
        self.published += 1
        self.events.publish("preview", {**{k: v for k, v in header.items() if k not in ("htype", "dtype")}, **extra})
        if self.on_publish is not None:
            self.on_publish(header)

    def _preview_header(self, view: SeriesView) -> dict[str, Any]:
        info = self.series_info(view.start.series_id)
        received = info[2] if info is not None else sum(t.get("frames_received", 0) for t in view.tiles.values())
        expected = view.start.n_positions
        assert view.mosaic is not None
        return {"htype": "preview", "series_id": view.start.series_id, "iteration": view.iteration,
                "frames_received": received, "frames_expected": expected,
                "coverage": received / expected if expected else 1.0, "tiles": self._tile_list(view),
                "shape": list(view.mosaic.shape), "dtype": "<f4", "factor": view.mosaic.factor,
                "published_s": time.time()}

    @staticmethod
    def _tile_list(view: SeriesView) -> list[dict[str, Any]]:
        keys = ("worker", "tile", "iteration", "frames_used", "frames_received", "frames_expected", "loss",
                "loss_per_frame", "convergence_rate", "wait_fraction", "staleness_max", "status")
        return [{k: view.tiles[w].get(k) for k in keys} for w in sorted(view.tiles)]

    def _finish(self, view: SeriesView) -> None:
        finals = list(view.finals.values())
        try:
            path = str(write_final(self.output_folder, view.start, view.geometry, finals, {}))
        except (OSError, ValueError) as exc:
            logger.error("series %r: final file not written: %s", view.start.series_id, exc)
            path = None
        status = str(finals[0].header["status"])
        coverage = coverage_map(view.start, [m.header["received"] for m in finals])
        entry = {"series_id": view.start.series_id, "path": path, "file": Path(path).name if path else None,
                 "status": status, "iterations": finals[0].header["iterations"]}
        with self._lock:
            view.path, view.status, view.coverage = path, status, coverage
            self.finished.append(entry)
        self.events.publish("series_end", {**entry, "coverage": coverage})
        self._pub.send_multipart([msgpack.packb({"htype": "final", "series_id": view.start.series_id,
                                                 "path": path, "status": status})])

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.events.close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._error is not None:
            logger.error("collector error: %r", self._error)
        self._pull.close()
        self._pub.close()

    # Read from HTTP threads -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            view = self.views.get(self.latest) if self.latest else None
            now = time.monotonic()
            return {"workers_up": sorted(self.hello), "worker_pids": dict(self.hello),
                    "worker_reports": {w: dict(r) for w, r in self.reports.items()},
                    "heartbeat_age_s": {w: now - t for w, t in self.heartbeat_s.items()},
                    "series_id": view.start.series_id if view else None,
                    "iteration": view.iteration if view else None, "finished": list(self.finished),
                    "previews_published": self.published, "worker_errors": list(self.errors)}

    def tiles(self) -> dict[str, Any]:
        with self._lock:
            view = self.views.get(self.latest) if self.latest else None
            return {"series_id": view.start.series_id if view else None,
                    "object_shape": list(view.geometry.object_shape) if view else None,
                    "n_slices": (len(view.slices) or 1) if view else None,
                    "coverage": view.coverage if view else None,
                    "tiles": self._tile_list(view) if view else []}

    def preview_png(self) -> bytes | None:
        with self._lock:
            view = self.views.get(self.latest) if self.latest else None
            image = view.mosaic.image if view is not None and view.mosaic is not None else None
        return None if image is None else to_png(image)

    def slice_png(self, index: int) -> bytes | None:
        """Slice ``index``'s phase mosaic of the latest series; None if it has no such slice (yet)."""
        with self._lock:
            view = self.views.get(self.latest) if self.latest else None
            image = view.slices[index].image if view is not None and 0 <= index < len(view.slices) else None
        return None if image is None else to_png(image)
