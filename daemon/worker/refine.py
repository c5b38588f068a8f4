"""Continuous refinement of one series on one worker while its frames arrive.

The worker iterates over every frame received so far with the asynchronous halo exchange
(:mod:`ptylive.daemon.engine.exchange.asynchronous`), in the same global mini-batches as offline
(:func:`ptylive.daemon.engine.iteration.minibatch_of`). A *tick* is one pass of the loop below; every
worker runs the same ticks because all decisions come from :class:`~ptylive.daemon.engine.exchange.consensus.Consensus`
totals that every worker receives identically::

    post(local facts)                     # frames, Σ intensities, ended?, stop?, illumination maxima
    loop:
        drain inbox                       # new frames land in their preallocated rows
        totals = collect()                # the previous tick's post, summed / maxed over workers
        post(local facts)
        decide(totals) → stop | idle (no frames anywhere yet) | iterate
        α = Σ I / (n · ‖crop F P‖²)         # running global detector scale; exact at the end
        one iteration over received frames (a frame received during it joins the next one)

The preconditioner grows by itself: each mini-batch's illumination is recomputed from the frames
it holds at every update, own plus each neighbour's latest (async exchange), and the floors
(``illumination_floor`` × the largest total illumination of each mini-batch) are global maxima
of the previous-but-one tick. After every worker saw the series end, ``final_iterations`` more
iterations run (or ``final_seconds``, whichever comes first); then the exchange drains and the
worker sends its tile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ptylive.daemon.engine.cone import remove_missing_cone
from ptylive.daemon.engine.exchange.consensus import Consensus
from ptylive.daemon.engine.exchange.protocols import AsyncExchange
from ptylive.daemon.engine.iteration import (
    apply_probe_total,
    async_update,
    begin_positions,
    finish_positions,
    minibatch_of,
)
from ptylive.daemon.engine.loss_choice import AUTO, choose_loss
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.step import StepControl
from ptylive.daemon.engine.sweep import GradientWorkspace
from ptylive.daemon.engine.tile import TileState
from ptylive.daemon.worker.frames import FrameStore
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.gpu.multislice import forward
from ptylive.gpu.patches import extract_patches
from ptylive.gpu.update import constrain

logger = logging.getLogger(__name__)

STOP_LEVELS = {0: None, 1: "superseded", 2: "aborted", 3: "interrupted"}
N_SUM = 4  # Σ intensities, frames received, workers that saw the end, Σ dark-field counts (loss = "auto")
#: With loss = "auto", the loss is chosen (daemon.engine.loss_choice) once this share of the series' frames is in
#: (at least CHOOSE_MIN_FRAMES of them, or all at the end): a few first frames, perhaps off the specimen, would
#: not say how it scatters. Until then the workers store frames and do not iterate.
CHOOSE_SHARE = 0.1
CHOOSE_MIN_FRAMES = 32
IDLE_S = 0.02


@dataclass
class SeriesFlags:
    """What the worker learned from its inbox about one series (set between ticks)."""

    ended: bool = False
    stop_level: int = 0  # index into STOP_LEVELS
    incomplete: bool = False  # ended by the ingest's idle timeout: every worker gets the same control message


@dataclass
class StreamRun:
    """One worker's refinement of one series."""

    state: TileState
    store: FrameStore
    exchanger: AsyncExchange
    options: EngineOptions
    n_workers: int
    final_iterations: int
    final_seconds: float
    flags: SeriesFlags
    probe_power: float
    iterations: int = 0
    final_done: int = 0
    final_started: float | None = None
    loss_history: list[float] = field(default_factory=list)
    frames_history: list[int] = field(default_factory=list)
    iteration_s: list[float] = field(default_factory=list)
    status: str = "complete"
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    floors: np.ndarray = field(default_factory=lambda: np.zeros(0))
    illumination_max: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_control: StepControl = field(init=False)
    probe_frames: float = 1.0
    placed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # rows whose window the tile took
    # a resumed series (daemon.worker.resume): per row, the corrected position its checkpoint held (NaN: none)
    resumed_px: np.ndarray | None = None
    counted: bool = True  # integer detector counts (loss = "auto" takes Poisson only for those)
    # the run's gradient arrays, kept between updates so each sweeps only what it touched (engine.sweep)
    workspace: GradientWorkspace | None = None

    def __post_init__(self) -> None:
        self.step_control = StepControl.from_options(self.options)
        m = self.options.updates_per_iteration
        self.labels = minibatch_of(self.store.global_index, m)
        self.floors, self.illumination_max = np.zeros(m), np.zeros(m)
        self.placed = np.zeros(len(self.store.global_index), bool)

    @property
    def step(self) -> int:
        return self.iterations * self.options.updates_per_iteration


