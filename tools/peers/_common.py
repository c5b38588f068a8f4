"""What every peer adapter shares: the ptylive scan file, the run contract and the outputs.

The adapters (``<name>_run.py`` beside this file) run in the peer's own virtual environment, which has
numpy and h5py but not ptylive, so this module needs nothing else. ``ptylive bench quality`` starts an
adapter as::

    PEER_PYTHON <name>_run.py --scan SCAN.h5 --out DIR --iterations K --time-budget-s T \
        --slices S --slice-thickness-A t --object-shape H W [--probe PROBE.npy]

and reads from ``DIR``:

* ``phase_iterations.npy`` (S, H, W) float32: each slice's phase after K iterations, on ptylive's object
  grid (pixel (0, 0) and pixel size of ``positions_px``);
* ``phase_time.npy``: the same after the last iteration that ended within T seconds of reconstruction
  time (the peer keeps iterating past K until T is spent), absent if not even one iteration fitted;
* ``positions_iterations.npy`` (n, 2): the peer's positions after K iterations, on the same grid;
* ``summary.json``: version, what the peer was given, seconds and iterations at both checkpoints, its
  own loss and cumulative seconds after each iteration.

Reconstruction time counts only the peer's iterations (set-up, imports, an untimed warm-up that leaves
the reconstruction unchanged, and checkpoint copies excluded),
as ptylive's ``iterations_total_s`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

MAX_EXTRA_ITERATIONS = 2000  # past K, a fast peer stops here even if T is not spent


@dataclass(frozen=True)
class Scan:
    """A ptylive scan file (docs/scanfile.md), as the peers need it."""

    intensities: npt.NDArray[np.float32]  # (n, D, D), zero frequency at (D//2, D//2)
    positions_px: npt.NDArray[np.float64]  # (n, 2) probe centres (row, col), object pixels
    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float  # −C10, positive = underfocus
    pixel_size_A: float
    detector_pixel_mrad: float

    @property
    def detector_px(self) -> int:
        return int(self.intensities.shape[-1])

    def grid_shape(self) -> tuple[int, int] | None:
        """(rows, cols) when the positions are a row-major raster, else None."""
        rows = np.unique(np.round(self.positions_px[:, 0], 6))
        cols = np.unique(np.round(self.positions_px[:, 1], 6))
        if len(rows) * len(cols) != len(self.positions_px):
            return None
        grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
        return (len(rows), len(cols)) if np.allclose(grid, self.positions_px, atol=1e-6) else None


def load_scan(path: Path) -> Scan:
    with h5py.File(path, "r") as f:
        a = f.attrs
        return Scan(np.asarray(f["intensities"][...], np.float32), np.asarray(f["positions_px"][...], np.float64),
                    float(a["energy_eV"]), float(a["convergence_semiangle_mrad"]), float(a.get("defocus_A", 0.0)),
                    float(a["pixel_size_A"]), float(a["detector_pixel_mrad"]))


def parse_arguments(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--time-budget-s", type=float, required=True)
    p.add_argument("--slices", type=int, required=True)
    p.add_argument("--slice-thickness-A", type=float, required=True)
    p.add_argument("--object-shape", type=int, nargs=2, required=True, metavar=("H", "W"))
    p.add_argument("--probe", type=Path, default=None, help="(N, N) complex .npy, centred at (N//2, N//2)")
    return p.parse_args()


def to_ptylive_grid(phases: npt.NDArray[np.floating], offset_px: npt.NDArray[np.floating],
                    shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Per-slice phases of a peer's object moved onto ptylive's grid.

    ``offset_px`` (row, col) is where ptylive's pixel (0, 0) lies in the peer's object: the mean of
    (peer positions − ptylive positions). The integer part is a crop (pixels outside the peer's object
    are 0), the fractional part a Fourier shift of each slice's phase.

    Parameters
    ----------
    phases : (S, Hp, Wp) float
    offset_px : (2,) float
    shape : (H, W)

    Returns
    -------
    (S, H, W) float32
    """
    whole = np.round(offset_px).astype(int)
    fraction = np.asarray(offset_px, np.float64) - whole
    fraction[np.abs(fraction) < 1e-3] = 0.0  # float32 positions: 12.000001 is 12
    out = np.zeros((phases.shape[0], *shape), np.float64)
    r0, c0 = int(whole[0]), int(whole[1])
    rs, re = max(0, -r0), min(shape[0], phases.shape[1] - r0)
    cs, ce = max(0, -c0), min(shape[1], phases.shape[2] - c0)
    out[:, rs:re, cs:ce] = phases[:, rs + r0:re + r0, cs + c0:ce + c0]
    if np.any(fraction != 0):  # out(x) = peer(x + fraction)
        k_r = np.fft.fftfreq(shape[0])[:, None]
        k_c = np.fft.fftfreq(shape[1])[None, :]
        ramp = np.exp(2j * np.pi * (k_r * fraction[0] + k_c * fraction[1]))
        out = np.fft.ifft2(np.fft.fft2(out) * ramp).real
    return out.astype(np.float32)


