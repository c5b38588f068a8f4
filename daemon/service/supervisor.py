"""Rank 0 of ``ptylive serve``: ingest, collector and HTTP in threads, lifecycle in the main thread.

The main thread never touches frames. It admits series (memory budget, geometry), waits for every
worker's hello before ``READY=1``, pings the systemd watchdog while every worker's heartbeat is
fresh, and on SIGTERM/SIGINT shuts down in order: ``STOPPING=1``, the ingest stops reading and tells
the workers (behind the frames already forwarded), workers stop at the same tick and send their
partial tiles, the collector writes them, then every rank meets in a barrier (polled with a deadline,
so a hung worker cannot keep the service alive: the job is aborted instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from prometheus_client import CollectorRegistry

from ptylive.daemon.engine.exchange.sync import common_round_slices
from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.engine.memory_plan import RankMemory, rank_memory
from ptylive.daemon.http.access import ControlAccess
from ptylive.daemon.http.server import Providers, StatusServer
from ptylive.daemon.service.checkpoints import CheckpointFolder, checkpoint_status, state_folder
from ptylive.daemon.service.collector import Collector, CollectorHooks
from ptylive.daemon.service.config import DaemonConfig, apply_overrides, control_token
from ptylive.daemon.service.final_writer import FinalWriter
from ptylive.daemon.service.internal_sockets import InternalSockets
from ptylive.daemon.service.metrics import DaemonMetrics, PreviewLatency
from ptylive.daemon.service.notify import Watchdog, notify, watchdog_period_s
from ptylive.daemon.service.resume import ResumePlan, plan_resumes, resume_feed
from ptylive.daemon.service.roster import DeathWatch
from ptylive.daemon.service.series_views import coverage_rows
from ptylive.gpu.backend import PRECISIONS
from ptylive.streaming.decoders import make_decoder
from ptylive.streaming.detector_maps import DetectorSettings, settings_from_config
from ptylive.streaming.inbox import SeriesControl
from ptylive.streaming.ingest import Ingest, IngestSockets
from ptylive.streaming.protocol import SeriesStart
from ptylive.streaming.recording import Recorder
from ptylive.streaming.router import Router
from ptylive.streaming.scan_plan import ScanPlan, ScanRequest, load_scan_hook, plan_from_settings
from ptylive.streaming.series import RegistryConfig, SeriesRegistry
from ptylive.streaming.series_book import SeriesProgress

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 8.0


def frames_exceed_budget(start: SeriesStart, n_workers: int, precision: str, budget_bytes: int) -> str | None:
    """Refusal when the frames alone, spread evenly over the workers, exceed a worker's budget; else None.

    Arithmetic only (nothing is allocated): a lower bound of what the memory plan counts (it also holds
    object, gradient, buffers and workspace, and frames are never spread better than evenly). A 4096 × 4096
    start of 200 bytes once kept the ingest thread 30 s and 2.45 GB busy before the plan refused it.
    """
    real_bytes = np.dtype(PRECISIONS[precision][0]).itemsize
    crop = start.detector_crop  # workers keep each frame as the crop makes it (streaming.detector_frames)
    rows, cols = start.detector_shape if crop is None else (crop.output_px, crop.output_px)
    per_worker = start.n_positions * rows * cols * real_bytes / max(n_workers, 1)
    if per_worker <= budget_bytes:
        return None
    return (f"series {start.series_id!r}: its {start.n_positions} frames of {rows}×{cols} need at least "
            f"{per_worker / 2**30:.2f} GiB per worker over {n_workers} workers; the budget is "
            f"{budget_bytes / 2**30:.2f} GiB per worker")


class Admission:
    """Decides whether a series can run, and remembers the geometry of those that can.

    Called on the ingest thread; :meth:`lookup` answers other threads (under the lock).
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._series: OrderedDict[str, tuple[SeriesStart, SeriesGeometry]] = OrderedDict()
        # the current, the queued and the finished series rank 0 still shows; older admissions are forgotten
        self.capacity = config.ingest.history + config.ingest.max_queued_series + 2
        self._lock = threading.Lock()

    def __call__(self, start: SeriesStart) -> str | None:
        c = self.config
        try:
            r = apply_overrides(c.reconstruction, start.overrides)
            too_large = frames_exceed_budget(start, c.workers.ranks, c.workers.precision, c.workers.memory_budget_bytes)
            if too_large is not None:  # before the geometry, whose tables alone can take GBs for such a start
                return too_large
            geometry = series_geometry(start, c.workers.ranks, r.upsampling)
        except ValueError as exc:
            return str(exc)
        rounds = common_round_slices(geometry.domains, r.n_slices, c.workers.precision)

        def largest_plan(recompute_waves: bool) -> RankMemory:
            return max((rank_memory(d, r.n_slices, geometry.window_px, geometry.detector_px, r.batch_size,
                                    c.workers.precision, "async", r.updates_per_iteration, r.probe_modes,
                                    round_slices=rounds, recompute_waves=recompute_waves,
                                    missing_cone=r.missing_cone > 0)
                        for d in geometry.domains), key=lambda m: m.total)

        largest = largest_plan(r.recompute_waves)
        if largest.total > c.workers.memory_budget_bytes:
            hint = ""
            if not r.recompute_waves and (smaller := largest_plan(True).total) < largest.total:
                hint = f" (with recompute_waves = true: {smaller / 2**30:.2f} GiB)"
            return (f"series {start.series_id!r} needs {largest.total / 2**30:.2f} GiB on worker {largest.rank} "
                    f"(object {largest.extended_shape} px × {r.n_slices} slices, {largest.n_positions} frames); "
                    f"the budget is {c.workers.memory_budget_bytes / 2**30:.2f} GiB per worker{hint}")
        with self._lock:
            self._series[start.series_id] = (start, geometry)
            while len(self._series) > self.capacity:  # bounded: no dict keyed by client input grows for ever
                self._series.popitem(last=False)
        return None

    def lookup(self, series_id: str) -> tuple[SeriesStart, SeriesGeometry] | None:
        """Start and geometry of an admitted series, or None."""
        with self._lock:
            return self._series.get(series_id)

    def router(self, start: SeriesStart) -> Router:
        """The series' router: its geometry's owner table, the rule the workers' frame stores apply too."""
        entry = self.lookup(start.series_id)
        if entry is None:
            raise ValueError(f"series {start.series_id!r} was not admitted")
        return Router(entry[1].owners, self.config.workers.ranks)


