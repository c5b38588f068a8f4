"""``ptylive bench gpu``: the engine on CuPy, as ratios measured in the same run, beside the card that ran it.

1. The gradient pass (:func:`ptylive.gpu.multislice.loss_and_gradient`) on the GPU against the bare cuFFTs it
   contains (part 1 of ``ptylive bench engine``, :func:`ptylive.tools.bench_engine.gradient_case`, on CuPy),
   at batch sizes a GPU is run with.
2. A whole iteration of one rank (part 1b's problem, :func:`ptylive.tools.bench_iteration.iteration_problem`:
   64-px window, 256 positions, default options) on the GPU and on this machine's CPU (numpy, one FFTW
   thread): the GPU's speed-up, and each backend's iteration against the bare FFTs it performed (logged and
   replayed right after it, as part 1b does).

Every figure names the card (:func:`card`): timings from different cards are not comparable. Without CuPy or
a CUDA device it prints why and returns 2; ``tools/device_check.sh`` runs it with the gpu-marked tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.iteration import run_sync
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileState
from ptylive.gpu.backend import backend_module, cupy_available
from ptylive.tools.bench_engine import gradient_case
from ptylive.tools.bench_iteration import WARM_UP_ITERATIONS, iteration_case, iteration_problem

#: (N, S, B): the engine's default batch (32) where it fits, and part 1's slice counts.
FULL_CASES = [(n, s, b) for n, b in ((64, 32), (128, 32), (256, 16)) for s in (1, 10, 40)]
QUICK_CASES = [(64, 1, 32), (64, 10, 32)]
FFT_CALLS = ("fft2", "ifft2")


def card(cp: Any) -> dict[str, Any]:
    """The device that runs the benchmark: name, memory, compute capability, and the software versions."""
    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_MiB": int(props["totalGlobalMem"]) // 2**20,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": int(props["multiProcessorCount"]),
            "cuda_driver": _cuda_version(cp.cuda.runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(cp.cuda.runtime.runtimeGetVersion()),
            "cupy": cp.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def gradient_rows(cp: Any, cases: list[tuple[int, int, int]], repeats: int) -> list[dict[str, Any]]:
    """:func:`~ptylive.tools.bench_engine.gradient_case` on CuPy for each (N, S, B)."""
    rows = []
    for n, s, b in cases:
        r = gradient_case(cp, cp.cuda.Device().synchronize, n, s, b, repeats)
        rows.append({"N": n, "S": s, "B": b, "gradient_us": r["grad"] * 1e6, "fft_us": r["fft"] * 1e6,
                     "ratio": r["ratio"], "ratio_median": r["ratio_median"], "samples": r["samples"],
                     "fft_libraries_us": {k: v * 1e6 for k, v in r["libs"].items()}})
    return rows


@contextmanager
def logged_cufft(cp: Any, calls: list[tuple[tuple[int, ...], Any, str]]) -> Iterator[dict[str, Callable[..., Any]]]:
    """Log ``(shape, dtype, name)`` of every ``cupy.fft.fft2``/``ifft2`` call inside the block (what
    :mod:`ptylive.gpu.fft` runs on CuPy arrays); yields the unlogged functions, for the replay."""
    original = {name: getattr(cp.fft, name) for name in FFT_CALLS}

    def logger_for(name: str) -> Callable[..., Any]:
        def logged(x: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((x.shape, x.dtype, name))
            return original[name](x, *args, **kwargs)
        return logged

    for name in FFT_CALLS:
        setattr(cp.fft, name, logger_for(name))
    try:
        yield original
    finally:
        for name, function in original.items():
            setattr(cp.fft, name, function)


def cufft_replay_s(cp: Any, calls: list[tuple[tuple[int, ...], Any, str]], arrays: dict[tuple[Any, ...], Any],
                   transforms: dict[str, Callable[..., Any]]) -> float:
    """Seconds to run ``calls`` again as bare, unscaled cuFFTs (out of place, as :mod:`ptylive.gpu.fft` calls them)."""
    for shape, dtype, _ in calls:
        if (shape, dtype) not in arrays:
            arrays[(shape, dtype)] = cp.zeros(shape, dtype)
    sync = cp.cuda.Device().synchronize
    sync()
    start = time.perf_counter()
    for shape, dtype, name in calls:
        transforms[name](arrays[(shape, dtype)], norm="backward" if name == "fft2" else "forward")
    sync()
    return time.perf_counter() - start


def on_device(state: TileState, xp: Any) -> TileState:
    """``state`` with its arrays copied onto ``xp`` (the index arrays stay on the host, as the engine keeps them)."""
    return replace(state, volume=xp.asarray(state.volume), probe=xp.asarray(state.probe),
                   propagator=xp.asarray(state.propagator), targets=xp.asarray(state.targets))


def gpu_iteration_case(cp: Any, state: TileState, iterations: int) -> dict[str, Any]:
    """Part 1b's :func:`~ptylive.tools.bench_iteration.iteration_case` on CuPy: each timed iteration against its
    own cuFFTs, replayed right after it."""
    calls: list[tuple[tuple[int, ...], Any, str]] = []
    arrays: dict[tuple[Any, ...], Any] = {}
    pairs: list[tuple[float, float, int]] = []
    sync = cp.cuda.Device().synchronize
    with logged_cufft(cp, calls) as bare:

        def on_iteration(iteration: int, loss: float, elapsed: float) -> None:
            sync()
            if iteration >= WARM_UP_ITERATIONS:
                pairs.append((elapsed, cufft_replay_s(cp, calls, arrays, bare), len(calls)))
            calls.clear()

        run_sync(state, NullExchanger(), EngineOptions(iterations=WARM_UP_ITERATIONS + iterations),
                 on_iteration=on_iteration)
    return {"iteration_s": statistics.median(p[0] for p in pairs), "fft_s": statistics.median(p[1] for p in pairs),
            "ratio": statistics.median(p[0] / p[1] for p in pairs), "ffts": statistics.median(p[2] for p in pairs),
            "samples": len(pairs)}


def iteration_rows(cp: Any, slice_counts: tuple[int, ...], iterations: int) -> list[dict[str, Any]]:
    """Each slice count's iteration on the CPU (numpy), then on the GPU (CuPy): one problem, from the same start."""
    rows = []
    for n_slices in slice_counts:
        state = iteration_problem(n_slices)
        cpu = iteration_case(replace(state, volume=state.volume.copy(), probe=state.probe.copy()), iterations)
        gpu = gpu_iteration_case(cp, on_device(state, cp), iterations)
        rows.append({"slices": n_slices, "object_px": list(state.volume.shape), "cpu": cpu, "gpu": gpu,
                     "speedup": cpu["iteration_s"] / gpu["iteration_s"]})
    return rows


