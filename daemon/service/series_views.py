"""What rank 0 shows of each series' reconstruction: per-series mosaics, tiles, finals, and their HTTP readers.

The collector thread feeds :class:`SeriesViews` the workers' ``preview``, ``virtual``, ``pattern`` and ``final``
messages; HTTP threads read :meth:`SeriesViews.tiles`, :meth:`preview_png`, :meth:`slice_png`, :meth:`virtual_index`,
:meth:`virtual_png`, :meth:`diffraction_png`, :meth:`probe_png` and :meth:`status`. Every method takes the views'
lock and readers get copies, so nothing a reader holds changes under it::

    collector thread ── handle(worker, message) ──► SeriesViews ◄── tiles(), preview_png(), ... ── HTTP threads
                    ── take_preview(), take_virtual() ► (lock)
                    ── finished(outcome) ───────►

A series' view is made from its admitted start and geometry (the ``series`` hook, asked once per series)
when a worker first mentions it; the view of the latest such series is the one published and served.
When every worker's ``final`` is in, :meth:`SeriesViews.handle` hands back the job of writing the file, with the
series' virtual images as of then (:class:`~ptylive.daemon.service.virtual_mosaic.VirtualMosaic`, scan-shaped,
frame ``k`` at ``(k // cols, k % cols)`` of the start's ``scan_shape``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.final_writer import FinalJob, FinalOutcome
from ptylive.daemon.service.messages import FinalMessage, PatternMessage, PreviewMessage, VirtualMessage
from ptylive.daemon.service.preview import Mosaic, display_range, to_png
from ptylive.daemon.service.virtual_mosaic import VirtualMosaic, VirtualSnapshot
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.virtual_images import VirtualDetector

logger = logging.getLogger(__name__)

TILE_KEYS = ("worker", "tile", "iteration", "frames_used", "frames_received", "frames_expected", "loss",
             "loss_per_frame", "convergence_rate", "wait_fraction", "staleness_max", "status")
FINAL_HEADER_SKIPPED = ("loss_history", "frames_history", "received")  # long lists kept out of /tiles
LOSS_CURVE_POINTS = 2000  # per tile: the viewer's loss-vs-iteration curve keeps the latest iterations

SeriesLookup = Callable[[str], tuple[SeriesStart, SeriesGeometry] | None]


def coverage_rows(series_id: str, scan_shape: tuple[int, int], covered: npt.NDArray[np.bool_]) -> dict[str, Any]:
    """``/status``' coverage format: one 0/1 string per scan row (frame ``k`` at row ``k // cols``; one row if the
    scan shape does not fit ``covered``)."""
    rows, cols = scan_shape
    if rows * cols != covered.size:
        rows, cols = 1, covered.size
    lines = ["".join("1" if c else "0" for c in row) for row in covered.reshape(rows, cols)]
    return {"series_id": series_id, "scan_shape": [rows, cols], "rows": lines}


def coverage_map(start: SeriesStart, received: list[list[int]]) -> dict[str, Any]:
    """Coverage of a finished series from every worker's ``received`` frame indices (:func:`coverage_rows`)."""
    covered = np.zeros(start.n_positions, dtype=bool)
    for indices in received:
        covered[np.asarray(indices, dtype=np.int64)] = True
    return coverage_rows(start.series_id, start.scan_shape, covered)