def probe_power(probe: Any, propagator: Any, n_slices: int, detector_px: int, mask: Any = None) -> float:
    """``‖crop F P‖²``: the model's power per frame for a vacuum object (every position alike), over the detector
    pixels ``mask`` ((D, D) bool, True = masked) leaves in, as the measured sum counts them (``FrameStore``)."""
    xp = get_array_module(probe)
    window = probe.shape[-1]
    ones = xp.ones((n_slices, window, window), dtype=probe.dtype)
    patches = extract_patches(ones, np.zeros((1, 2), np.int64), window)
    field_ = forward(probe, xp.zeros((1, 2), dtype=probe.real.dtype), patches, propagator, detector_px)
    power = field_.real**2 + field_.imag**2
    if mask is not None:
        power = power * ~xp.asarray(mask, dtype=bool)
    return float(xp.sum(power))


def _local_facts(run: StreamRun) -> tuple[np.ndarray, np.ndarray]:
    elapsed = 0.0 if run.final_started is None else time.monotonic() - run.final_started
    sums = np.array([run.store.intensity_sum, run.store.n_received, float(run.flags.ended),
                     run.store.dark_field_sum])
    maxes = np.concatenate([[float(run.flags.stop_level), elapsed], run.illumination_max])
    return sums, maxes


def _decide(run: StreamRun, sums: np.ndarray, maxes: np.ndarray) -> str | None:
    """The stop status, or None to go on; identical on every worker (totals only, plus shared counters)."""
    level = int(maxes[0])
    if level:
        return STOP_LEVELS[level]
    if sums[2] >= run.n_workers:  # every worker saw the end: no frame is still on its way
        if sums[1] == 0:
            return "empty"
        if not sums[0] > 0:  # frames, but not one count in any (a closed shutter): nothing to fit
            return "dark"
        if run.final_done >= run.final_iterations or 0 < run.final_seconds <= maxes[1]:
            return "incomplete" if run.flags.incomplete else "complete"
        if run.final_started is None:
            run.final_started = time.monotonic()
    return None


def _can_choose(run: StreamRun, sums: np.ndarray) -> bool:
    """Whether enough of the series' frames are in to choose the loss from (the same answer on every worker)."""
    total = len(run.store.geometry.positions_px)
    return bool(sums[1] >= min(total, max(CHOOSE_MIN_FRAMES, CHOOSE_SHARE * total)) or sums[2] >= run.n_workers)


def choose_run_loss(run: StreamRun, loss: str) -> None:
    """Fit with ``loss`` from now on (before the first iteration: no target is converted yet)."""
    run.options = replace(run.options, loss=loss)
    run.store.loss = loss
    run.step_control = StepControl.from_options(run.options)


def take_new_windows(run: StreamRun, usable: np.ndarray) -> None:
    """Rows about to be iterated for the first time take their window from the store (header positions
    included); with position correction they also start their correction there (nominal = current).

    The tile keeps its own windows after that: position correction moves them, the store's stay nominal.
    """
    new = usable & ~run.placed
    if not new.any():
        return
    state, store = run.state, run.store
    state.starts[new] = store.starts[new]
    state.shifts[new] = store.shifts[new]
    if state.positions is not None:
        state.positions.nominal_px[new] = store.positions_px[new]
        state.positions.state.positions_px[new] = store.positions_px[new]
    if run.resumed_px is not None:  # rows a checkpoint held go on from where their correction had moved them
        moved = new & np.isfinite(run.resumed_px[:, 0])
        if moved.any():
            state.starts[moved], state.shifts[moved] = state.domain.extended.windows(run.resumed_px[moved],
                                                                                    store.geometry.window_px)
            if state.positions is not None:
                state.positions.state.positions_px[moved] = run.resumed_px[moved]
    run.placed |= new


class StopRequested(Exception):
    """Raised between batches of an update when the worker was told to stop (:func:`_iterate` catches it)."""