def markdown(report: dict[str, Any]) -> list[str]:
    """The report as markdown: the card first, then both tables."""
    c = report["card"]
    lines = [f"# ptylive bench gpu ({report['size']})", "",
             f"card: **{c['name']}**, {c['memory_MiB']} MiB, compute capability {c['compute_capability']}, "
             f"{c['multiprocessors']} SMs; CUDA driver {c['cuda_driver']}, runtime {c['cuda_runtime']}; "
             f"CuPy {c['cupy']}, numpy {c['numpy']}, Python {c['python']}; {c['cpu_cores']} CPU cores", "",
             "## 1. Gradient pass on the GPU vs its bare cuFFTs (complex64, amplitude loss, D = N)", "",
             "| N | S | B | gradient µs / (pos·slice) | bare cuFFT µs / (pos·slice) | ratio (min) | ratio (median) "
             "| samples | µs per 2-D FFT: cufft / cufft raw |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["gradient"]:
        libs = " / ".join(f"{v:.2f}" for v in r["fft_libraries_us"].values())
        lines.append(f"| {r['N']} | {r['S']} | {r['B']} | {r['gradient_us']:.2f} | {r['fft_us']:.2f} | "
                     f"**{r['ratio']:.2f}** | {r['ratio_median']:.2f} | {r['samples']} | {libs} |")
    lines += ["", "## 2. A whole iteration (64-px window, 256 positions, default options): GPU vs this machine's CPU",
              "", "CPU: numpy, one FFTW thread. Each backend's iteration is also timed against the bare FFTs it ran "
              "(logged, replayed right after it; median of paired ratios).", "",
              "| slices | object px | CPU ms | GPU ms | **speed-up** | CPU / its FFTs | GPU / its cuFFTs | "
              "FFT calls | samples |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["iteration"]:
        cpu, gpu = r["cpu"], r["gpu"]
        lines.append(f"| {r['slices']} | {'×'.join(map(str, r['object_px']))} | {cpu['iteration_s'] * 1e3:.1f} | "
                     f"{gpu['iteration_s'] * 1e3:.2f} | **{r['speedup']:.1f}** | {cpu['ratio']:.2f} | "
                     f"{gpu['ratio']:.2f} | {gpu['ffts']:.0f} | {gpu['samples']} |")
    return lines


def main(quick: bool = False, as_json: bool = False, json_path: Path | None = None) -> int:
    """Run the GPU benchmark; print markdown (or JSON with ``as_json``), also write JSON to ``json_path``.

    Returns
    -------
    int
        0; 2 when CuPy or a CUDA device is missing (nothing measured).
    """
    if not cupy_available():
        print("ptylive bench gpu: skipped, nothing measured: CuPy is not installed or sees no CUDA device "
              "(pip install 'ptylive[gpu]' on a machine with an NVIDIA GPU; tools/device_check.sh)", file=sys.stderr)
        return 2
    cp = backend_module("cupy")
    started = time.perf_counter()
    report: dict[str, Any] = {"size": "quick" if quick else "full", "card": card(cp)}
    print(f"card: {report['card']['name']} ({report['card']['memory_MiB']} MiB)", file=sys.stderr, flush=True)
    report["gradient"] = gradient_rows(cp, QUICK_CASES if quick else FULL_CASES, 5 if quick else 7)
    report["iteration"] = iteration_rows(cp, (4,) if quick else (4, 1), 5 if quick else 10)
    report["seconds"] = time.perf_counter() - started
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if as_json else "\n".join(markdown(report)))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two gradient cases and one iteration case")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of markdown")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    arguments = parser.parse_args()
    sys.exit(main(arguments.quick, arguments.json, arguments.json_out))
