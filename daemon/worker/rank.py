"""A worker rank of ``ptylive serve``: take frames from the ingest, refine its tile, report to rank 0.

Series are handled one at a time in the order their starts arrived (every worker sees the same
order: the ingest broadcasts starts and control messages). Frames of a series that is queued
behind the running one are stored as they arrive, in that series' own preallocated rows, so the
ingest never has to hold them back. The refinement itself is :mod:`ptylive.daemon.worker.refine`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ptylive.daemon.engine.exchange.consensus import Consensus
from ptylive.daemon.engine.exchange.factory import async_exchanger
from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.engine.loss_choice import AUTO, dark_field_mask
from ptylive.daemon.engine.positions import PositionCorrection
from ptylive.daemon.engine.tile import TileOptics, set_up_tile, tile_view
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.checkpoints import RECOVERED, Checkpoint, checkpoint_path, write_checkpoint
from ptylive.daemon.service.config import ReconstructionConfig, apply_overrides
from ptylive.daemon.service.preview import downsample_factor, slice_phases
from ptylive.daemon.worker.frames import FrameStore
from ptylive.daemon.worker.refine import N_SUM, SeriesFlags, StreamRun, probe_power, refine
from ptylive.daemon.worker.resume import ResumePoint, load_resume
from ptylive.daemon.worker.stats import WorkerStats
from ptylive.daemon.worker.virtual import VirtualFrames, probe_amplitude, series_detector
from ptylive.gpu.backend import PRECISIONS, backend_module, to_numpy
from ptylive.streaming.inbox import SeriesControl, WorkerInbox
from ptylive.streaming.protocol import Frame, Message, SeriesEnd, SeriesStart

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs from the daemon's configuration."""

    worker: int
    n_workers: int
    reconstruction: ReconstructionConfig
    backend: str = "numpy"
    precision: str = "single"
    on_new_start: str = "queue"
    preview_rate_hz: float = 2.0
    preview_max_px: int = 256
    checkpoint_folder: Path | None = None  # None: no checkpoints
    checkpoint_interval_s: float = 0.0  # 0: no checkpoints
    resume_iterations: int = 0  # a resumed series' iterations once every frame is back (0: final_iterations)
    adf_annuli_mrad: tuple[tuple[float, float], ...] | None = None  # [virtual]'s ADF rings; None: the default ring


@dataclass
class SeriesSlot:
    """A series this worker has seen: its frames and what the inbox said about it."""

    start: SeriesStart
    reconstruction: ReconstructionConfig
    store: FrameStore
    flags: SeriesFlags = field(default_factory=SeriesFlags)