class Rank0:
    """Owns rank 0's threads and sockets; :meth:`serve` runs until a signal or a fatal error."""

    def __init__(self, config: DaemonConfig, context: zmq.Context,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.config, self.context = config, context
        token = control_token(config.http, os.environ)  # read once, before anything is bound
        self.admission = Admission(config)
        c, n = config, config.workers.ranks
        self.scan_plan: ScanPlan | None = None  # DECTRIS formats: each series' scan (streaming/scan_plan.py)
        if c.ingest.format != "ptylive":
            hook = load_scan_hook(c.scan.hook) if c.scan.hook else None  # a ValueError stops the start, named
            self.scan_plan = plan_from_settings(c.scan, hook, history=self.admission.capacity)
        registry = SeriesRegistry(RegistryConfig(c.ingest.on_new_start, c.ingest.history, c.ingest.max_queued_series))
        self.sockets = InternalSockets(c.workers.internal_transport, n,  # removed at exit, even if this fails
                                      interface=c.workers.internal_interface)
        ingest_config = IngestSockets(c.ingest.endpoint, tuple(map(self.sockets.worker, range(n))), c.ingest.bind,
                                     c.ingest.queue_messages, socket_buffer_bytes=c.ingest.socket_buffer_bytes,
                                     idle_timeout_s=c.ingest.idle_timeout_s,
                                     max_buffered_bytes=c.ingest.max_buffered_bytes,
                                     recv_hwm=c.ingest.receive_messages)
        self.ingest = Ingest(ingest_config, self.admission.router, registry, context, admit=self.admission,
                             decoder=make_decoder(c.ingest.format, c.scan, c.ingest.channel, self.scan_plan,
                                                  detector=self._detector_settings()),
                             recorder=Recorder.open(c.ingest.record_to), taken=self._messages_taken,
                             scan_plan=self.scan_plan, used=self._series_held)
        self.metrics = DaemonMetrics(metrics_registry or CollectorRegistry(), self.metrics_snapshot)
        self.latency = PreviewLatency()
        self.checkpoints = CheckpointFolder(state_folder(c.service.state_folder, Path(c.output.folder)),
                                            on_failure=self.metrics.count_checkpoint_failure)
        hooks = CollectorHooks(series=self.admission.lookup, progress=self._progress,
                               on_heartbeat=self.metrics.observe_report, on_preview=self._observe_latency,
                               on_finished=self.checkpoints.forget, final_attrs=self._final_attrs)
        writer = FinalWriter(Path(c.output.folder), fallback_folder=c.output.fallback_folder)
        self.collector = Collector(context, self.sockets.collector(), c.preview.endpoint, hooks,
                                   Path(c.output.folder), n, c.preview.rate_hz, writer=writer, history=c.ingest.history)
        control = self.control if token is not None else None
        access = ControlAccess(token, c.http.allowed_hosts) if token is not None else None
        views = self.collector.views
        self.http = StatusServer(Providers(self.status, views.tiles, views.preview_png, control,
                                           metrics=self.metrics.exposition, events=self.collector.events,
                                           slice_png=views.slice_png, output_folder=Path(c.output.folder),
                                           on_refused=self.metrics.count_refused,
                                           scan=self.scan_request if token is not None else None,
                                           virtual_index=views.virtual_index, virtual_png=views.virtual_png,
                                           diffraction_png=views.diffraction_png, probe_png=views.probe_png),
                                 c.http.host, c.http.port, access, allowed_hosts=c.http.allowed_hosts)
        self.stop = threading.Event()
        self._reported_dead: set[str] = set()
        self.resumes: dict[str, ResumePlan] = {}  # recovered series being refined on (daemon.service.resume)

    def _detector_settings(self) -> DetectorSettings | None:
        """``[detector]`` with its files read (a ValueError naming one that cannot be stops the start); None for
        ptylive stream v1, whose series_start carries its own."""
        if self.config.ingest.format == "ptylive":
            return None
        return settings_from_config(self.config.detector)

    def endpoints(self) -> dict[str, Any]:
        """What operators and detectors connect to (actual ports): the ready file's contents."""
        return {"ingest": self.ingest.endpoint, "preview": self.collector.pub_endpoint, "http": self.http.url,
                "pid": os.getpid()}

    def internal_endpoints(self) -> dict[str, Any]:
        """What the workers connect to; broadcast over MPI only, never published (``ipc://`` by default)."""
        return {"workers": list(self.ingest.worker_endpoints), "collector": self.collector.pull_endpoint}

    def _messages_taken(self, worker: int) -> int | None:
        """What ``worker`` has taken from the ingest, as of its last heartbeat (the ingest's byte bound)."""
        return self.collector.roster.messages_taken(worker)

    def _series_held(self, series_id: str) -> bool:
        """Whether the collector still holds a series of this id (a new start of it is a duplicate); the ingest
        thread asks, which starts after the collector is built."""
        return self.collector.views.holds(series_id)

    def _progress(self, series_id: str) -> SeriesProgress | None:
        """The ingest's progress of a series, with its acceptance times (for the latency), under the book's lock."""
        return self.ingest.book.find(series_id, arrays=True)

    def status(self) -> dict[str, Any]:
        """``/status``: :meth:`counters` plus the coverage map and (DECTRIS formats) the scan plan."""
        return {**self.counters(), "coverage": self.coverage(),
                "scan": None if self.scan_plan is None else self.scan_plan.snapshot()}

    def counters(self) -> dict[str, Any]:
        """Ingest and collector counters (what ``/status`` and the metrics share; no coverage map)."""
        ingest = self.ingest.snapshot()
        current = ingest["registry"]["current"]
        collected = self.collector.status()
        for entry in ingest["workers"]:  # messages waiting for a worker, as of its last heartbeat (≤ 1 s old)
            taken = collected["worker_reports"].get(entry["worker"], {}).get("messages_taken")
            entry["queue_depth"] = None if taken is None else max(
                entry["forwarded"] + entry["control_forwarded"] - taken, 0)
        return {**collected, "ingest": ingest, "frames_received": current["received"] if current else None,
                "frames_expected": current["n_expected"] if current else None,
                "series_id": current["series_id"] if current else collected["series_id"],
                "threads": self.threads(), "ok": self.healthy(),
                "checkpoints": checkpoint_status(self.checkpoints.failures, collected["worker_reports"])}

    def threads(self) -> dict[str, str]:
        """Rank 0's threads: ``running``, ``stopped`` (not started, or stopped cleanly) or ``dead: <exception>``."""
        def state(alive: bool, error: BaseException | None) -> str:
            if error is not None:
                return f"dead: {type(error).__name__}: {error}"[:500]
            return "running" if alive else "stopped"

        return {name: state(*part.thread_state())
                for name, part in (("ingest", self.ingest), ("collector", self.collector), ("http", self.http))}

    def coverage(self) -> dict[str, Any] | None:
        """Coverage map of the current series (between series: the last one that ran), one string of 0/1 per
        scan row (frame ``k`` at row ``k // cols``)."""
        latest = self.ingest.book.latest(arrays=True)
        if latest is None or latest.coverage is None:
            return None
        return coverage_rows(latest.series_id, latest.start.scan_shape, latest.coverage)

    def control(self, action: str, series_id: str | None) -> tuple[bool, str]:
        return self.ingest.request(SeriesControl(action, series_id))  # type: ignore[arg-type]

    def scan_request(self, request: ScanRequest, series_id: str | None) -> tuple[bool, str]:
        """``POST /control`` ``{"action": "scan", ...}``: the scan of the next series (or of ``series_id``)."""
        if self.scan_plan is None:
            return False, ("this daemon reads ptylive stream v1, whose series_start carries its own scan; scan "
                           "requests are for DECTRIS streams ([ingest] format = \"dectris_v1\" or \"dectris_v2\")")
        return True, self.scan_plan.request(request, series_id)

    def _final_attrs(self, series_id: str) -> dict[str, Any]:
        """The result file's scan attributes of a DECTRIS series (source, detector count, count mismatch)."""
        decision = None if self.scan_plan is None else self.scan_plan.decision(series_id)
        resumed = self.resumes.pop(series_id, None)  # a recovered series refined on: its second file
        return {**({} if decision is None else decision.result_attrs()),
                **({} if resumed is None else resumed.result_attrs())}

    def metrics_snapshot(self) -> dict[str, Any]:
        """:meth:`counters` plus the two figures only metrics need (the coverage map is not built per scrape)."""
        status = self.counters()
        ages = status["heartbeat_age_s"].values()
        latest = self.ingest.book.latest()
        status["workers_fresh"] = sum(age < self.config.service.heartbeat_timeout_s for age in ages)
        status["coverage_ratio"] = latest.coverage_fraction if latest is not None else None
        return status

    def _observe_latency(self, header: dict[str, Any], progress: SeriesProgress | None,
                         geometry: SeriesGeometry) -> None:
        """Frame-to-preview latencies of the frames a published preview shows first (collector thread)."""
        if progress is not None and progress.received_s is not None:
            self.metrics.observe_latencies(self.latency.newly_shown(header, progress.received_s, geometry.owner,
                                                                    time.monotonic()))

    def healthy(self) -> bool:
        """Every worker's heartbeat is fresh and every rank-0 thread runs (``/status`` ``ok``; the watchdog's test)."""
        ages = self.collector.roster.heartbeat_ages()
        limit = self.config.service.heartbeat_timeout_s
        return (len(ages) >= self.config.workers.ranks and all(age < limit for age in ages.values())
                and all(state == "running" for state in self.threads().values()))

    def report_dead_threads(self) -> None:
        """Log (once each) and tell systemd about every rank-0 thread that died; the main loop calls this."""
        for name, state in self.threads().items():
            if state.startswith("dead") and name not in self._reported_dead:
                self._reported_dead.add(name)
                logger.error("rank 0's %s thread died (%s); WATCHDOG=1 withheld from now on, so systemd restarts "
                             "the service", name, state.removeprefix("dead: "))
                notify(f"STATUS=the {name} thread died: {state.removeprefix('dead: ')}")

    def serve(self, abort: Callable[[], None]) -> int:
        """Start the threads, announce readiness, loop until stopped; ``abort()`` kills the whole job."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        self._recover()
        self.ingest.start()
        self.collector.start()
        self.http.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        roster = self.collector.roster
        while len(roster.said_hello()) < self.config.workers.ranks and not self.stop.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(f"only workers {sorted(roster.said_hello())} of {self.config.workers.ranks} "
                                   f"said hello within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.05)
        self._announce()
        period = watchdog_period_s(configured_s=self.config.service.watchdog_s)
        watchdog = Watchdog(period, self.healthy) if period else None
        deaths = DeathWatch(roster)
        while not self.stop.wait(0.1):
            deaths.check()
            self.report_dead_threads()
            if watchdog is not None:
                watchdog.maybe_ping(time.monotonic())
        return self._shutdown(abort)

    def _recover(self) -> None:
        """Queue the file of every series the last run left unfinished (before any new series' file), and
        re-stream through the ingest those that can be refined on from the last run's recording (resume)."""
        recovered = self.checkpoints.recover(Path(self.config.output.folder), self.collector.writer.fallback_folder)
        recorder = self.ingest.recorder
        try:
            plans = plan_resumes(recovered, None if recorder is None else recorder.previous, self.config)
        except Exception:  # noqa: BLE001 - a resume is extra: the checkpoint versions are written regardless
            logger.exception("resuming from the recording failed; the recovered series are written from their "
                             "checkpoints only")
            plans = {}
        for job in recovered:
            series_id = job.start.series_id
            if series_id in plans:
                try:  # the workers start from these, while their new checkpoints replace the old ones
                    self.checkpoints.snapshot(series_id, [int(w) for w in job.extra_attrs["recovered_workers"]])
                except OSError as exc:
                    logger.error("series %r is written from its checkpoints only: they could not be snapshotted "
                                 "in %s (%s)", series_id, self.checkpoints.folder, exc)
                    del plans[series_id]
                else:
                    self.collector.views.expect_again(series_id)
            self.collector.writer.submit(dataclasses.replace(job, keep_checkpoints=series_id in plans))
        self.resumes.update(plans)
        if plans:
            self.ingest.preload(resume_feed(list(plans.values())))

    def _announce(self) -> None:
        endpoints = self.endpoints()
        notify("READY=1")
        notify(f"STATUS=ingest {endpoints['ingest']}, viewer {endpoints['http']}")
        print(f"ptylive ready: ingest {endpoints['ingest']}  previews {endpoints['preview']}  "
              f"viewer {endpoints['http']}", flush=True)
        if self.config.service.ready_file:
            path = Path(self.config.service.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as ready:
                ready.write(json.dumps(endpoints))
            tmp.replace(path)

    def _shutdown(self, abort: Callable[[], None]) -> int:
        """Tell the workers, wait for each one's ``bye`` (sent after its last final), then close."""
        notify("STOPPING=1")
        logger.info("shutting down")
        accepted, message = self.ingest.request(SeriesControl("shutdown"), timeout_s=2.0)
        if not accepted:
            logger.error("could not tell the workers to stop: %s", message)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while len(self.collector.roster.said_bye()) < self.config.workers.ranks:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.config.workers.ranks)) - self.collector.roster.said_bye())
                logger.error("workers %s did not stop within %.0f s; aborting the job", missing, SHUTDOWN_TIMEOUT_S)
                self.close()
                abort()
                return 1
            time.sleep(0.02)
        self.close()
        return 0

    def close(self) -> None:
        self.http.close()
        try:
            self.ingest.join(5.0)
        finally:
            self.ingest.close()
            self.collector.close()
            self.sockets.close()