@dataclass
class SeriesView:
    """What rank 0 knows of one series' reconstruction (guarded by the :class:`SeriesViews` lock)."""

    start: SeriesStart
    geometry: SeriesGeometry
    mosaic: Mosaic | None = None
    slices: list[Mosaic] = field(default_factory=list)  # one per slice when workers send them (S > 1)
    tiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    finals: dict[int, FinalMessage] = field(default_factory=dict)
    iteration: int = 0
    published_version: int = 0
    first_preview_s: float | None = None
    path: str | None = None
    status: str | None = None
    coverage: dict[str, Any] | None = None  # which frames reached a worker, once every final is in
    loss_curves: dict[int, deque[tuple[int, float]]] = field(default_factory=dict)  # (iteration, loss/frame)
    virtual: VirtualMosaic | None = None  # BF, ADF, CoM per scan position, from the workers' "virtual" messages
    virtual_published: int = 0  # the mosaic's version last published
    patterns: dict[int, tuple[npt.NDArray[np.float64], int]] = field(default_factory=dict)  # worker: (Σ frames, n)
    probe: npt.NDArray[np.float32] | None = None  # worker 0's latest probe amplitude (block-averaged)
    pattern_version: int = 0  # "pattern" messages placed
    pattern_published: int = 0

    def mean_pattern(self) -> tuple[npt.NDArray[np.float64], int] | None:
        """The mean of every frame the workers summed so far, ``(D, D)``, and how many; None before any."""
        frames = sum(n for _, n in self.patterns.values())
        if not frames:
            return None
        return np.sum([total for total, _ in self.patterns.values()], axis=0) / frames, frames

    def tile_list(self) -> list[dict[str, Any]]:
        return [{k: self.tiles[w].get(k) for k in TILE_KEYS} for w in sorted(self.tiles)]

    def loss_curve_list(self) -> list[dict[str, Any]]:
        """``/tiles``' ``loss_curves``: per worker its previews' iterations and loss per frame (same order)."""
        return [{"worker": w, "iteration": [p[0] for p in self.loss_curves[w]],
                 "loss_per_frame": [p[1] for p in self.loss_curves[w]]} for w in sorted(self.loss_curves)]

    def record_loss(self, worker: int, iteration: int, loss_per_frame: float | None) -> None:
        """One point of ``worker``'s loss curve: a preview of a later iteration than its last point."""
        if loss_per_frame is None or not np.isfinite(loss_per_frame):
            return
        curve = self.loss_curves.setdefault(worker, deque(maxlen=LOSS_CURVE_POINTS))
        if not curve or iteration > curve[-1][0]:
            curve.append((int(iteration), float(loss_per_frame)))


@dataclass(frozen=True)
class ViewUpdate:
    """What one worker message changed: a new series (the ``series_start`` event's payload) and/or a final
    file to write (every worker's final is in)."""

    started: dict[str, Any] | None = None
    final_job: FinalJob | None = None


@dataclass(frozen=True, eq=False)
class PendingPreview:
    """The latest series' mosaic, new since the last publication: copies, taken under the views' lock.

    Attributes
    ----------
    image : (h, w) float32
        The projected-phase mosaic.
    tiles : list of dict
        Each reporting worker's tile entry (``/tiles``' format).
    extra : dict
        The ``preview`` event's fields beyond the PUB header: ``version``, ``object_shape``, ``n_slices``.
    frames_received_by_tiles : int
        The tiles' own count of frames received (used when the ingest no longer knows the series).
    """

    start: SeriesStart
    geometry: SeriesGeometry
    image: npt.NDArray[np.float32]
    iteration: int
    tiles: list[dict[str, Any]]
    factor: int
    extra: dict[str, Any]
    frames_received_by_tiles: int

    @property
    def series_id(self) -> str:
        return self.start.series_id

    def header(self, frames_received: int | None) -> dict[str, Any]:
        """The PUB header, with the ingest's ``frames_received`` (None: the tiles' count)."""
        received = self.frames_received_by_tiles if frames_received is None else frames_received
        expected = self.start.n_positions
        return {"htype": "preview", "series_id": self.series_id, "iteration": self.iteration,
                "frames_received": received, "frames_expected": expected,
                "coverage": received / expected if expected else 1.0, "tiles": self.tiles,
                "shape": list(self.image.shape), "dtype": "<f4", "factor": self.factor, "published_s": time.time()}


