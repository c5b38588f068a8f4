"""Asynchronous iterations: the engine's side of the three-buffer halo exchange.

The exchanger (:mod:`ptylive.daemon.engine.exchange.asynchronous`) moves updates; this module
decides when to compute, apply, push and poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from ptylive.daemon.engine.iteration import (
    EngineOptions,
    EngineReport,
    TileState,
    finish_iteration,
    local_gradient,
    minibatches,
    run_sync,
)
from ptylive.gpu.backend import get_array_module, to_numpy
from ptylive.gpu.update import constrain, object_update

logger = logging.getLogger(__name__)


def _apply_probe_total(state: TileState, total: Any, options: EngineOptions, n_positions: float) -> None:
    """Async probe step: the mean gradient over all positions of one iteration."""
    if total is not None:
        xp = get_array_module(state.probe)
        state.probe -= (0.5 * options.probe_step_size / n_positions) * xp.asarray(total)


def run_async(state: TileState, exchanger: Any, options: EngineOptions,
              on_iteration: Callable[[int, float, float], None] | None = None) -> EngineReport:
    """Asynchronous iterations with the three-buffer exchanger.

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
    report = run_sync(state, exchanger, warm_up, on_iteration,
                      on_exact_update=exchanger.remember_neighbour_illumination)
    local_losses = list(report.loss_history)  # iteration 0 is exact: already a global sum
    n_positions = float(exchanger.allreduce_sum(np.array([float(len(state.starts))]))[0])
    for iteration in range(1, options.iterations):
        start = time.perf_counter()
        loss = 0.0
        probe_gradient_sum = None
        for m, members in enumerate(batches):
            step = iteration * len(batches) + m
            part, gradient, own_illumination, probe_gradient = local_gradient(
                state, options, members, between_batches=partial(exchanger.progress, state.volume, step))
            update = object_update(gradient, exchanger.total_illumination(own_illumination, m),
                                   report.floors[m], options.step)
            state.volume += update
            constrain(state.volume, options.max_amplitude)
            exchanger.push(update, own_illumination, step, m)
            exchanger.progress(state.volume, step)
            exchanger.enforce_staleness(state.volume, step)
            if probe_gradient is not None and probe_gradient_sum is None:
                probe_gradient_sum = probe_gradient
            elif probe_gradient is not None:
                probe_gradient_sum += probe_gradient
            loss += part
        if probe_gradient_sum is not None:  # one non-blocking all-reduce per iteration, applied one late
            _apply_probe_total(state, exchanger.finish_probe_reduction(), options, n_positions)
            exchanger.start_probe_reduction(to_numpy(probe_gradient_sum))
        local_losses.append(loss)
        finish_iteration(report, iteration, loss, start, on_iteration)
    if options.refine_probe:
        _apply_probe_total(state, exchanger.finish_probe_reduction(), options, n_positions)
    exchanger.finish(state.volume, options.iterations * len(batches))
    constrain(state.volume, options.max_amplitude)
    reduced = exchanger.allreduce_sum(np.array(local_losses[1:])) if len(local_losses) > 1 else []
    report.loss_history = local_losses[:1] + [float(v) for v in reduced]
    report.compute_s = sum(report.iterations_s) - exchanger.stats.wait_s
    return report