@dataclass
class Checkpoints:
    """The two results the benchmark needs from one run: at K iterations and within T seconds."""

    iterations: int
    budget_s: float
    losses: list[float] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)  # cumulative, after each iteration
    seconds: float = 0.0
    warm_up_s: float = 0.0
    at_iterations: tuple[Any, float] | None = None  # (snapshot, seconds)
    at_time: tuple[Any, int, float] | None = None  # (snapshot, iterations, seconds)


def run_with_checkpoints(step: Callable[[], float], snapshot: Callable[[], Any], iterations: int,
                         budget_s: float, warm_up: Callable[[], None] | None = None) -> Checkpoints:
    """Call ``step`` (one iteration, returns the peer's loss) until K iterations and T seconds are both done.

    ``snapshot`` copies the current result; it runs outside the timed part, after iteration K and after
    every iteration that ends within the budget. ``warm_up`` (untimed, before the first iteration) pays
    one-off costs that are no iteration's work (lazy imports, first-call kernel set-up), as ptylive
    compiles its kernels before its timed iterations; it must leave the reconstruction unchanged.
    """
    done = Checkpoints(iterations, budget_s)
    if warm_up is not None:
        start = time.perf_counter()
        warm_up()
        done.warm_up_s = time.perf_counter() - start
    count = 0
    while count < iterations or (done.seconds < budget_s and count < iterations + MAX_EXTRA_ITERATIONS):
        start = time.perf_counter()
        done.losses.append(float(step()))
        done.seconds += time.perf_counter() - start
        done.iteration_seconds.append(done.seconds)
        count += 1
        if count == iterations:
            done.at_iterations = (snapshot(), done.seconds)
        if done.seconds <= budget_s:
            done.at_time = (snapshot(), count, done.seconds)
        logger.info("iteration %d loss %.6g %.2f s", count, done.losses[-1], done.seconds)
    return done


def write_outputs(out: Path, done: Checkpoints, summary: dict[str, Any]) -> None:
    """Write the files of the run contract; snapshots are ((S, H, W) phases, (n, 2) positions) on our grid."""
    out.mkdir(parents=True, exist_ok=True)
    assert done.at_iterations is not None
    (phases, positions), seconds = done.at_iterations
    np.save(out / "phase_iterations.npy", phases)
    np.save(out / "positions_iterations.npy", positions)
    summary = dict(summary, iterations=done.iterations, seconds_at_iterations=seconds,
                   budget_s=done.budget_s, losses=done.losses, iteration_seconds=done.iteration_seconds,
                   total_iterations=len(done.losses),
                   total_seconds=done.seconds, warm_up_s=done.warm_up_s, iterations_at_time=0, seconds_at_time=0.0)
    if done.at_time is not None:
        (phases, positions), count, seconds = done.at_time
        np.save(out / "phase_time.npy", phases)
        np.save(out / "positions_time.npy", positions)
        summary.update(iterations_at_time=count, seconds_at_time=seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