def _iterate(run: StreamRun, drain: Callable[[], None], n_frames: float) -> float:
    """One pass over every converted frame in the global mini-batches; returns the local loss.

    With probe refinement (in the final iterations, once every frame is in), the iteration's probe
    gradient is summed over workers by one non-blocking all-reduce and applied at the end of the next
    iteration, as offline async does;
    every worker posts one per iteration (they iterate on the same ticks), so the probes agree.
    ``n_frames`` is the number of frames every worker holds together (the mean gradient's divisor).
    """
    state, exchanger = run.state, run.exchanger
    # The probe is refined only once every frame is in (every worker saw the end, the same tick on all):
    # refined from a growing, partial scan it absorbed object structure (bad-input series fell to 0.77).
    options = run.options if run.final_started is not None else replace(run.options, refine_probe=False)
    usable = run.store.converted.copy()
    take_new_windows(run, usable)
    # Positions too are corrected only once every frame is in, counting iterations from there: over a growing
    # partial scan (a strip of rows) local shifts of object and positions together are nearly free, and in the
    # many iterations of a slow acquisition the positions walked 3 px rms (own PbTiO3 at 100 frames/s:
    # correlation 0.99 -> -0.12).
    correcting = begin_positions(state, run.final_done) if run.final_started is not None else None
    loss = 0.0
    probe_sum = None
    run.illumination_max[...] = 0.0

    def stop_between_batches() -> None:  # a stop request ends the iteration between batches, however slow it is
        drain()
        if run.flags.stop_level:
            raise StopRequested

    if run.workspace is None or run.workspace.gradient.shape != state.volume.shape:
        run.workspace = GradientWorkspace(state.volume)
    for m in range(options.updates_per_iteration):
        step = run.step + m
        members = np.flatnonzero(usable & (run.labels == m))
        try:
            part, probe_gradient, run.illumination_max[m] = async_update(
                state, exchanger, options, run.step_control, members, m, step, run.floors[m],
                positions=correcting, between_batches=stop_between_batches, workspace=run.workspace)
        except StopRequested:  # the unfinished update is dropped; the iteration's collectives still match
            logger.info("stop requested: iteration %d ended after %d of %d updates", run.iterations, m,
                        options.updates_per_iteration)
            if options.refine_probe and probe_sum is None:
                probe_sum = state.probe * 0  # every worker posts one probe reduction per iteration
            break
        if probe_gradient is not None:
            probe_sum = probe_gradient if probe_sum is None else probe_sum + probe_gradient
        drain()
        loss += part
    else:  # a stopped iteration leaves the tile as its last update did
        remove_missing_cone(state.volume, state.domain, state.cone, run.workspace, exchanger.push_correction,
                            options.max_amplitude)
    if probe_sum is not None:
        apply_probe_total(state, exchanger.finish_probe_reduction(), options, run.probe_frames)
        exchanger.start_probe_reduction(to_numpy(probe_sum))
        run.probe_frames = max(n_frames, 1.0)
    # Every worker iterates on the same ticks, so every one reaches this collective (three blocking sums) in
    # the same iteration, a stopped one included (its positions not visited since the stop follow the affine).
    finish_positions(state, correcting, exchanger, options, loss / max(int(usable.sum()), 1))
    return loss


def refine(run: StreamRun, consensus: Consensus, drain: Callable[[], None],
           after_iteration: Callable[[StreamRun], None], idle: Callable[[float], None]) -> StreamRun:
    """Run ticks until the workers agree to stop; then drain the exchange. Sets ``run.status``.

    Parameters
    ----------
    drain : callable
        Takes every message waiting in the inbox (frames into ``run.store``, flags into ``run.flags``).
    after_iteration : callable
        Called with the run after each iteration (previews, heartbeats).
    idle : callable
        ``idle(seconds)`` waits for messages while no worker has frames yet.
    """
    def while_waiting() -> None:
        run.exchanger.progress(run.state.volume, run.step)
        drain()

    consensus.post(*_local_facts(run))
    while True:
        drain()
        sums, maxes = consensus.collect(while_waiting)
        consensus.post(*_local_facts(run))
        status = _decide(run, sums, maxes)
        if status is not None:
            run.status = status
            break
        if sums[1] == 0 or not sums[0] > 0:  # no frame, or no count yet: no detector scale to fit
            idle(IDLE_S)
            continue
        if run.options.loss == AUTO:
            if not _can_choose(run, sums):
                idle(IDLE_S)
                continue
            choose_run_loss(run, choose_loss(AUTO, sums[3] / sums[0], run.counted))
        started = time.perf_counter()
        run.store.set_scale(sums[0] / (sums[1] * run.probe_power))
        run.floors = run.options.illumination_floor * maxes[2:]
        loss = _iterate(run, drain, float(sums[1]))
        used = int(run.store.converted.sum())
        if run.frames_history and run.frames_history[-1] != used:  # new frames: losses are not comparable
            run.step_control.last_loss = float("inf")
        run.step_control.end_iteration(loss / max(used, 1))
        run.iterations += 1
        run.final_done += run.final_started is not None
        run.loss_history.append(loss)
        run.frames_history.append(int(run.store.converted.sum()))
        run.iteration_s.append(time.perf_counter() - started)
        after_iteration(run)
    consensus.collect(while_waiting)
    if run.options.refine_probe:  # the last iteration's probe total
        apply_probe_total(run.state, run.exchanger.finish_probe_reduction(), run.options, run.probe_frames)
    run.exchanger.finish(run.state.volume, run.step)
    constrain(run.state.volume, run.options.max_amplitude)
    logger.info("worker finished series %r: %s after %d iterations, %d of %d frames", run.store.geometry.series_id,
                run.status, run.iterations, run.store.n_received, len(run.store.global_index))
    return run
