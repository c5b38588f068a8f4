"""The reconstruction engine of one rank: refine an extended tile.

One iteration visits every probe position once, in ``updates_per_iteration``
*mini-batches* that are defined globally (:func:`minibatch_of` hashes the
position index, so each mini-batch spans the whole scan and every rank). For
each mini-batch::

    g, p   = Σ over the rank's members  ∂L/∂O over windows,  |ψ_s|² over windows
    g, p   = halo exchange (sync: exact totals; async: see async_exchange)
    g     += ∇R(O)   (optional depth penalty, ptylive.gpu.depth: local along z, so exact per rank)
    O     -= step · g / (2 (p + floor_m)),   then |O| ≤ max_amplitude

(``floor_m`` = ``illumination_floor`` × the largest total illumination of
mini-batch m in the first iteration, the same on every rank.)

Because mini-batches are global, the sync result does not depend on the
number of ranks; several updates per iteration converge far faster than
one full-gradient step (measured: see BENCHMARKS.md).

In ``async`` mode (:func:`run_async`, and the streaming workers) every update is
:func:`async_update`: a rank applies its own update at once and neighbours' arrive later.

The factor 2 turns our gradient convention (``2 ∂L/∂O*``) into the classic
ePIE/LSQ step: with ``step = 1`` and one slice, a voxel lit by a single
position moves all the way to the Fourier-projected object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from ptylive.daemon.engine.cone import remove_missing_cone
from ptylive.daemon.engine.decomposition import Box, windows_box
from ptylive.daemon.engine.exchange.protocols import AsyncExchange, SyncExchange
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.positions import PositionCorrection, residual_noise
from ptylive.daemon.engine.step import StepControl, finite_sum, line_search_subset, measure_step, trial_loss
from ptylive.daemon.engine.sweep import (
    WHOLE,
    GradientWorkspace,
    Region,
    disjoint_cover,
    exchange_boxes,
    regions_max,
)
from ptylive.daemon.engine.tile import TileState, batch_positions
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.gpu.depth import add_depth_gradient, depth_weight
from ptylive.gpu.loss import fit_intensity_scale, measured_target
from ptylive.gpu.multislice import forward, loss_and_gradient, wave_segment_slices
from ptylive.gpu.patches import SliceWindows, TileSink
from ptylive.gpu.probe_modes import orthogonalise_modes
from ptylive.gpu.update import constrain, object_update

logger = logging.getLogger(__name__)

@dataclass
class EngineReport:
    """What a rank measured."""

    loss_history: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    floors: list[float] = field(default_factory=list)
    iterations_s: list[float] = field(default_factory=list)
    step_control: StepControl | None = None


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def minibatch_of(global_index: np.ndarray, n_minibatches: int) -> np.ndarray:
    """Global mini-batch of each position: a multiplicative hash of its index.

    A plain ``j mod M`` put whole raster columns into one mini-batch (heavily
    overlapping windows); the hash (Knuth's 2654435761) scatters them over the
    scan, and it depends on nothing but ``j``, so every rank count agrees.
    """
    hashed = (np.asarray(global_index, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return ((hashed >> np.uint64(12)) % np.uint64(n_minibatches)).astype(np.int64)


def minibatches(state: TileState, options: EngineOptions) -> list[np.ndarray]:
    """Local indices of this rank's members of each global mini-batch."""
    labels = minibatch_of(state.domain.positions, options.updates_per_iteration)
    return [np.flatnonzero(labels == m) for m in range(options.updates_per_iteration)]


def fit_scale(state: TileState, exchanger: SyncExchange, options: EngineOptions, mask: Any = None) -> None:
    """Fit the detector scale over all ranks and turn intensities into loss targets.

    ``mask`` ((D, D) bool, True = masked detector pixel) leaves those pixels out of both sums of the scale and out
    of the loss (:data:`~ptylive.gpu.loss.MASKED_TARGET`).
    """
    xp = get_array_module(state.volume)
    keep = None if mask is None else ~xp.asarray(mask, dtype=bool)
    window = state.probe.shape[-1]
    model_total = 0.0
    size = batch_positions(state, options.batch_size)
    for b in (chunk for members in minibatches(state, options) for chunk in _chunks(members, size)):
        field_ = forward(state.probe, xp.asarray(state.shifts[b]), SliceWindows(state.volume, state.starts[b], window),
                         state.propagator, state.targets.shape[-1])
        power = field_.real**2 + field_.imag**2
        model_total += float(xp.sum(power if keep is None else power * keep))
    measured = xp.sum(state.targets) if keep is None else xp.sum(xp.sum(state.targets, axis=0) * keep)
    totals = exchanger.allreduce_sum(np.array([float(measured), model_total]))
    state.scale = fit_intensity_scale(float(totals[0]), float(totals[1]))
    state.targets /= state.targets.dtype.type(state.scale)
    state.targets = measured_target(options.loss, state.targets, mask)
    logger.info("fitted detector scale alpha = %.6g counts per unit probe power", state.scale)


@dataclass
class MinibatchGradient:
    """What :func:`local_gradient` found for some of this rank's positions.

    Attributes
    ----------
    loss : float
        Local loss of every member (before the update).
    subset_loss : float
        Local loss of the first ``n_first`` members (the line-search subset, :mod:`.step`).
    gradient : (S, He, We) complex
    illumination : (S, He, We) real
    probe_gradient : (N, N) or (K, N, N) complex or None
        The probe's shape (one gradient per mode).
    """

    loss: float
    subset_loss: float
    gradient: Any
    illumination: Any
    probe_gradient: Any | None


def local_gradient(
    state: TileState, options: EngineOptions, members: np.ndarray,
    between_batches: Callable[[], None] | None = None, n_first: int = 0,
    positions: PositionCorrection | None = None, workspace: GradientWorkspace | None = None,
) -> MinibatchGradient:
    """Loss, object gradient, illumination and probe gradient of some of this rank's positions.

    Parameters
    ----------
    members : (k,) int
        Local position indices (one mini-batch), processed in chunks of ``batch_size``; the first
        ``n_first`` form chunks of their own so their loss is reported apart.
    positions : PositionCorrection or None
        When given, each member's position gradient and curvature are written into it.
    workspace : GradientWorkspace or None
        Where the tile-sized gradient and illumination come from (zero); None: allocated.
    """
    xp = get_array_module(state.volume)
    window = state.probe.shape[-1]
    if workspace is None:
        gradient = xp.zeros(state.volume.shape, state.volume.dtype)
        illumination = xp.zeros(state.volume.shape, state.volume.real.dtype)
    else:
        gradient, illumination = workspace.begin()
    probe_gradient = xp.zeros_like(state.probe) if options.refine_probe else None
    total = subset_total = 0.0
    size = batch_positions(state, options.batch_size)
    segment = wave_segment_slices(state.volume.shape[0]) if options.recompute_waves else 0
    first = _chunks(members[:n_first], size)
    chunks, n_first_chunks = first + _chunks(members[n_first:], size), len(first)
    for i, b in enumerate(chunks):
        result = loss_and_gradient(state.probe, xp.asarray(state.shifts[b]),
                                   SliceWindows(state.volume, state.starts[b], window), state.propagator,
                                   state.targets[b], options.loss, options.refine_probe,
                                   want_position_gradient=positions is not None,
                                   sink=TileSink(gradient, illumination, state.starts[b]), wave_segment=segment)
        if positions is not None:
            positions.gradient[b] = to_numpy(result.position_gradient)
            positions.curvature[b] = to_numpy(result.position_curvature)
        if probe_gradient is not None:
            probe_gradient += result.probe_gradient
        total += result.loss
        if i < n_first_chunks:
            subset_total += result.loss
        if between_batches is not None:
            between_batches()
    return MinibatchGradient(total, subset_total, gradient, illumination, probe_gradient)


def regularise_depth(gradient: Any, volume: Any, illumination: Any, floor: float, strength: float,
                     own: tuple[slice, slice] | None = None) -> None:
    """Add the depth penalty's gradient (:mod:`ptylive.gpu.depth`, weight μ = ``strength``) to ``gradient``.

    It goes into the gradient before the preconditioned step, so the step measured by :mod:`.step`
    scales the data's and the penalty's parts of the update alike; the line search itself compares
    data losses only (the penalty is not in its trial).

    Parameters
    ----------
    gradient : (S, He, We) complex
        ``sync``: the total over every rank (after :meth:`SyncExchange.reduce_gradients`); every copy of
        a voxel is identical then, so each rank adds the penalty over its whole extended tile and the
        result does not depend on the number of ranks. ``async``: the rank's own gradient.
    illumination : (S, He, We) real
        The total illumination ``p`` the update is preconditioned with (read only).
    own : (rows, cols) slices or None
        ``async``: only this rank's tile (relative to the extended tile) takes the penalty, so each
        voxel's share reaches its other copies once, in the owner's pushed update. None: everywhere.
    """
    if strength == 0 or volume.shape[0] < 2:
        return
    rows, cols = own if own is not None else (slice(None), slice(None))
    add_depth_gradient(gradient[:, rows, cols], volume[:, rows, cols],
                       depth_weight(illumination[:, rows, cols], floor), strength)


def take_step(state: TileState, options: EngineOptions, control: StepControl, subset: np.ndarray,
              gradient: MinibatchGradient, direction: Any, reduce: Callable[[np.ndarray], np.ndarray],
              regions: list[Region] = WHOLE) -> Any:
    """Scale ``direction`` (Δ, the update at step 1) in place by the step of :mod:`.step`; returns it.

    ``reduce`` sums the line-search numbers over the ranks that share the step (every rank in
    ``sync`` mode; the identity in ``async`` mode). A rejected update comes back as zeros. Only
    ``regions`` of ``direction`` are checked and scaled (:mod:`.sweep`: it is zero elsewhere).
    """
    finite = all(finite_sum(direction[:, rows, cols]) for rows, cols in regions)
    alpha = measure_step(control, gradient.subset_loss, finite,
                         partial(trial_loss, state, options, subset, direction), reduce)
    for rows, cols in regions:
        part = direction[:, rows, cols]
        if alpha == 0.0:
            part[...] = 0
        else:
            part *= part.real.dtype.type(alpha)
    return direction


def update_regions(state: TileState, members: np.ndarray, options: EngineOptions, workspace: GradientWorkspace,
                   neighbours: bool) -> list[Region]:
    """Where an update of ``members`` sweeps (:mod:`.sweep`): their windows' box, with ``neighbours`` (sync)
    also the exchange regions; the whole tile for a run's first update and with the depth penalty."""
    if not workspace.constrained or options.depth_regularisation > 0:
        return WHOLE
    boxes: list[Box | None] = [windows_box(state.starts[members], state.probe.shape[-1])]
    if neighbours:
        boxes.extend(exchange_boxes(state.domain))
    return disjoint_cover(boxes)


def precondition(gradient: Any, illumination: Any, floor: float, regions: list[Region]) -> Any:
    """:func:`~ptylive.gpu.update.object_update` at step 1 over ``regions``; returns ``gradient`` (now Δ)."""
    for rows, cols in regions:
        object_update(gradient[:, rows, cols], illumination[:, rows, cols], floor, 1.0)
    return gradient


def apply_update(volume: Any, update: Any, regions: list[Region], max_amplitude: float | None) -> None:
    """``volume += update`` and the amplitude constraint, over ``regions``."""
    for rows, cols in regions:
        target = volume[:, rows, cols]
        target += update[:, rows, cols]
        constrain(target, max_amplitude)


def ordered_for_line_search(state: TileState, members: np.ndarray, n_global: int) -> tuple[np.ndarray, int]:
    """``members`` with the line-search subset first, and the subset's size."""
    chosen = line_search_subset(state.domain.positions[members], n_global)
    return np.concatenate([members[chosen], members[~chosen]]), int(chosen.sum())


def finish_iteration(report: EngineReport, iteration: int, loss: float, start: float,
                      on_iteration: Callable[[int, float, float], None] | None) -> None:
    elapsed = time.perf_counter() - start
    report.iterations_s.append(elapsed)
    if on_iteration is not None:
        on_iteration(iteration, loss, elapsed)


def options_at(options: EngineOptions, iteration: int) -> EngineOptions:
    """The options of ``iteration``: the probe is refined from ``probe_from_iteration`` on (default 0).

    Measured with the power-preserving probe step (:func:`step_probe`): from iteration 0, abTEM's low-dose
    graphene reached 0.79 and from iteration 2 only 0.67; the thick SrTiO3 case 0.978 either way.
    """
    if options.refine_probe and iteration < options.probe_from_iteration:
        return replace(options, refine_probe=False)
    return options


def begin_positions(state: TileState, iteration: int) -> PositionCorrection | None:
    """The position correction collecting gradients in ``iteration`` (zeroed), or None."""
    if state.positions is None or not state.positions.active(iteration):
        return None
    state.positions.begin_iteration()
    return state.positions


def finish_positions(state: TileState, correcting: PositionCorrection | None, exchanger: SyncExchange,
                      options: EngineOptions, loss_per_position: float) -> None:
    """Move the windows after an iteration that collected position gradients (collective: every rank).

    ``loss_per_position`` (this iteration's) sets the prior's noise from the fit's residual
    (:func:`~ptylive.daemon.engine.positions.residual_noise`).
    """
    if correcting is None:
        return
    fit_noise = residual_noise(options.loss, loss_per_position / float(state.targets[0].size))
    update = correcting.finish_iteration(state.starts, state.shifts, state.domain.extended, state.probe.shape[-1],
                                         exchanger, fit_noise)
    logger.info("positions: rms step %.3g px, %d limited, %d clipped, %d not finite; affine %s", update.rms_step_px,
                update.limited, update.clipped, update.nonfinite, update.affine.rotation_scale())


def run_sync(state: TileState, exchanger: SyncExchange, options: EngineOptions,
             on_iteration: Callable[[int, float, float], None] | None = None,
             on_exact_update: Callable[[int, int], None] | None = None,
             between_batches: Callable[[], None] | None = None,
             workspace: GradientWorkspace | None = None) -> EngineReport:
    """Synchronous iterations: exact totals at every update (any number of ranks).

    ``on_exact_update(minibatch, step)`` runs after each update (async mode uses
    its sync warm-up iteration to learn every neighbour's illumination). ``between_batches`` runs between
    chunks of every local gradient (a stop check: an exception it raises leaves the tile as the last
    update left it; in sync mode every rank must raise at the same point, or the others wait in the
    next collective). ``workspace``: the run's gradient arrays (:mod:`.sweep`), made here when None.
    """
    report = EngineReport()
    workspace = GradientWorkspace(state.volume) if workspace is None else workspace
    batches = minibatches(state, options)
    n_positions = float(exchanger.allreduce_sum(np.array([float(len(state.starts))]))[0])
    xp = get_array_module(state.volume)
    floors = report.floors = [0.0] * len(batches)
    sizes = exchanger.allreduce_sum(np.array([float(len(members)) for members in batches]))
    ordered = [ordered_for_line_search(state, members, int(n)) for members, n in zip(batches, sizes, strict=True)]
    control = report.step_control = StepControl.from_options(options)
    for iteration in range(options.iterations):
        start = time.perf_counter()
        loss = 0.0
        correcting = begin_positions(state, iteration)
        now = options_at(options, iteration)
        for m, (members, n_subset) in enumerate(ordered):
            sweep = update_regions(state, members, options, workspace, neighbours=True)
            found = local_gradient(state, now, members, between_batches=between_batches, n_first=n_subset,
                                   positions=correcting, workspace=workspace)
            gradient, illumination = exchanger.reduce_gradients(found.gradient, found.illumination)
            if iteration == 0:  # fixed per mini-batch after the first pass: the same on every rank
                floors[m] = options.illumination_floor * float(
                    exchanger.allreduce_max(np.array([regions_max(illumination, sweep)]))[0])
            regularise_depth(gradient, state.volume, illumination, floors[m], options.depth_regularisation)
            direction = precondition(gradient, illumination, floors[m], sweep)
            take_step(state, options, control, members[:n_subset], found, direction, exchanger.allreduce_sum, sweep)
            apply_update(state.volume, direction, sweep, options.max_amplitude)
            if on_exact_update is not None:
                on_exact_update(m, iteration * len(batches) + m)
            if found.probe_gradient is not None:
                total = xp.asarray(exchanger.allreduce_sum(to_numpy(found.probe_gradient)))
                step_probe(state.probe, (0.5 * options.probe_step_size * options.updates_per_iteration / n_positions)
                           * total)
            loss += found.loss
            workspace.end(sweep)
        remove_missing_cone(state.volume, state.domain, state.cone, workspace, exchanger.reduce_correction,
                            options.max_amplitude)
        report.loss_history.append(float(exchanger.allreduce_sum(np.array([loss]))[0]))
        control.end_iteration(report.loss_history[-1] / n_positions)
        finish_positions(state, correcting, exchanger, options, report.loss_history[-1] / n_positions)
        finish_iteration(report, iteration, report.loss_history[-1], start, on_iteration)
    report.compute_s = sum(report.iterations_s) - exchanger.stats.wait_s
    return report


def async_update(state: TileState, exchanger: AsyncExchange, options: EngineOptions, control: StepControl,
                 members: np.ndarray, minibatch: int, step: int, floor: float | None,
                 positions: PositionCorrection | None = None,
                 between_batches: Callable[[], None] | None = None,
                 workspace: GradientWorkspace | None = None) -> tuple[float, Any, float]:
    """One asynchronous update of the tile: the step offline async and the streaming workers share.

    The local gradient of ``members`` (this rank's positions of global mini-batch ``minibatch``),
    preconditioned by the own illumination plus each neighbour's latest of the same mini-batch, is
    applied at once, constrained, pushed into the accumulated buffers, and what neighbours sent
    meanwhile is added (:meth:`AsyncExchange.progress` also runs between chunks of the gradient).

    Parameters
    ----------
    members : (k,) int
        Local position indices.
    step : int
        Update counter (iteration × mini-batches + mini-batch), for staleness.
    floor : float or None
        Preconditioner floor; None: ``illumination_floor`` × this total illumination's maximum.
    positions : PositionCorrection or None
        Collects the members' position gradients (this iteration corrects positions).
    between_batches : callable or None
        Also called between chunks of the gradient (after the exchange's progress); an exception it raises
        leaves the tile as it was (the update is not applied, nothing is pushed).
    workspace : GradientWorkspace or None
        The run's gradient arrays (:mod:`.sweep`): the update then sweeps only its own windows' box. None:
        fresh arrays, and the whole tile is swept (as every update of a run's first does).

    Returns
    -------
    loss : float
        Local loss of ``members`` before the update.
    probe_gradient : (N, N) complex or None
        This rank's probe gradient (``options.refine_probe``), not yet reduced.
    illumination_max : float
        Maximum of the total illumination used (streaming workers agree on floors from it).
    """
    members, n_subset = ordered_for_line_search(state, members, len(members))

    def between() -> None:
        exchanger.progress(state.volume, step)
        if between_batches is not None:
            between_batches()

    owned = workspace is not None
    workspace = GradientWorkspace(state.volume) if workspace is None else workspace
    sweep = update_regions(state, members, options, workspace, neighbours=False)  # neighbours' updates: progress()
    found = local_gradient(state, options, members, between_batches=between, n_first=n_subset, positions=positions,
                           workspace=workspace)
    own = found.illumination
    total = exchanger.total_illumination(own, minibatch)
    illumination_max = float(total.max())
    if floor is None or not floor > 0:
        floor = options.illumination_floor * illumination_max
    regularise_depth(found.gradient, state.volume, total, floor, options.depth_regularisation,
                     own=state.domain.tile.relative_to(state.domain.extended))
    update = take_step(state, options, control, members[:n_subset], found,
                       precondition(found.gradient, total, max(floor, 1e-30), sweep), np.asarray, sweep)
    apply_update(state.volume, update, sweep, options.max_amplitude)
    exchanger.push(update, own, step, minibatch)
    exchanger.progress(state.volume, step)
    exchanger.enforce_staleness(state.volume, step)
    if owned:
        workspace.end(sweep)
    return found.loss, found.probe_gradient, illumination_max


def step_probe(probe: Any, step: Any) -> None:
    """``probe -= step`` in place, keeping ``Σ|P|²`` (the detector scale α already holds the beam's power).

    Probe power and α are degenerate: a probe step that changed the power was paid back by the object's
    amplitude (own 1e5 e/Å² PbTiO3: correlation 0.89 instead of 0.996).

    With K > 1 modes, (K, N, N), every mode takes its own step, the *total* power ``Σ_k Σ|P_k|²`` is
    kept (the modes' shares are free: they are how partial coherence is learned), and the modes are
    then orthogonalised and sorted by power (:func:`ptylive.gpu.probe_modes.orthogonalise_modes`,
    deterministic, so the ranks of a sync run keep identical modes).
    """
    xp = get_array_module(probe)
    power = float(xp.sum(probe.real**2 + probe.imag**2))
    probe -= step
    new_power = float(xp.sum(probe.real**2 + probe.imag**2))
    if new_power > 0 and np.isfinite(new_power):
        probe *= probe.real.dtype.type(np.sqrt(power / new_power))
    if probe.ndim == 3 and probe.shape[0] > 1 and np.isfinite(new_power):
        probe[...] = orthogonalise_modes(probe)


def apply_probe_total(state: TileState, total: Any, options: EngineOptions, n_positions: float) -> None:
    """Async probe step: the mean gradient over all positions of one iteration (offline and streaming).

    ``total`` has the probe's shape, (N, N) or (K, N, N) (every mode's gradient, :func:`step_probe`).
    """
    if total is not None:
        xp = get_array_module(state.probe)
        step_probe(state.probe, (0.5 * options.probe_step_size / n_positions) * xp.asarray(total))


def run_async(state: TileState, exchanger: AsyncExchange, options: EngineOptions,
              on_iteration: Callable[[int, float, float], None] | None = None,
              between_batches: Callable[[], None] | None = None) -> EngineReport:
    """Asynchronous iterations with the three-buffer exchanger (``between_batches``: as :func:`run_sync`'s).

    The first iteration is exact (blocking, :func:`run_sync`), so every rank
    knows each neighbour's illumination of every mini-batch and the common
    floor; afterwards a rank applies
    its own update at once and neighbours' updates are added when they
    arrive (:mod:`ptylive.daemon.engine.exchange.asynchronous`). The preconditioner uses the
    latest illumination each neighbour sent for the same mini-batch.
    Staleness is counted in updates. The loss history is the sum of every
    rank's local losses, reduced at the end. With probe refinement, each
    iteration's probe gradient is summed by a non-blocking all-reduce and
    applied at the end of the next iteration (every rank applies the same
    totals, so the probes agree).
    """
    batches = minibatches(state, options)
    warm_up = replace(options, iterations=1)
    workspace = GradientWorkspace(state.volume)
    report = run_sync(state, exchanger, warm_up, on_iteration,
                      on_exact_update=exchanger.remember_neighbour_illumination, between_batches=between_batches,
                      workspace=workspace)
    local_losses = list(report.loss_history)  # iteration 0 is exact: already a global sum
    control = report.step_control
    assert control is not None  # run_sync made it
    control.last_loss = float("inf")  # from here on each rank compares its own (local) losses
    n_positions = float(exchanger.allreduce_sum(np.array([float(len(state.starts))]))[0])
    for iteration in range(1, options.iterations):
        start = time.perf_counter()
        loss = 0.0
        probe_gradient_sum = None
        correcting = begin_positions(state, iteration)
        for m, members in enumerate(batches):
            step = iteration * len(batches) + m
            part, probe_gradient, _ = async_update(state, exchanger, options_at(options, iteration), control,
                                                   members, m, step, report.floors[m], correcting,
                                                   between_batches=between_batches, workspace=workspace)
            if probe_gradient is not None and probe_gradient_sum is None:
                probe_gradient_sum = probe_gradient
            elif probe_gradient is not None:
                probe_gradient_sum += probe_gradient
            loss += part
        remove_missing_cone(state.volume, state.domain, state.cone, workspace, exchanger.push_correction,
                            options.max_amplitude)
        if probe_gradient_sum is not None:  # one non-blocking all-reduce per iteration, applied one late
            apply_probe_total(state, exchanger.finish_probe_reduction(), options, n_positions)
            exchanger.start_probe_reduction(to_numpy(probe_gradient_sum))
        local_losses.append(loss)
        control.end_iteration(loss / max(len(state.starts), 1))
        finish_positions(state, correcting, exchanger, options, loss / max(len(state.starts), 1))
        finish_iteration(report, iteration, loss, start, on_iteration)
    if options.refine_probe:
        apply_probe_total(state, exchanger.finish_probe_reduction(), options, n_positions)
    exchanger.finish(state.volume, options.iterations * len(batches))
    constrain(state.volume, options.max_amplitude)
    reduced = exchanger.allreduce_sum(np.array(local_losses[1:])) if len(local_losses) > 1 else np.zeros(0)
    report.loss_history = local_losses[:1] + [float(v) for v in reduced]
    report.compute_s = sum(report.iterations_s) - exchanger.stats.wait_s
    return report
