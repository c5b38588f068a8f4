"""``ptylive bench engine``: gradient-pass cost and exchange wait, as ratios.

The machine may be shared and noisy, so every number that matters is a ratio
against a reference measured in the same run, interleaved with it and taken
as the minimum over several repeats:

1. Gradient pass (:func:`ptylive.gpu.multislice.loss_and_gradient`) against
   the bare batched FFTs it contains (``4 S − 1`` unscaled transforms per
   position: forward shift IFFT (the probe's own FFT is done once per batch),
   ``S−1`` propagation pairs, far-field FFT; backward far-field IFFT and ``S−1``
   propagation pairs), timed with :func:`ptylive.gpu.fft.fft2`.
   Target: ratio ≤ 2 on the CPU.
2. Exchange wait: fraction of iteration time that ranks of ``ptylive
   reconstruct`` spend waiting on the halo exchange (sync and async).
3. Part 1 on CuPy arrays against ``cupy.fft``, when CuPy has a device.

Part 1b (:mod:`ptylive.tools.bench_iteration`): a whole iteration of one rank against the bare FFTs it
performed, and the cost of object area at fixed work.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ptylive.gpu.backend import backend_module, cupy_available, empty_aligned
from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.multislice import loss_and_gradient
from ptylive.tools.bench_iteration import iteration_table

logger = logging.getLogger(__name__)

BATCH = {64: 16, 128: 8, 256: 4}
FULL_CASES = [(n, s) for n in (64, 128, 256) for s in (1, 10, 40)]
QUICK_CASES = [(64, 1), (64, 10)]
MIN_SAMPLE_S = 0.01  # each timed sample loops until it lasts at least this long
CASE_BUDGET_S, MAX_REPEATS = 3.0, 60  # more short interleaved samples where they are cheap
RUN_TIMEOUT_S = 180.0  # one reconstruction normally takes ~10 s
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _timer(fn: Callable[[], Any], sync: Callable[[], None], loops: int) -> float:
    """Seconds per call of ``fn`` averaged over ``loops`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    sync()
    return (time.perf_counter() - start) / loops


def _loops_for(fn: Callable[[], Any], sync: Callable[[], None]) -> int:
    """Calls per sample so that one sample lasts about :data:`MIN_SAMPLE_S` (after a warm-up)."""
    _timer(fn, sync, 1)
    return max(1, int(np.ceil(MIN_SAMPLE_S / max(_timer(fn, sync, 1), 1e-7))))


def _random_case(xp: ModuleType, n: int, s: int, b: int, seed: int = 0) -> dict[str, Any]:
    """complex64 inputs of one gradient pass (detector D = N, unit-modulus object and propagator)."""
    rng = np.random.default_rng(seed)
    patches = empty_aligned(xp, (s, b, n, n), np.complex64)
    patches[...] = xp.asarray(np.exp(2j * np.pi * rng.random((s, b, n, n))).astype(np.complex64))
    probe = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return {"probe": xp.asarray((probe / np.linalg.norm(probe)).astype(np.complex64)),
            "shifts": xp.asarray(rng.random((b, 2))), "patches": patches,
            "propagator": xp.asarray(np.exp(2j * np.pi * rng.random((n, n))).astype(np.complex64)),
            "measured": xp.asarray((rng.random((b, n, n)) / n).astype(np.float32))}


def _fft_libraries(xp: ModuleType, work: Any, sync: Callable[[], None], repeats: int) -> dict[str, float]:
    """Seconds per single 2-D FFT of ``work`` (B, N, N) with each available library."""
    if xp is np:
        import pyfftw  # type: ignore[import-untyped]
        import scipy.fft

        scratch = empty_aligned(np, work.shape, work.dtype)  # unnormalised repeats would overflow `work`
        raw = pyfftw.FFTW(scratch, scratch, axes=(-2, -1), flags=("FFTW_MEASURE",), threads=1)
        scratch[...] = 0  # FFTW does the same arithmetic on any (non-denormal) data
        calls: dict[str, Callable[[], Any]] = {"fftw": lambda: fft2(work), "fftw raw": raw.execute,
                                              "scipy": lambda: scipy.fft.fft2(work, norm="ortho", workers=1),
                                              "numpy": lambda: np.fft.fft2(work, norm="ortho")}
    else:
        calls = {"cufft": lambda: fft2(work), "cufft raw": lambda: xp.fft.fft2(work, norm="ortho")}
    loops = {name: _loops_for(fn, sync) for name, fn in calls.items()}
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):  # interleaved
        for name, fn in calls.items():
            best[name] = min(best[name], _timer(fn, sync, loops[name]))
    return {name: t / work.shape[0] for name, t in best.items()}


def gradient_case(xp: ModuleType, sync: Callable[[], None], n: int, s: int, b: int,
                  repeats: int) -> dict[str, Any]:
    """Time one (N, S, B) gradient pass against its ``4 S − 1`` bare FFTs, interleaved.

    Returns ``grad``, ``fft`` (s per position·slice, minimum over ≥ ``repeats`` interleaved samples),
    ``ratio`` (of the minima), ``ratio_median`` (of paired ratios), ``samples``, ``libs`` (s per 2-D FFT).
    """
    case = _random_case(xp, n, s, b)
    work = empty_aligned(xp, (b, n, n), np.complex64)
    work[...] = case["probe"]

    def grad() -> Any:
        return loss_and_gradient(case["probe"], case["shifts"], case["patches"], case["propagator"],
                                 case["measured"], "amplitude")

    def bare() -> None:
        for _ in range(2 * s - 1):  # 4 S − 1 unscaled transforms, as in the gradient pass
            fft2(work, normalise=False)
            ifft2(work, normalise=False)
        fft2(work, normalise=False)

    loops_g, loops_f = _loops_for(grad, sync), _loops_for(bare, sync)
    sample_s = _timer(grad, sync, loops_g) * loops_g + _timer(bare, sync, loops_f) * loops_f
    t_grad, t_fft = [], []
    for _ in range(max(repeats, min(MAX_REPEATS, int(CASE_BUDGET_S / sample_s)))):
        t_grad.append(_timer(grad, sync, loops_g))
        t_fft.append(_timer(bare, sync, loops_f))
    per = float(b * s)
    return {"grad": min(t_grad) / per, "fft": min(t_fft) / per, "ratio": min(t_grad) / min(t_fft),
            "ratio_median": statistics.median(g / f for g, f in zip(t_grad, t_fft, strict=True)),
            "samples": len(t_grad),
            "libs": _fft_libraries(xp, work, sync, repeats)}


def gradient_table(xp: ModuleType, sync: Callable[[], None], cases: list[tuple[int, int]],
                   repeats: int) -> list[str]:
    """Markdown table of :func:`gradient_case` over ``cases``."""
    rows: list[str] = []
    libs: list[str] = []
    for n, s in cases:
        r = gradient_case(xp, sync, n, s, BATCH.get(n, 4), repeats)
        libs = list(r["libs"])
        lib_text = " / ".join(f"{v * 1e6:.1f}" for v in r["libs"].values())
        rows.append(f"| {n} | {s} | {BATCH.get(n, 4)} | {r['grad'] * 1e6:.1f} | {r['fft'] * 1e6:.1f} | "
                    f"**{r['ratio']:.2f}** | {r['ratio_median']:.2f} | {r['samples']} | {lib_text} |")
        logger.info("gradient N=%d S=%d done", n, s)
    head = ["| N | S | B | gradient µs / (pos·slice) | bare FFT µs / (pos·slice) | ratio (min) "
            f"| ratio (median) | samples | µs per 2-D FFT: {' / '.join(libs)} |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return head + rows


def _cli(*args: str) -> tuple[int | None, str]:
    """``python -m ptylive.daemon.cli.main *args`` in its own process group: (status or None if hung, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "ptylive.daemon.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        err = proc.communicate(timeout=RUN_TIMEOUT_S)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, f"killed after {RUN_TIMEOUT_S:.0f} s (hung) " + proc.communicate()[1][-200:]
    return proc.returncode, err


def exchange_table(rank_counts: tuple[int, ...], iterations: int, repeats: int) -> list[str]:
    """Run ``ptylive reconstruct`` on a default simulated scan; tabulate exchange wait per rank.

    Each (ranks, mode) runs ``repeats`` times, interleaved; wait fraction = median over runs of
    the mean over ranks of ``exchange_wait_s / iterations_total_s``.
    """
    import h5py
    lines = ["| ranks | mode | wait fraction (median) | min–max over runs | MB sent / rank | "
             "staleness mean / max | iterations total s | finite result |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="ptylive-bench-") as tmp:
        scan = Path(tmp) / "scan.h5"
        rc, err = _cli("simulate", str(scan))
        if rc != 0:
            return [f"simulate failed ({rc}): {err.strip()[-400:]}"]
        configs = [(r, m) for r in rank_counts for m in ("sync", "async")]
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {c: [] for c in configs}
        warnings: list[str] = []
        for rep in range(repeats):
            for ranks, mode in configs:
                out = Path(tmp) / f"r{ranks}-{mode}-{rep}.h5"
                rc, err = _cli("reconstruct", str(scan), "--ranks", str(ranks), "--mode", mode,
                               "--iterations", str(iterations), "--quiet", "--out", str(out))
                if rc != 0 or "Warning" in err:
                    warnings.append(f"{ranks} ranks {mode} run {rep + 1}: exit {rc}: " + " ".join(err.split())[-300:])
                if rc != 0:
                    continue
                with h5py.File(out, "r") as f:
                    g = f["ranks"]
                    stats: dict[str, Any] = {k: np.asarray(g[k][()], dtype=np.float64) for k in g}
                    stats["finite"] = bool(np.isfinite(f["object"][()]).all() and np.isfinite(f["loss"][()]).all())
                runs[(ranks, mode)].append(stats)
        for (ranks, mode), got in runs.items():
            if not got:
                lines.append(f"| {ranks} | {mode} | all runs failed | | | | | |")
                continue
            fractions = [float(np.mean(r["exchange_wait_s"] / r["iterations_total_s"])) for r in got]
            last, iteration_s = got[-1], statistics.median(float(np.mean(r["iterations_total_s"])) for r in got)
            lines.append(
                f"| {ranks}{' (oversubscribed)' if ranks > CORES else ''} | {mode} | "
                f"**{statistics.median(fractions):.1%}** | {min(fractions):.1%}–{max(fractions):.1%} | "
                f"{np.mean(last['bytes_sent']) / 1e6:.2f} | {np.mean(last['staleness_mean']):.2f} / "
                f"{np.max(last['staleness_max']):.0f} | {iteration_s:.2f} | "
                f"{'yes' if all(r['finite'] for r in got) else '**NO (NaN/inf)**'} |")
    lines += ["", f"{CORES} cores available: runs with more ranks than cores are oversubscribed, so their "
                 "wait fraction includes time-slicing, not only exchange latency."]
    lines.extend(f"warning: {w}" for w in warnings)
    return lines


def main(quick: bool = False, backend: str = "numpy") -> int:
    """Run the engine benchmarks and print markdown tables.

    Parameters
    ----------
    quick : bool
        Small shapes, 2 ranks only, one reconstruction per configuration.
    backend : {"numpy", "cupy"}
        ``"cupy"`` adds part 3 (gradient pass on the GPU) when CuPy has a device.

    Returns
    -------
    int
        0.
    """
    cases = QUICK_CASES if quick else FULL_CASES
    repeats = 5 if quick else 7
    print(f"# ptylive bench engine ({'quick' if quick else 'full'}), {CORES} cores, numpy {np.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print("\n## 1. Gradient pass vs bare FFTW (CPU, complex64, amplitude loss, D = N, one thread)\n")
    print("Times: minima over 'samples' interleaved samples; ratio (median) = median of paired ratios. "
          "'bare FFT' = the 4·S − 1 unscaled ptylive.gpu.fft calls of one pass on a (B, N, N) aligned array. "
          "Target: ratio ≤ 2.0. 'fftw raw' = plan.execute() without the ortho scaling.\n")
    print("\n".join(gradient_table(np, lambda: None, cases, repeats)))
    print("\n## 1b. Whole iteration vs its bare FFTs (CPU, complex64, one rank, 64-px window, 256 positions, "
          "default options)\n")
    print("Each timed iteration's FFTs (logged) are replayed bare right after it; ratio = median of the paired "
          f"ratios. Target: ≤ 2.0. load average now {os.getloadavg()[0]:.2f}\n")
    print("\n".join(iteration_table(8 if quick else 20)))
    print("\n## 2. Exchange wait (ptylive reconstruct, default simulated scan: 320 positions, 3 slices, 48 px)\n")
    print("\n".join(exchange_table((2,) if quick else (2, 4), 3 if quick else 5, 1 if quick else 3)))
    print(f"\nload average after parts 1-2: {os.getloadavg()[0]:.2f}\n\n## 3. GPU (CuPy)\n")
    if backend != "cupy":
        print(f"skipped: backend {backend!r} (pass --backend cupy); cupy_available() = {cupy_available()}")
    elif not cupy_available():
        print("skipped: CuPy is unavailable (not installed or no CUDA device)")
    else:
        cp = backend_module("cupy")
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        print(f"device: {name.decode() if isinstance(name, bytes) else name}\n")
        print("\n".join(gradient_table(cp, cp.cuda.Device().synchronize, cases, repeats)))
    return 0

