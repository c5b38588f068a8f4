"""The step of each object update, taken from the data, and the guard against non-finite updates.

Every update moves the object along the preconditioned direction ``Δ = −g / (2 (p + floor))`` (at
step 1 a voxel lit by one position of a single slice moves all the way to the Fourier-projected
object, the ePIE/LSQ step). How far to go is not a constant: with ``S`` slices every slice gets a
full correction and the exit wave moves up to ``S`` times too far (a 20-slice crystal diverged at
step 1 and reconstructed at 0.25). So unless ``--step-size`` fixes it, each mini-batch checks it on
a subset of its positions (a back-tracking line search; Odstrčil et al., Opt. Express 26, 3108
(2018) take the least-squares optimal step per mini-batch, which this approximates where the loss is
near quadratic)::

    L(0)      loss of the subset, from the gradient pass (free)
    L(a)      loss at O + a Δ (constrained like the update): one forward pass of the subset
    L(a) < L(0):  take α = a, and the next trial grows 1.5× up to the nominal step
    otherwise:    L(a/2), one more forward pass; α = minimum of the parabola through the three
                  (within [0, a]); the next trial is α (at least a/4)

The nominal step starts at the classic one (1, the full projection), which thin specimens take at
every update; it is halved after an iteration whose loss rose and grows back otherwise
(:meth:`StepControl.end_iteration`). The search only ever shortens it.

The subset is about a quarter of the mini-batch (at least 8 positions), chosen by a hash of the
global position index, so in ``sync`` mode the three losses are global sums (one all-reduce) and
every rank takes the same α whatever the number of ranks. In ``async`` mode each rank measures its
own α from its own positions (its update is what it pushes to its neighbours).

A non-finite loss or update is never applied: the update is dropped, counted in
:attr:`StepControl.rejected`, logged, and the next trial step is halved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileState, batch_positions
from ptylive.gpu.backend import get_array_module
from ptylive.gpu.loss import loss_function
from ptylive.gpu.multislice import forward
from ptylive.gpu.patches import SliceWindows

logger = logging.getLogger(__name__)

SUBSET_FRACTION = 4  # about 1/4 of a mini-batch measures the step ...
SUBSET_MIN = 8       # ... but at least this many positions
STEP_MIN = 1e-3
GROWTH = 1.5         # after a step that lowered the loss, the next trial grows by this (up to nominal)


@dataclass
class StepControl:
    """The step rule's state on one rank (identical on every rank in ``sync`` mode).

    Attributes
    ----------
    fixed : float or None
        ``--step-size``: every update takes this step (no line search); None: measured.
    trial : float
        The next mini-batch's trial step ``a``.
    nominal : float
        The largest trial now: halved after an iteration whose loss rose (:meth:`end_iteration`).
    largest : float
        The classic step (1 in ``sync`` mode, 0.5 in ``async``, halved for Poisson): nominal's ceiling.
    rejected : int
        Updates not applied because a loss or the update was not finite.
    steps : list of float
        α of every update, in order (0 for rejected ones).
    """

    fixed: float | None
    trial: float
    nominal: float
    largest: float
    rejected: int = 0
    steps: list[float] = field(default_factory=list)
    last_loss: float = float("inf")

    @classmethod
    def from_options(cls, options: EngineOptions) -> StepControl:
        return cls(fixed=options.step_size, trial=options.step, nominal=options.step, largest=options.step)

    def end_iteration(self, loss_per_position: float) -> None:
        """After each iteration: halve the nominal step when the loss rose, else let it grow back (×1.2).

        Per-mini-batch checks see only their own positions; an update can lower them and still raise
        the loss elsewhere (in thick specimens every slice's change spreads as the wave propagates).
        The iteration's loss (every position, before its mini-batch's update) catches that.
        Identical on every rank in ``sync`` mode (the loss is a global sum).
        """
        if not np.isfinite(loss_per_position):
            return
        if loss_per_position > self.last_loss:
            self.nominal = max(0.5 * self.nominal, STEP_MIN)
            self.trial = min(self.trial, self.nominal)
        else:
            self.nominal = min(1.2 * self.nominal, self.largest)
        self.last_loss = loss_per_position


def line_search_subset(global_index: np.ndarray, n_in_minibatch: int) -> np.ndarray:
    """Which of a mini-batch's positions measure the step: a hash of the global index.

    Parameters
    ----------
    global_index : (k,) int
        Global indices of (some of) the mini-batch's positions.
    n_in_minibatch : int
        Size of the whole mini-batch (global in ``sync`` mode, so every rank agrees).

    Returns
    -------
    (k,) bool
    """
    every = max(1, n_in_minibatch // max(SUBSET_MIN, n_in_minibatch // SUBSET_FRACTION))
    hashed = (np.asarray(global_index, dtype=np.uint64) * np.uint64(2246822519)) % np.uint64(2**32)
    return (hashed >> np.uint64(7)) % np.uint64(every) == 0


def trial_loss(state: TileState, options: EngineOptions, subset: np.ndarray, direction: Any, step: float) -> float:
    """Loss of ``subset`` at ``O + step·Δ``, constrained as the update is.

    Parameters
    ----------
    subset : (k,) int
        Local position indices.
    direction : (S, He, We) complex
        Δ, the update at step 1.
    """
    xp = get_array_module(state.volume)
    window = state.probe.shape[-1]
    total = 0.0
    size = batch_positions(state, options.batch_size)
    for first in range(0, len(subset), size):
        chunk = subset[first:first + size]
        trial = SliceWindows(state.volume, state.starts[chunk], window, direction, step, options.max_amplitude)
        field_ = forward(state.probe, xp.asarray(state.shifts[chunk]), trial, state.propagator,
                         state.targets.shape[-1])
        total += loss_function(options.loss)(field_, state.targets[chunk])[0]
    return total


def finite_sum(array: Any) -> bool:
    """True when every element of ``array`` is finite (one reduction: NaN and ±inf reach the sum)."""
    total = complex(get_array_module(array).sum(array))
    return math.isfinite(total.real) and math.isfinite(total.imag)


def parabola_step(loss0: float, loss1: float, loss2: float, trial: float) -> float:
    """The step α minimising the parabola through ``(0, L0), (a, L1), (2a, L2)``, within ``[0, 2a]``.

    Where the three are not convex, the best of the points tried (0 when neither lowered the loss).
    """
    curvature = (loss2 - 2.0 * loss1 + loss0) / (2.0 * trial * trial)
    slope = (4.0 * loss1 - loss2 - 3.0 * loss0) / (2.0 * trial)
    if curvature > 0:
        return min(max(-slope / (2.0 * curvature), 0.0), 2.0 * trial)
    best = min((loss0, 0.0), (loss1, trial), (loss2, 2.0 * trial))
    return best[1]


def measure_step(control: StepControl, loss0: float, finite: bool, loss_at: Callable[[float], float],
                 reduce: Callable[[np.ndarray], np.ndarray]) -> float:
    """Decide α for one update and advance ``control``; returns α (0: apply nothing).

    Parameters
    ----------
    loss0 : float
        This rank's loss of the line-search subset at the current object (``L(0)``).
    finite : bool
        Whether this rank's update is finite.
    loss_at : callable
        ``loss_at(step)``: this rank's subset loss at ``O + step·Δ``.
    reduce : callable
        Sums an array over the ranks that share the step (all ranks in ``sync`` mode).
    """
    trial = control.trial
    first = reduce(np.array([loss0, 0.0 if control.fixed is not None else loss_at(trial), float(not finite)]))
    if first[2] > 0 or not np.all(np.isfinite(first[:2])):
        control.rejected += 1
        control.trial = max(0.5 * trial, STEP_MIN)
        control.steps.append(0.0)
        logger.warning("non-finite loss or update: update not applied (%d so far); next trial step %.3g",
                       control.rejected, control.trial)
        return 0.0
    if control.fixed is not None:
        alpha = control.fixed
    elif first[1] < first[0] or first[0] == 0.0:  # the trial lowers the loss (or nothing was measured)
        alpha = trial
        control.trial = min(GROWTH * trial, control.nominal)
    else:  # back-track: the parabola through L(0), L(a/2), L(a)
        half = float(reduce(np.array([loss_at(0.5 * trial)]))[0])
        alpha = parabola_step(float(first[0]), half, float(first[1]), 0.5 * trial) if np.isfinite(half) else 0.0
        alpha = min(alpha, trial)
        control.trial = max(alpha, 0.25 * trial, STEP_MIN)
    control.steps.append(alpha)
    return alpha
