"""Part 1b of ``ptylive bench engine``: a whole iteration against the bare FFTs it contains.

One rank refines a simulated scan (64-px window, 16×16 positions 4 px apart: 256 positions, object
124² px) with the default options (:class:`~ptylive.daemon.engine.options.EngineOptions`: one update
per iteration, line search, probe refinement, position correction from iteration 3, the missing-cone
filter once per iteration). During every
iteration each FFT the engine performs is logged (its shape and direction, through
:mod:`ptylive.gpu.fft`); right after the iteration the same transforms are replayed bare (unscaled, on
aligned arrays of those shapes) and timed. So the reference is exactly the FFT work of that
iteration, measured next to it; ratio = iteration / replay, its median over iterations.

The large-object case pads the same scan into an object of about 23× the area (the scan in the
middle, the same data and FFTs): its ratio over the small case's is the cost of object area at fixed
work (1.0: none). The missing-cone filter's transforms are numpy's (``xp.fft``), not in the replay: its
whole cost is in the iteration's ratio, and it is timed apart too (``filter / FFTs``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

import ptylive.daemon.engine.iteration as iteration_module
import ptylive.gpu.fft as fft_module
from ptylive.daemon.engine.decomposition import decompose
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.iteration import fit_scale, run_sync
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.gpu.backend import empty_aligned
from ptylive.gpu.patches import window_starts
from ptylive.gpu.simulate import SimulationSpec, simulate

WARM_UP_ITERATIONS = 3  # position correction starts at iteration 3 by default: time the steady state after it
LARGE_OBJECT_PAD_PX = 236  # 124² -> 596² px: 23.1x the area


def iteration_problem(n_slices: int, pad_px: int = 0, window_px: int = 64,
                      missing_cone: float = EngineOptions().missing_cone) -> TileState:
    """One rank's tile of the benchmark scan (complex64), the detector scale fitted.

    ``pad_px`` vacuum pixels are added on every side of the object; the scan and its data do not change.
    ``missing_cone`` is the filter's strength (the engine's default; 0: off).
    """
    spec = SimulationSpec(detector_px=window_px, detector_pixel_mrad=1.5, n_slices=n_slices, scan_shape=(16, 16),
                          scan_step_px=4.0)
    sim = simulate(spec)
    shape = (sim.object_truth.shape[1] + 2 * pad_px, sim.object_truth.shape[2] + 2 * pad_px)
    positions = sim.positions_px + pad_px
    domain = decompose(shape, positions, window_px, 1)[0]
    starts, shifts = window_starts(positions, window_px)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A,
                        window_px, n_slices, spec.slice_thickness_A, sim.probe)
    state = set_up_tile(domain, optics, starts, shifts, sim.intensities, np, "single", missing_cone=missing_cone)
    fit_scale(state, NullExchanger(), EngineOptions())
    return state


@contextmanager
def logged_ffts(calls: list[tuple[tuple[int, ...], Any, str]]) -> Iterator[Callable[..., np.ndarray]]:
    """Append ``(shape, dtype, direction)`` of every CPU FFT run inside the block to ``calls``.

    Yields the unlogged transform ``(x, direction, normalise)``, for the replay.
    """
    original = fft_module._cpu_inplace

    def logged(x: np.ndarray, direction: str, normalise: bool) -> np.ndarray:
        calls.append((x.shape, x.dtype, direction))
        return original(x, direction, normalise)

    fft_module._cpu_inplace = logged
    try:
        yield original
    finally:
        fft_module._cpu_inplace = original


@contextmanager
def timed_cone_filter(seconds: list[float]) -> Iterator[None]:
    """Append the wall time of every missing-cone correction run inside the block to ``seconds``.

    The filter's own transforms are ``xp.fft``'s, not :mod:`ptylive.gpu.fft`'s, so they are not in the replay:
    its whole cost shows in the iteration's ratio, and here apart.
    """
    original = iteration_module.remove_missing_cone

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(*args, **kwargs)
        seconds.append(time.perf_counter() - start)

    iteration_module.remove_missing_cone = timed
    try:
        yield
    finally:
        iteration_module.remove_missing_cone = original


def replay_s(calls: list[tuple[tuple[int, ...], Any, str]], arrays: dict[tuple[Any, ...], np.ndarray],
             transform: Callable[..., np.ndarray]) -> float:
    """Seconds to run ``calls`` again as bare, unscaled FFTs through ``transform`` (arrays kept in ``arrays``)."""
    for shape, dtype, _ in calls:
        if (shape, dtype) not in arrays:
            arrays[(shape, dtype)] = empty_aligned(np, shape, dtype)
            arrays[(shape, dtype)][...] = 0
    start = time.perf_counter()
    for shape, dtype, direction in calls:
        transform(arrays[(shape, dtype)], direction, False)
    return time.perf_counter() - start


def iteration_case(state: TileState, iterations: int, updates_per_iteration: int = 1,
                   recompute_waves: bool = False) -> dict[str, Any]:
    """Run ``WARM_UP_ITERATIONS + iterations`` default iterations; pair each timed one with its FFT replay.

    Returns ``iteration_s``, ``fft_s`` and ``cone_s`` (the missing-cone filter's share of the iteration; about 0 when
    the tile has none) as medians, ``ratio`` and ``cone_ratio`` (medians of the paired iteration / FFTs and
    filter / FFTs), ``ffts`` (per iteration, median) and ``samples``.
    """
    calls: list[tuple[tuple[int, ...], Any, str]] = []
    cone_s: list[float] = []
    arrays: dict[tuple[Any, ...], np.ndarray] = {}
    pairs: list[tuple[float, float, int, float]] = []
    options = EngineOptions(iterations=WARM_UP_ITERATIONS + iterations, updates_per_iteration=updates_per_iteration,
                            recompute_waves=recompute_waves)
    with logged_ffts(calls) as bare, timed_cone_filter(cone_s):

        def on_iteration(iteration: int, loss: float, elapsed: float) -> None:
            if iteration >= WARM_UP_ITERATIONS:
                pairs.append((elapsed, replay_s(calls, arrays, bare), len(calls), sum(cone_s)))
            calls.clear()
            cone_s.clear()

        run_sync(state, NullExchanger(), options, on_iteration=on_iteration)
    return {"iteration_s": statistics.median(p[0] for p in pairs), "fft_s": statistics.median(p[1] for p in pairs),
            "cone_s": statistics.median(p[3] for p in pairs),
            "ratio": statistics.median(p[0] / p[1] for p in pairs),
            "cone_ratio": statistics.median(p[3] / p[1] for p in pairs),
            "ffts": statistics.median(p[2] for p in pairs), "samples": len(pairs)}


def iteration_table(iterations: int) -> list[str]:
    """Markdown table: the 64² / 256-position problem at 4 and 1 slices, and at 4 slices in a 23× larger object,
    with the default one update per iteration and with 16 (each update sweeps the tile's arrays again); the
    missing-cone filter at its default (its share apart), and once switched off and once at 16 slices (a deeper
    object: the filter's kernels widen with the total thickness); 16 slices again with recomputed waves (its ratio
    counts the extra FFTs it runs; the line below the table compares its time with the stored waves')."""
    rows = ["| case | updates / iteration | object px | iteration ms | its bare FFTs ms | FFT calls | ratio (median) "
            "| filter ms | filter / FFTs | samples |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    cone = EngineOptions().missing_cone
    cases = [(name, n_slices, pad, updates, cone, False)
             for name, n_slices, pad in (("4 slices", 4, 0), ("1 slice", 1, 0),
                                         ("4 slices, object 23x larger", 4, LARGE_OBJECT_PAD_PX))
             for updates in (1, 16)]
    cases += [("4 slices, filter off", 4, 0, 1, 0.0, False), ("16 slices", 16, 0, 1, cone, False),
              ("16 slices, recomputed waves", 16, 0, 1, cone, True)]
    times = {}
    for name, n_slices, pad, updates, strength, recompute in cases:
        state = iteration_problem(n_slices, pad, missing_cone=strength)
        r = iteration_case(state, iterations, updates, recompute)
        ratios[(name, updates)] = r["ratio"]
        times[name] = r["iteration_s"]
        shape = "×".join(str(v) for v in state.volume.shape)
        rows.append(f"| {name} | {updates} | {shape} | {r['iteration_s'] * 1e3:.1f} | {r['fft_s'] * 1e3:.1f} | "
                    f"{r['ffts']:.0f} | **{r['ratio']:.2f}** | {r['cone_s'] * 1e3:.1f} | {r['cone_ratio']:.3f} | "
                    f"{r['samples']} |")
    rows.append("")
    for updates in (1, 16):
        area = ratios[("4 slices, object 23x larger", updates)] / ratios[("4 slices", updates)]
        rows.append(f"Large object at fixed work, {updates} update(s) per iteration: ratio 23x-object / small object "
                    f"= **{area:.2f}** (each against the bare FFTs of its own iterations; 1.00: independent of area).")
    rows.append(f"Recomputed waves at 16 slices (segments of 4, 7 of 16 waves held): iteration time "
                f"{times['16 slices, recomputed waves'] / times['16 slices']:.2f}x the stored waves' (same run).")
    return rows
