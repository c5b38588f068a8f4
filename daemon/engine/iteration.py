"""The reconstruction engine of one rank: refine an extended tile.

One iteration visits every probe position once, in ``updates_per_iteration``
*mini-batches* that are defined globally (:func:`minibatch_of` hashes the
position index, so each mini-batch spans the whole scan and every rank). For
each mini-batch::

    g, p   = Σ over the rank's members  ∂L/∂O over windows,  |ψ_s|² over windows
    g, p   = halo exchange (sync: exact totals; async: see async_exchange)
    O     -= step · g / (2 (p + floor_m)),   then |O| ≤ max_amplitude

(``floor_m`` = ``illumination_floor`` × the largest total illumination of
mini-batch m in the first iteration, the same on every rank.)

Because mini-batches are global, the sync result does not depend on the
number of ranks; several updates per iteration converge far faster than
one full-gradient step (measured: see BENCHMARKS.md).

The factor 2 turns our gradient convention (``2 ∂L/∂O*``) into the classic
ePIE/LSQ step: with ``step = 1`` and one slice, a voxel lit by a single
position moves all the way to the Fourier-projected object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.gpu.backend import get_array_module, to_numpy, zeros_aligned
from ptylive.gpu.loss import LOSSES, fit_intensity_scale, measured_target
from ptylive.gpu.multislice import forward, loss_and_gradient
from ptylive.gpu.patches import accumulate_patches, extract_patches
from ptylive.gpu.update import constrain, object_update

logger = logging.getLogger(__name__)

MODES = ("sync", "async")


@dataclass(frozen=True)
class EngineOptions:
    """Iteration settings shared by every rank."""

    iterations: int = 30
    mode: str = "sync"
    batch_size: int = 32
    step_size: float | None = None  # None: see ``step``
    illumination_floor: float = 0.05
    loss: str = "amplitude"
    refine_probe: bool = False
    probe_step_size: float = 0.5
    max_staleness: int = 4
    max_amplitude: float | None = 1.0
    updates_per_iteration: int = 16

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size < 1 or not self.step > 0 or not self.illumination_floor > 0:
            raise ValueError("batch_size, step_size and illumination_floor must be positive")
        if self.updates_per_iteration < 1:
            raise ValueError(f"updates_per_iteration must be >= 1, got {self.updates_per_iteration}")

    @property
    def step(self) -> float:
        """The step size in use: ``step_size``, else 1.0 (sync) or 0.5 (async), halved for Poisson.

        Async applies neighbours' updates one or more updates late; at step 1 (a
        full projection per mini-batch) they over-correct and the iterations diverge.
        Near the solution the Poisson gradient is twice the amplitude one (and larger
        at dark pixels); at step 1 it diverged on PbTiO3 at 1e5 e/Å².
        """
        if self.step_size is not None:
            return self.step_size
        return (1.0 if self.mode == "sync" else 0.5) * (0.5 if self.loss == "poisson" else 1.0)


@dataclass
class TileState:
    """Arrays one rank owns.

    Attributes
    ----------
    domain : RankDomain
    volume : (S, He, We) complex
        Object transmission over the extended tile.
    probe : (N, N) complex
    propagator : (N, N) complex
    starts : (P, 2) int
        Window starts relative to the extended tile.
    shifts : (P, 2) float
        Sub-pixel shifts.
    targets : (P, D, D) real
        Raw intensities until :func:`fit_scale`, then the loss's target.
    """

    domain: RankDomain
    volume: Any
    probe: Any
    propagator: Any
    starts: np.ndarray
    shifts: np.ndarray
    targets: Any
    scale: float = float("nan")


@dataclass
class EngineReport:
    """What a rank measured."""

    loss_history: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    floors: list[float] = field(default_factory=list)
    iterations_s: list[float] = field(default_factory=list)


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


def fit_scale(state: TileState, exchanger: Any, options: EngineOptions) -> None:
    """Fit the detector scale over all ranks and turn intensities into loss targets."""
    xp = get_array_module(state.volume)
    window = state.probe.shape[-1]
    model_total = 0.0
    for b in (chunk for members in minibatches(state, options) for chunk in _chunks(members, options.batch_size)):
        patches = extract_patches(state.volume, state.starts[b], window)
        field_ = forward(state.probe, xp.asarray(state.shifts[b]), patches, state.propagator,
                         state.targets.shape[-1])
        model_total += float(xp.sum(field_.real**2 + field_.imag**2))
    totals = exchanger.allreduce_sum(np.array([float(xp.sum(state.targets)), model_total]))
    state.scale = fit_intensity_scale(float(totals[0]), float(totals[1]))
    state.targets /= state.targets.dtype.type(state.scale)
    state.targets = measured_target(options.loss, state.targets)
    logger.info("fitted detector scale alpha = %.6g counts per unit probe power", state.scale)


def local_gradient(
    state: TileState, options: EngineOptions, members: np.ndarray,
    between_batches: Callable[[], None] | None = None,
) -> tuple[float, Any, Any, Any]:
    """Loss, object gradient, illumination and probe gradient of some of this rank's positions.

    Parameters
    ----------
    members : (k,) int
        Local position indices (one mini-batch), processed in chunks of ``batch_size``.

    Returns
    -------
    loss : float
    gradient : (S, He, We) complex
    illumination : (S, He, We) real
    probe_gradient : (N, N) complex or None
    """
    xp = get_array_module(state.volume)
    window = state.probe.shape[-1]
    gradient = zeros_aligned(xp, state.volume.shape, state.volume.dtype)
    illumination = xp.zeros(state.volume.shape, state.volume.real.dtype)
    probe_gradient = xp.zeros_like(state.probe) if options.refine_probe else None
    total = 0.0
    for b in _chunks(members, options.batch_size):
        patches = extract_patches(state.volume, state.starts[b], window)
        result = loss_and_gradient(state.probe, xp.asarray(state.shifts[b]), patches, state.propagator,
                                   state.targets[b], options.loss, options.refine_probe)
        accumulate_patches(gradient, state.starts[b], result.object_gradient)
        accumulate_patches(illumination, state.starts[b], result.illumination)
        if probe_gradient is not None:
            probe_gradient += result.probe_gradient
        total += result.loss
        if between_batches is not None:
            between_batches()
    return total, gradient, illumination, probe_gradient


def finish_iteration(report: EngineReport, iteration: int, loss: float, start: float,
                      on_iteration: Callable[[int, float, float], None] | None) -> None:
    elapsed = time.perf_counter() - start
    report.iterations_s.append(elapsed)
    if on_iteration is not None:
        on_iteration(iteration, loss, elapsed)


def run_sync(state: TileState, exchanger: Any, options: EngineOptions,
             on_iteration: Callable[[int, float, float], None] | None = None,
             on_exact_update: Callable[[int, int], None] | None = None) -> EngineReport:
    """Synchronous iterations: exact totals at every update (any number of ranks).

    ``on_exact_update(minibatch, step)`` runs after each update (async mode uses
    its sync warm-up iteration to learn every neighbour's illumination).
    """
    report = EngineReport()
    batches = minibatches(state, options)
    n_positions = float(exchanger.allreduce_sum(np.array([float(len(state.starts))]))[0])
    xp = get_array_module(state.volume)
    floors = report.floors = [0.0] * len(batches)
    for iteration in range(options.iterations):
        start = time.perf_counter()
        loss = 0.0
        for m, members in enumerate(batches):
            part, gradient, illumination, probe_gradient = local_gradient(state, options, members)
            gradient, illumination = exchanger.reduce_gradients(gradient, illumination)
            if iteration == 0:  # fixed per mini-batch after the first pass: the same on every rank
                floors[m] = options.illumination_floor * float(
                    exchanger.allreduce_max(np.array([float(illumination.max())]))[0])
            state.volume += object_update(gradient, illumination, floors[m], options.step)
            constrain(state.volume, options.max_amplitude)
            if on_exact_update is not None:
                on_exact_update(m, iteration * len(batches) + m)
            if probe_gradient is not None:
                total = xp.asarray(exchanger.allreduce_sum(to_numpy(probe_gradient)))
                state.probe -= (0.5 * options.probe_step_size * options.updates_per_iteration / n_positions) * total
            loss += part
        report.loss_history.append(float(exchanger.allreduce_sum(np.array([loss]))[0]))
        finish_iteration(report, iteration, report.loss_history[-1], start, on_iteration)
    report.compute_s = sum(report.iterations_s) - exchanger.stats.wait_s
    return report