class SeriesViews:
    """Every series' view, the latest one's for HTTP readers.

    Parameters
    ----------
    series : callable
        ``series(series_id)`` → ``(start, geometry)`` of an admitted series, or None (messages about it are
        dropped, logged). Called on the collector thread, once per series.
    n_workers : int
        Finals a series needs before its file is written.
    history : int
        Finished series kept: their ``/status`` entries, and their ids, so late messages about them are
        dropped. A finished series' view (mosaics, tiles) is released once its file is written, unless it
        is the latest (HTTP shows it until the next series): rank 0 once kept ~16 MiB per series for ever.
    final_attrs : callable, optional
        ``final_attrs(series_id)`` → the series' result-file attributes beyond the workers' (collector thread,
        once per series). One with ``count_mismatch`` turns the workers' ``complete`` into ``incomplete``.
    """

    def __init__(self, series: SeriesLookup, n_workers: int, history: int = 16,
                 final_attrs: Callable[[str], dict[str, Any]] | None = None) -> None:
        self._series, self.n_workers = series, n_workers
        self._final_attrs = final_attrs
        self._views: dict[str, SeriesView] = {}
        self._latest: str | None = None
        self._finished: deque[dict[str, Any]] = deque(maxlen=max(history, 1))
        self._resuming: set[str] = set()  # recovered series refined on: their checkpoint version is not the end
        self.virtual_frames_dropped = 0  # frames of "virtual" messages no mosaic took (unknown series, off the scan)
        self._lock = threading.Lock()

    # Collector thread ----------------------------------------------------------------------------------------
    def handle(self, message: PreviewMessage | VirtualMessage | PatternMessage | FinalMessage) -> ViewUpdate:
        """Apply a worker's ``preview``, ``virtual``, ``pattern`` or ``final`` message."""
        worker = int(message.header["worker"])
        view, started = self._view(str(message.header["series_id"]))
        if view is None:
            if message.htype == "virtual":  # of an unknown or finished series
                self._drop_virtual(message, "its series has no view")
            return ViewUpdate()
        job = None
        with self._lock:
            if message.htype == "virtual":
                self._place_virtual(view, message)
            elif message.htype == "pattern":
                self._place_pattern(view, worker, message)
            elif message.htype == "preview":
                self._place(view, worker, message)
            else:
                view.finals[worker] = message
                view.tiles[worker] = {k: v for k, v in message.header.items() if k not in FINAL_HEADER_SKIPPED}
                view.tiles[worker]["iteration"] = message.header["iterations"]
                if len(view.finals) == self.n_workers:  # each worker sent its last "virtual" before its final
                    virtual = view.virtual.snapshot() if view.virtual is not None else None
                    job = FinalJob(view.start, view.geometry, list(view.finals.values()), virtual=virtual)
        if job is not None and self._final_attrs is not None:
            job = replace(job, extra_attrs=self._extra_attrs(job))
        return ViewUpdate(started, job)

    def _place_virtual(self, view: SeriesView, message: VirtualMessage) -> None:
        """Put a ``virtual`` message's values into the series' mosaic (under the lock); a malformed one is
        logged and counted, never raised on the collector thread."""
        header, arrays = message.header, message.arrays
        kinds = [str(kind) for kind in header.get("kinds", [])]
        if len(arrays) != len(kinds) + 1 or any(a.shape != arrays[0].shape or a.ndim != 1 for a in arrays):
            logger.error("series %r: a virtual message of worker %s with %d arrays of shapes %s for kinds %s ignored",
                         view.start.series_id, header.get("worker"), len(arrays), [a.shape for a in arrays], kinds)
            self._drop_virtual(message, "malformed", count=len(arrays[0]) if arrays else 0, locked=True)
            return
        if view.virtual is None:
            try:
                detector: VirtualDetector | None = VirtualDetector(
                    float(header["convergence_semiangle_mrad"]), float(header["detector_pixel_mrad"]),
                    tuple((float(inner), float(outer)) for inner, outer in header["annuli_mrad"]))
            except (KeyError, TypeError, ValueError) as exc:
                logger.error("series %r: virtual detector of worker %s not understood: %s", view.start.series_id,
                             header.get("worker"), exc)
                detector = None
            rows, cols = view.start.scan_shape
            shape = (rows, cols) if rows * cols == view.start.n_positions else (1, view.start.n_positions)
            view.virtual = VirtualMosaic(view.start.series_id, shape, detector)
        outside = view.virtual.add(arrays[0], dict(zip(kinds, arrays[1:], strict=True)))
        if outside:
            self._drop_virtual(message, f"{outside} frame indices outside the scan", count=outside, locked=True)

    @staticmethod
    def _place_pattern(view: SeriesView, worker: int, message: PatternMessage) -> None:
        """Keep a worker's latest frame sum (and worker 0's probe amplitude); a malformed message is logged."""
        arrays, header = message.arrays, message.header
        side = view.geometry.detector_px
        with_probe = int(header.get("probe_factor", 0)) > 0
        if (not arrays or arrays[0].shape != (side, side) or len(arrays) != 1 + with_probe
                or (with_probe and arrays[1].ndim != 2)):
            logger.error("series %r: a pattern message of worker %d with arrays %s ignored (frames are %d px)",
                         view.start.series_id, worker, [a.shape for a in arrays], side)
            return
        view.patterns[worker] = (np.array(arrays[0], dtype=np.float64), int(header["frames_summed"]))
        if with_probe:
            view.probe = np.array(arrays[1], dtype=np.float32)
        view.pattern_version += 1

    def _drop_virtual(self, message: VirtualMessage, why: str, count: int | None = None, locked: bool = False) -> None:
        """Count (and log at DEBUG) the frames of a ``virtual`` message that no mosaic takes."""
        frames = count if count is not None else (len(message.arrays[0]) if message.arrays else 0)
        if locked:
            self.virtual_frames_dropped += frames
        else:
            with self._lock:
                self.virtual_frames_dropped += frames
        logger.debug("virtual values of %d frames of series %r from worker %s dropped: %s", frames,
                     message.header.get("series_id"), message.header.get("worker"), why)

    def _extra_attrs(self, job: FinalJob) -> dict[str, Any]:
        """The hook's attributes; a count mismatch makes a ``complete`` reconstruction ``incomplete``."""
        assert self._final_attrs is not None
        attrs = dict(self._final_attrs(job.start.series_id))
        if attrs.get("count_mismatch") and {m.header["status"] for m in job.finals} == {"complete"}:
            attrs["status"] = "incomplete"
        return attrs

    def _view(self, series_id: str) -> tuple[SeriesView | None, dict[str, Any] | None]:
        with self._lock:
            view = self._views.get(series_id)
            done = view is None and series_id not in self._resuming and any(
                entry["series_id"] == series_id for entry in self._finished)
        if view is not None:
            return view, None
        if done:  # a late message about a series whose file is written: its view is gone on purpose
            logger.debug("message about finished series %r ignored", series_id)
            return None, None
        info = self._series(series_id)
        if info is None:
            logger.error("message about unknown series %r ignored", series_id)
            return None, None
        view = SeriesView(info[0], info[1])
        with self._lock:
            self._views[series_id], self._latest = view, series_id
            self._release_finished()
        return view, {"series_id": series_id, "frames_expected": info[0].n_positions,
                      "object_shape": list(info[1].object_shape)}

    def _release_finished(self) -> None:
        """Drop the views of series whose file outcome is known, except the latest's (under the lock)."""
        for series_id in [s for s, v in self._views.items() if s != self._latest and v.status is not None]:
            del self._views[series_id]

    @staticmethod
    def _place(view: SeriesView, worker: int, message: PreviewMessage) -> None:
        row0, row1, col0, col1 = message.header["tile"]
        tile = (row0, row1, col0, col1)
        if view.mosaic is None:
            view.mosaic = Mosaic(view.geometry.object_shape, int(message.header["factor"]))
        view.mosaic.place(tile, message.arrays[0])
        if len(message.arrays) > 1:  # each slice's phase, (S, h, w)
            if not view.slices:
                view.slices = [Mosaic(view.mosaic.object_shape, view.mosaic.factor) for _ in message.arrays[1]]
            for mosaic, layer in zip(view.slices, message.arrays[1], strict=True):
                mosaic.place(tile, layer)
        view.tiles[worker] = dict(message.header)
        view.record_loss(worker, int(message.header["iteration"]), message.header.get("loss_per_frame"))
        view.iteration = max(view.iteration, int(message.header["iteration"]))
        if view.first_preview_s is None:
            view.first_preview_s = time.time()

    def take_preview(self) -> PendingPreview | None:
        """The latest series' mosaic if it changed since the last call (which it then counts as published)."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            if view is None or view.mosaic is None or view.mosaic.version == view.published_version:
                return None
            view.published_version = view.mosaic.version
            mosaic = view.mosaic
            extra = {"version": view.published_version, "object_shape": list(mosaic.object_shape),
                     "n_slices": len(view.slices) or 1}
            by_tiles = sum(t.get("frames_received", 0) for t in view.tiles.values())
            pending = PendingPreview(view.start, view.geometry, mosaic.image, view.iteration, view.tile_list(),
                                     mosaic.factor, extra, by_tiles)
        extra["phase_range_rad"] = display_range(pending.image)  # the colour bar's numbers (outside the lock)
        return pending

    def take_virtual(self) -> VirtualSnapshot | None:
        """The latest series' virtual images if they changed since the last call (which then counts them as
        published)."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            if view is None or view.virtual is None or view.virtual.version == view.virtual_published:
                return None
            mosaic = view.virtual
        snapshot = mosaic.snapshot()  # iDPC outside the views' lock
        with self._lock:
            view.virtual_published = max(view.virtual_published, snapshot.version)
        return snapshot

    def take_pattern(self) -> dict[str, Any] | None:
        """The ``diffraction`` event of the latest series if its mean pattern or probe changed since the last call
        (which then counts it as published): ``series_id``, ``frames_summed``, ``detector_px``, ``probe_shape``
        (None before worker 0 sent one), ``version``."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            if view is None or view.pattern_version == view.pattern_published:
                return None
            view.pattern_published = view.pattern_version
            return {"series_id": view.start.series_id, "frames_summed": sum(n for _, n in view.patterns.values()),
                    "detector_px": view.geometry.detector_px,
                    "probe_shape": None if view.probe is None else list(view.probe.shape),
                    "version": view.pattern_version}

    def finished(self, outcome: FinalOutcome) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record a written (or failed) final file: ``(the /status 'finished' entry, the coverage map)``.

        ``file`` is the name ``/files/`` serves: None for a file in the fallback folder (``fallback`` True,
        ``path`` says where it is, ``error`` why the results folder failed) and for none written.
        """
        job = outcome.job
        finals = job.finals
        path = None if outcome.path is None else str(outcome.path)
        # a reconstruction whose file could not be written is not "complete": say so wherever it is announced
        status = "write_failed" if outcome.path is None else str(job.extra_attrs.get("status",
                                                                                    finals[0].header["status"]))
        coverage = coverage_map(job.start, [m.header["received"] for m in finals])
        served_name = None if outcome.path is None or outcome.fallback else outcome.path.name
        entry = {"series_id": job.start.series_id, "path": path, "file": served_name,
                 "status": status, "iterations": finals[0].header["iterations"], "error": outcome.error,
                 "fallback": outcome.fallback}
        if job.extra_attrs.get("count_mismatch"):  # a DECTRIS series whose image count and scan disagreed
            entry["count_mismatch"] = job.extra_attrs["count_mismatch"]
        with self._lock:
            view = self._views.get(job.start.series_id)
            if job.keep_checkpoints:  # the checkpoint version of a resumed series: its run goes on in the view
                view = None
            else:
                self._resuming.discard(job.start.series_id)
            if view is not None:
                view.path, view.status, view.coverage = path, status, coverage
                view.finals.clear()  # the tile volumes are in the file (or lost, and said so): free them
            self._finished.append(entry)
            self._release_finished()
        return entry, coverage

    def holds(self, series_id: str) -> bool:
        """Whether a series named ``series_id`` is known here: its view, or its file among the finished entries
        (a recovered series being refined on, :meth:`expect_again`, is not: its run goes on). A new series under
        such an id would take the old one's place (its messages dropped as late ones, or its tiles placed in the
        old mosaic), so the ingest refuses its start as a ``duplicate_id`` (ingest thread)."""
        with self._lock:
            if series_id in self._resuming:
                return False
            return series_id in self._views or any(entry["series_id"] == series_id for entry in self._finished)

    def expect_again(self, series_id: str) -> None:
        """A recovered series is resumed (:mod:`ptylive.daemon.service.resume`): its workers' messages after its
        checkpoint version's file are its run's, not late ones (rank 0's main thread, before the ingest starts)."""
        with self._lock:
            self._resuming.add(series_id)

    # HTTP threads --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The latest series' id and iteration, and every finished series' entry."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            return {"series_id": view.start.series_id if view else None,
                    "iteration": view.iteration if view else None,
                    "finished": [dict(entry) for entry in self._finished],
                    "virtual_frames_dropped": self.virtual_frames_dropped}

    def tiles(self) -> dict[str, Any]:
        """``/tiles``: the latest series' tiles, object shape, pixel size (Å), slices, (once finished) coverage,
        each tile's loss curve and the display ranges (rad) of the projected and slice mosaics."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            table: dict[str, Any] = {"series_id": view.start.series_id if view else None,
                                     "object_shape": list(view.geometry.object_shape) if view else None,
                                     # the object's pixel: the viewer's scale bar
                                     "pixel_size_A": float(view.geometry.pixel_size_A) if view else None,
                                     "n_slices": (len(view.slices) or 1) if view else None,
                                     "coverage": view.coverage if view else None,
                                     "tiles": view.tile_list() if view else [],
                                     "loss_curves": view.loss_curve_list() if view else []}
            mosaic = view.mosaic.image if view is not None and view.mosaic is not None else None
            slices = [m.image for m in view.slices] if view is not None else []
        table["phase_range_rad"] = None if mosaic is None else display_range(mosaic)  # the colour bar's numbers
        table["slice_ranges_rad"] = [display_range(image) for image in slices]
        return table

    def preview_png(self) -> bytes | None:
        """PNG of the latest series' projected phase; None before its first preview."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            image = view.mosaic.image if view is not None and view.mosaic is not None else None
        return None if image is None else to_png(image)

    def slice_png(self, index: int) -> bytes | None:
        """Slice ``index``'s phase mosaic of the latest series; None if it has no such slice (yet)."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            image = view.slices[index].image if view is not None and 0 <= index < len(view.slices) else None
        return None if image is None else to_png(image)

    def _latest_virtual(self) -> tuple[SeriesView | None, VirtualSnapshot | None]:
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            mosaic = view.virtual if view is not None else None
        return view, (mosaic.snapshot() if mosaic is not None else None)

    def virtual_snapshot(self) -> VirtualSnapshot | None:
        """The latest series' virtual images now; None before its first frame's values."""
        return self._latest_virtual()[1]

    def virtual_index(self) -> dict[str, Any]:
        """``/virtual.json``: the latest series' id, scan shape, frames filled and expected, and its images
        (:meth:`VirtualSnapshot.describe`; an empty list before the first frame's values)."""
        view, snapshot = self._latest_virtual()
        if view is None:
            return {"series_id": None, "scan_shape": None, "frames_filled": 0, "frames_expected": 0, "images": []}
        rows, cols = view.start.scan_shape
        shape = list(snapshot.scan_shape) if snapshot is not None else (
            [rows, cols] if rows * cols == view.start.n_positions else [1, view.start.n_positions])
        return {"series_id": view.start.series_id, "scan_shape": shape,
                "frames_filled": snapshot.frames_filled if snapshot is not None else 0,
                "frames_expected": view.start.n_positions,
                "images": snapshot.describe() if snapshot is not None else []}

    def virtual_png(self, kind: str) -> bytes | None:
        """The latest series' virtual image ``kind`` as an 8-bit grey PNG, black to white its finite minimum to
        maximum, NaN (no frame yet) black; None without such an image."""
        _, snapshot = self._latest_virtual()
        image = snapshot.images.get(kind) if snapshot is not None else None
        if image is None:
            return None
        finite = image[np.isfinite(image)]
        return to_png(image, (float(finite.min()), float(finite.max())) if finite.size else None)

    def diffraction_png(self) -> bytes | None:
        """The latest series' mean diffraction pattern as an 8-bit grey PNG on a log scale: ``log(1 + mean)``
        (counts), black to white its minimum to maximum; None before any frame was summed."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            mean = view.mean_pattern() if view is not None else None
        if mean is None:
            return None
        shown = np.log1p(np.clip(mean[0], 0.0, None))
        return to_png(shown, (float(shown.min()), float(shown.max())))

    def probe_png(self) -> bytes | None:
        """Worker 0's latest probe amplitude of the latest series, 8-bit grey from its minimum to maximum; None
        before one arrived."""
        with self._lock:
            view = self._views.get(self._latest) if self._latest else None
            probe = view.probe if view is not None else None
        if probe is None:
            return None
        return to_png(probe, (float(np.nanmin(probe)), float(np.nanmax(probe))))