class Worker:
    """One worker rank. ``comm`` is the workers' communicator (None for a single worker)."""

    def __init__(self, settings: WorkerSettings, inbox: WorkerInbox, outbox: zmq.Socket, comm: Any | None) -> None:
        self.settings, self.inbox, self.outbox, self.comm = settings, inbox, outbox, comm
        self.xp = backend_module(settings.backend)
        self.real_t, self.complex_t = PRECISIONS[settings.precision]
        self.slots: OrderedDict[str, SeriesSlot] = OrderedDict()
        self.shutdown = False
        self.unknown_frames = self.messages_taken = 0
        self._heartbeat_due = 0.0
        self._preview_due = 0.0
        self._checkpoint_due = 0.0
        self._virtual_due = 0.0
        self._pattern_sent: tuple[str, int, int] | None = None  # (series, frames summed, probe iteration) last sent
        self._running: str | None = None
        self.stats = WorkerStats(settings.backend)
        self._run: tuple[StreamRun, Consensus] | None = None
        if settings.backend == "numpy":  # compile before saying hello, not inside the first iteration
            from ptylive.gpu.warmup import compile_kernels

            compile_kernels(self.real_t, self.complex_t)
        self._send(rank_messages.encode("hello", {"worker": settings.worker, "pid": os.getpid()}))

    def _send(self, frames: list[Any]) -> None:
        """Send one message made by :func:`ptylive.daemon.service.messages.encode` (typed per message)."""
        self.outbox.send_multipart(frames, copy=False)

    def handle(self, message: Message | SeriesControl) -> None:
        """Apply one inbox message."""
        self.messages_taken += 1
        if isinstance(message, Frame):
            slot = self.slots.get(message.series_id)
            if slot is None:
                self.unknown_frames += 1
            else:
                slot.store.add(message)
        elif isinstance(message, SeriesStart):
            self._start(message)
        elif isinstance(message, SeriesEnd):
            if message.series_id in self.slots:
                self.slots[message.series_id].flags.ended = True
        elif message.action == "shutdown":
            self.shutdown = True
            for slot in self.slots.values():
                slot.flags.stop_level = 3
        elif message.series_id is not None and message.series_id in self.slots:
            flags = self.slots[message.series_id].flags
            if message.action in ("finalize", "incomplete"):
                flags.ended = True
                flags.incomplete = flags.incomplete or message.action == "incomplete"
            else:
                flags.stop_level = max(flags.stop_level, 2)

    def _start(self, start: SeriesStart) -> None:
        if self.settings.on_new_start == "finish_now":  # the ingest ended every earlier series
            for slot in self.slots.values():
                slot.flags.ended = True
                slot.flags.stop_level = max(slot.flags.stop_level, 1)
        try:
            reconstruction = apply_overrides(self.settings.reconstruction, start.overrides)
            geometry = series_geometry(start, self.settings.n_workers, reconstruction.upsampling)
        except ValueError as exc:  # rank 0 admitted it with the same checks: this is a bug, not bad input
            logger.error("series %r cannot be set up on worker %d: %s", start.series_id, self.settings.worker, exc)
            self._send(rank_messages.encode("error", {"worker": self.settings.worker, "series_id": start.series_id,
                                                      "error": str(exc)}))
            return
        store = FrameStore.allocate(geometry, self.settings.worker, reconstruction.loss, self.xp, self.real_t)
        detector = series_detector(start, geometry, self.settings.adf_annuli_mrad)
        store.virtual = VirtualFrames(detector, store.global_index, geometry.detector_px, self.xp)  # BF, ADF, CoM
        if reconstruction.loss == AUTO:  # chosen once enough frames are in (daemon.worker.refine)
            store.dark_field = dark_field_mask(geometry.detector_px, geometry.detector_pixel_mrad,
                                               start.convergence_semiangle_mrad)
        self.slots[start.series_id] = slot = SeriesSlot(start, reconstruction, store)
        if self.shutdown:
            slot.flags.stop_level = 3

    def drain(self) -> None:
        """Handle every waiting message; send a heartbeat when one is due."""
        for message in self.inbox.poll(0):
            self.handle(message)
        now = time.monotonic()
        if now >= self._heartbeat_due:
            self._heartbeat_due = now + HEARTBEAT_S
            report = self.stats.report(*(self._run or (None, None)))
            heartbeat: rank_messages.HeartbeatHeader = {
                "worker": self.settings.worker, "series_id": self._running, "messages_taken": self.messages_taken,
                "unknown_frames": self.unknown_frames, **report}
            self._send(rank_messages.encode("heartbeat", heartbeat))
        running = self.slots.get(self._running) if self._running is not None else None
        if running is not None and now >= self._virtual_due:  # twice the preview rate, like the previews
            self._virtual_due = now + 0.5 / self.settings.preview_rate_hz
            self._send_virtual(running.store)
            self._send_pattern(running.store, self._run[0] if self._run is not None else None)

    def _send_virtual(self, store: FrameStore) -> None:
        """The virtual detector values of the frames ``store`` took since the last ``virtual`` message, if any."""
        virtual = store.virtual
        taken = virtual.take() if virtual is not None else None
        if virtual is None or taken is None:
            return
        indices, values = taken
        detector = virtual.detector
        header: rank_messages.VirtualHeader = {
            "series_id": store.geometry.series_id, "worker": self.settings.worker, "kinds": list(values),
            "convergence_semiangle_mrad": detector.convergence_semiangle_mrad,
            "detector_pixel_mrad": detector.detector_pixel_mrad,
            "annuli_mrad": [[float(inner), float(outer)] for inner, outer in detector.annuli_mrad],
            "sent_s": time.time()}
        self._send(rank_messages.encode("virtual", header, indices, *values.values()))

    def _send_pattern(self, store: FrameStore, run: StreamRun | None) -> None:
        """The running sum of ``store``'s frames and (worker 0, refining it in ``run``) the probe's amplitude, if
        either changed since the last ``pattern`` message."""
        if store.virtual is None:
            return
        run = run if run is not None and run.store is store else None
        with_probe = self.settings.worker == 0 and run is not None
        iteration = run.iterations if run is not None and with_probe else 0
        key = (store.geometry.series_id, store.virtual.frames_summed, iteration)
        if key == self._pattern_sent or (not key[1] and not with_probe):
            return
        self._pattern_sent = key
        pattern, frames = store.virtual.pattern()
        probe, factor = probe_amplitude(run.state.probe) if run is not None and with_probe else (None, 0)
        header: rank_messages.PatternHeader = {
            "series_id": key[0], "worker": self.settings.worker, "frames_summed": frames, "probe_factor": factor,
            "iteration": iteration, "sent_s": time.time()}
        self._send(rank_messages.encode("pattern", header, pattern, *(() if probe is None else (probe,))))

    def run(self) -> None:
        """Serve series until a shutdown arrives and no series is left."""
        while not (self.shutdown and not self.slots):
            if not self.slots:
                for message in self.inbox.poll(100):
                    self.handle(message)
                self.drain()
                continue
            series_id, slot = next(iter(self.slots.items()))
            self._running = series_id
            try:
                self._run_series(slot)
            finally:
                self._running = None
                del self.slots[series_id]

    def _run_series(self, slot: SeriesSlot) -> None:
        s, xp = self.settings, self.xp
        r, geometry = slot.reconstruction, slot.store.geometry
        domain = geometry.domains[s.worker]
        optics = TileOptics(slot.start.energy_eV, slot.start.convergence_semiangle_mrad, slot.start.defocus_A,
                            geometry.pixel_size_A, geometry.window_px, r.n_slices, r.slice_thickness_A)
        options = r.engine_options("async", max(1, r.final_iterations))
        state = set_up_tile(domain, optics, slot.store.starts.copy(), slot.store.shifts, slot.store.targets, xp,
                            s.precision, options.probe_modes, options.missing_cone)
        if options.correct_positions:
            state.positions = PositionCorrection.start(slot.store.positions_px, options.positions_from_iteration)
        exchanger = async_exchanger(self.comm, geometry.domains, s.worker, r.n_slices, s.precision, options)
        try:
            resume = load_resume(s.checkpoint_folder, slot.start, geometry, s.worker, slot.store.global_index)
        except Exception:  # noqa: BLE001 - a bad snapshot must not kill the worker: every restart would retry it
            logger.exception("worker %d: the resume snapshots of series %r cannot be used; starting it from vacuum",
                             s.worker, slot.start.series_id)
            resume = None
        final_iterations = (s.resume_iterations or r.final_iterations) if resume is not None else r.final_iterations
        run = StreamRun(state, slot.store, exchanger, options, s.n_workers, final_iterations, r.final_seconds,
                        slot.flags, probe_power(state.probe, state.propagator, r.n_slices, geometry.detector_px,
                                                slot.store.mask))
        run.counted = np.dtype(slot.start.dtype).kind in "ui"  # loss = "auto": Poisson only for counts
        if resume is not None:  # after probe_power: the detector scale keeps the first run's reference
            self._take_over(run, resume)
        factor = max(downsample_factor(d.tile.shape, s.preview_max_px) for d in geometry.domains)
        consensus = Consensus(self.comm, N_SUM, 2 + options.updates_per_iteration)
        self._preview_due = 0.0
        self._checkpoint_due = time.monotonic() + s.checkpoint_interval_s
        self._run = (run, consensus)

        def after_iteration(run_: StreamRun) -> None:
            self._maybe_preview(run_, factor, consensus)
            self._maybe_checkpoint(run_, consensus, slot)

        try:
            refine(run, consensus, self.drain, after_iteration, self._idle)
            self._heartbeat_due = 0.0
            self.drain()  # the last iterations' durations reach rank 0 before the totals move on
        finally:
            self._run = None
            self.stats.finish(run, consensus)
        if resume is not None and run.status in ("complete", "incomplete"):
            run.status = RECOVERED  # a recovered series refined on: its file, /status, PUB and SSE say so
        self._send_final(run, consensus, r.slice_thickness_A)

    def _take_over(self, run: StreamRun, resume: ResumePoint) -> None:
        """Start ``run`` from a recovered series' checkpoints (:mod:`ptylive.daemon.worker.resume`)."""
        state, xp = run.state, self.xp
        if resume.volume.shape != state.volume.shape:  # rank 0 checked the split and the slices: a bug
            logger.error("worker %d: the resume snapshot's tile %s does not fit the tile %s; starting from vacuum",
                         self.settings.worker, resume.volume.shape, state.volume.shape)
            return
        state.volume[...] = xp.asarray(resume.volume, dtype=state.volume.dtype)
        if resume.probe.shape == state.probe.shape:
            state.probe = xp.asarray(resume.probe, dtype=state.probe.dtype)
        else:
            logger.warning("worker %d: the checkpoint's probe %s is not this run's %s (probe modes changed?); "
                           "starting from the optics' probe", self.settings.worker, resume.probe.shape,
                           state.probe.shape)
        run.iterations = resume.iterations
        run.loss_history, run.frames_history = list(resume.loss_history), list(resume.frames_history)
        run.resumed_px = resume.positions_px

    def _idle(self, seconds: float) -> None:
        for message in self.inbox.poll(int(seconds * 1000)):
            self.handle(message)

    def _quality(self, run: StreamRun, consensus: Consensus) -> rank_messages.TileQuality:
        frames = run.frames_history[-1] if run.frames_history else 0
        per_frame = [loss / max(n, 1) for loss, n in zip(run.loss_history[-2:], run.frames_history[-2:], strict=True)]
        rate = (per_frame[0] - per_frame[1]) / per_frame[0] if len(per_frame) == 2 and per_frame[0] > 0 else None
        busy = sum(run.iteration_s)
        wait = run.exchanger.stats.wait_s + consensus.wait_s
        staleness = run.exchanger.stats.staleness
        return {"frames_used": frames, "frames_expected": len(run.store.global_index),
                "frames_received": run.store.n_received, "loss": run.loss_history[-1] if run.loss_history else None,
                "loss_per_frame": per_frame[-1] if per_frame else None, "convergence_rate": rate,
                "wait_fraction": wait / busy if busy > 0 else 0.0, "staleness_max": max(staleness, default=0)}

    def _maybe_preview(self, run: StreamRun, factor: int, consensus: Consensus) -> None:
        now = time.monotonic()
        if now < self._preview_due:
            return
        # Twice the publication rate, so every mosaic rank 0 publishes holds tiles at most half a period old.
        self._preview_due = now + 0.5 / self.settings.preview_rate_hz
        slices = slice_phases(tile_view(run.state), factor)  # the angle of every slice is needed either way
        per_slice = (slices,) if len(slices) > 1 else ()
        t = run.state.domain.tile
        header: rank_messages.PreviewHeader = {
            "series_id": run.store.geometry.series_id, "worker": self.settings.worker, "iteration": run.iterations,
            "tile": [t.row0, t.row1, t.col0, t.col1], "factor": factor, "sent_s": time.time(),
            **self._quality(run, consensus)}
        self._send(rank_messages.encode("preview", header, slices.sum(axis=0, dtype=np.float32), *per_slice))

    def _send_final(self, run: StreamRun, consensus: Consensus, slice_thickness_A: float) -> None:
        self._send_virtual(run.store)  # every stored frame's virtual values reach rank 0 before the final
        self._send_pattern(run.store, run)
        header, arrays = self._final_parts(run, consensus, slice_thickness_A, self.settings.worker == 0)
        self._send(rank_messages.encode("final", header, *arrays))

    def _maybe_checkpoint(self, run: StreamRun, consensus: Consensus, slot: SeriesSlot) -> None:
        """Save the tile as the final it would send now, every ``checkpoint_interval_s`` (rank 0 recovers it
        after a crash: :mod:`ptylive.daemon.service.checkpoints`). A failed write is logged and counted
        (``stats.checkpoint_failures``, in every heartbeat: rank 0's ``/status`` and metrics); refinement goes on,
        the previous checkpoint standing."""
        s, now = self.settings, time.monotonic()
        if s.checkpoint_folder is None or not s.checkpoint_interval_s or now < self._checkpoint_due:
            return
        self._checkpoint_due = now + s.checkpoint_interval_s
        began = time.perf_counter()
        header, arrays = self._final_parts(run, consensus, slot.reconstruction.slice_thickness_A, True)
        checkpoint = Checkpoint(slot.start, s.n_workers, slot.reconstruction.upsampling,
                                rank_messages.FinalMessage(header, arrays))
        path = checkpoint_path(s.checkpoint_folder, slot.start.series_id, s.worker)
        try:
            write_checkpoint(path, checkpoint)
        except OSError as exc:
            self.stats.checkpoint_failures += 1
            logger.error("worker %d: checkpoint %s not written (%d failures so far): %s", s.worker, path,
                         self.stats.checkpoint_failures, exc)
            return
        logger.debug("worker %d: checkpoint of %r at iteration %d in %.3f s", s.worker, slot.start.series_id,
                     run.iterations, time.perf_counter() - began)

    def _final_parts(self, run: StreamRun, consensus: Consensus, slice_thickness_A: float,
                     with_probe: bool) -> tuple[rank_messages.FinalHeader, tuple[np.ndarray, ...]]:
        """The ``final`` header and arrays (tile, probe or empty, corrected and nominal positions) of ``run`` now."""
        t = run.state.domain.tile
        stats = run.exchanger.stats
        probe = to_numpy(run.state.probe) if with_probe else np.zeros(0, self.complex_t)
        header: rank_messages.FinalHeader = {
                  "series_id": run.store.geometry.series_id, "worker": self.settings.worker, "status": run.status,
                  "tile": [t.row0, t.row1, t.col0, t.col1], "iterations": run.iterations,
                  "loss_history": run.loss_history, "frames_history": run.frames_history, "scale": run.store.scale,
                  "slice_thickness_A": slice_thickness_A, "rejected": run.store.rejected,
                  "loss_function": run.options.loss,
                  "received": run.store.global_index[run.store.received].tolist(),
                  "stats": {"compute_s": sum(run.iteration_s) - stats.wait_s, "exchange_wait_s": stats.wait_s,
                            "consensus_wait_s": consensus.wait_s, "bytes_sent": stats.bytes_sent,
                            "staleness_mean": float(np.mean(stats.staleness)) if stats.staleness else 0.0,
                            "staleness_max": max(stats.staleness, default=0),
                            "iterations_total_s": sum(run.iteration_s), "frames_bytes": run.store.memory_bytes(),
                            "frames_received": run.store.n_received},
                  **self._quality(run, consensus)}
        rows = run.store.received
        nominal = run.store.positions_px[rows]
        corrected = run.state.positions.state.positions_px[rows] if run.state.positions is not None else nominal
        return header, (np.ascontiguousarray(to_numpy(tile_view(run.state))), probe,
                        np.ascontiguousarray(corrected, dtype=np.float64),
                        np.ascontiguousarray(nominal, dtype=np.float64))
