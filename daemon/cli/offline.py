"""``ptylive reconstruct``: offline reconstruction of a scan file on R ranks.

Every rank runs :mod:`engine` on its extended tile; rank 0 also stitches the
tiles and writes the result. The very same worker code serves the daemon.
"""

from __future__ import annotations

import logging
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptylive.daemon.engine.decomposition import RankDomain, decompose, stitch
from ptylive.daemon.engine.iteration import EngineOptions, EngineReport, TileState, fit_scale, run_sync
from ptylive.daemon.engine.memory_plan import rank_memory
from ptylive.gpu.backend import PRECISIONS, backend_module, to_numpy
from ptylive.gpu.patches import check_windows, window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.probe import ProbeOptics, make_probe
from ptylive.gpu.propagation import fresnel_propagator
from ptylive.streaming.scanfile import (
    ScanFileError,
    ScanMetadata,
    object_shape_for,
    read_frames,
    read_metadata,
    read_optional,
    read_positions,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionJob:
    """Everything a rank needs to know, validated."""

    scan_path: Path
    out_path: Path
    n_ranks: int
    n_slices: int
    slice_thickness_A: float
    upsampling: int
    precision: str
    backend: str
    options: EngineOptions
    metadata: ScanMetadata
    object_shape: tuple[int, int]
    quiet: bool = False

    @property
    def window_px(self) -> int:
        return self.metadata.detector_px * self.upsampling


def validate(scan_path: Path, out_path: Path, n_ranks: int, n_slices: int | None,
             slice_thickness_A: float | None, upsampling: int | None, precision: str, backend: str,
             options: EngineOptions, quiet: bool = False) -> ReconstructionJob:
    """Check the scan and the options; raise ScanFileError/ValueError naming the problem."""
    meta = read_metadata(scan_path)
    slices = n_slices if n_slices is not None else (meta.n_slices or 1)
    if slices < 1:
        raise ValueError(f"number of slices must be >= 1, got {slices}")
    thickness = slice_thickness_A if slice_thickness_A is not None else meta.slice_thickness_A
    if slices > 1 and thickness is None:
        raise ValueError("several slices need a slice thickness: give --slice-thickness or the file attribute")
    thickness = float(thickness or 0.0)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'single' or 'double', got {precision!r}")
    if upsampling is None:
        upsampling = infer_upsampling(meta)
    if upsampling < 1:
        raise ValueError(f"upsampling must be >= 1, got {upsampling}")
    if n_ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {n_ranks}")
    backend_module(backend)
    window = meta.detector_px * upsampling
    expected_pixel = wavelength_A(meta.energy_eV) / (window * meta.detector_pixel_mrad * 1e-3)
    if abs(expected_pixel - meta.pixel_size_A) > 0.01 * expected_pixel:
        implied = window * expected_pixel / (meta.detector_px * meta.pixel_size_A)
        raise ScanFileError(
            f"{scan_path}: pixel_size_A={meta.pixel_size_A:.5g} does not match lambda/(N*dtheta)="
            f"{expected_pixel:.5g} for a {window}-px window (upsampling {upsampling}); the file implies "
            f"upsampling {implied:.3g}")
    positions = read_positions(scan_path)
    shape = meta.object_shape or object_shape_for(positions, window)
    starts, _ = window_starts(positions, window)
    try:
        check_windows(shape, starts, window)
    except ValueError as exc:
        raise ScanFileError(f"{scan_path}: positions outside the object: {exc}") from None
    for first in range(0, meta.n_positions, 256):  # NaN anywhere fails before any rank starts
        read_frames(scan_path, np.arange(first, min(first + 256, meta.n_positions)))
    probe = read_optional(scan_path, "probe")
    if probe is not None and probe.shape != (window, window):
        raise ScanFileError(f"{scan_path}: 'probe' is {probe.shape}, expected ({window}, {window}) "
                            f"for detector {meta.detector_px} px x upsampling {upsampling}")
    if not out_path.parent.exists():
        raise ValueError(f"output folder {out_path.parent} does not exist")
    return ReconstructionJob(scan_path, out_path, n_ranks, slices, thickness, upsampling, precision,
                             backend, options, meta, shape, quiet)


def _initial_state(job: ReconstructionJob, domain: RankDomain, all_positions: np.ndarray, xp: Any) -> TileState:
    real_t, complex_t = PRECISIONS[job.precision]
    meta = job.metadata
    pixel = meta.pixel_size_A
    probe = read_optional(job.scan_path, "probe")
    if probe is None:
        optics = ProbeOptics(meta.energy_eV, meta.convergence_semiangle_mrad, meta.defocus_A)
        probe = make_probe(optics, job.window_px, pixel, dtype=np.complex128)
    positions = all_positions[domain.positions]
    starts, shifts = window_starts(positions, job.window_px)
    starts = starts - np.array([domain.extended.row0, domain.extended.col0])
    frames = read_frames(job.scan_path, domain.positions, dtype=real_t)
    propagator = fresnel_propagator(xp, job.window_px, pixel, wavelength_A(meta.energy_eV),
                                    job.slice_thickness_A, dtype=complex_t)
    volume = xp.ones((job.n_slices, *domain.extended.shape), dtype=complex_t)
    return TileState(domain, volume, xp.asarray(probe.astype(complex_t)), propagator, starts,
                     shifts.astype(real_t), xp.asarray(frames))


def infer_upsampling(meta: ScanMetadata) -> int:
    """Upsampling implied by the file's pixel size: λ / (D · Δθ · pixel), rounded."""
    ratio = wavelength_A(meta.energy_eV) / (meta.detector_px * meta.detector_pixel_mrad * 1e-3 * meta.pixel_size_A)
    return max(1, int(round(ratio)))


def run_rank(job: ReconstructionJob, comm: Any | None) -> None:
    """Reconstruct this rank's tile; rank 0 stitches and writes ``job.out_path``.

    Peak memory is measured with tracemalloc (numpy reports its buffers to
    it) from after :func:`_warm_up`, so it counts the arrays of the
    reconstruction rather than compiled code and imported modules.
    """
    _warm_up(job)
    tracemalloc.start()
    rank = 0 if comm is None else comm.Get_rank()
    positions = read_positions(job.scan_path)
    domains = decompose(job.object_shape, positions, job.window_px, job.n_ranks)
    domain = domains[rank]
    xp = backend_module(job.backend)
    state = _initial_state(job, domain, positions, xp)
    exchanger = _make_exchanger(job, comm, domain)
    fit_scale(state, exchanger, job.options)
    started = time.perf_counter()
    progress = None if (rank != 0 or job.quiet) else _print_progress(job.options.iterations, started)
    if job.options.mode == "sync" or job.n_ranks == 1:  # one rank: async has nobody to wait for
        report = run_sync(state, exchanger, job.options, progress)
    else:
        from ptylive.daemon.engine.async_iteration import run_async

        report = run_async(state, exchanger, job.options, progress)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    predicted = rank_memory(domain, job.n_slices, job.window_px, job.metadata.detector_px,
                            job.options.batch_size, job.precision, job.options.mode,
                            job.options.updates_per_iteration).total
    stats = np.array([report.compute_s, exchanger.stats.wait_s, exchanger.stats.bytes_sent,
                      peak, predicted, _mean(exchanger.stats.staleness), max(exchanger.stats.staleness, default=0),
                      sum(report.iterations_s)], dtype=np.float64)
    volume = to_numpy(state.volume)
    from ptylive.daemon.engine.exchange.gather import gather_to_root

    volumes, all_stats = gather_to_root(comm, domains, volume, stats)
    if rank == 0:
        result = stitch((job.n_slices, *job.object_shape), domains, volumes)
        _write(job, result, to_numpy(state.probe), positions, report, all_stats, state.scale)


def _warm_up(job: ReconstructionJob) -> None:
    """Compile numba kernels and import lazily loaded modules before measuring memory."""
    from ptylive.gpu.patches import accumulate_patches, extract_patches

    for dtype in PRECISIONS[job.precision]:
        volume = np.zeros((1, 4, 4), dtype)
        accumulate_patches(volume, np.zeros((1, 2), np.int64), extract_patches(volume, np.zeros((1, 2), np.int64), 2))
    if job.n_ranks > 1:
        from mpi4py import MPI  # noqa: F401


def _mean(values: list[int]) -> float:
    return float(np.mean(values)) if values else 0.0


def _make_exchanger(job: ReconstructionJob, comm: Any | None, domain: RankDomain) -> Any:
    from ptylive.daemon.engine.exchange.sync import NullExchanger, SyncExchanger

    if comm is None or comm.Get_size() == 1:
        return NullExchanger()
    real_t, complex_t = PRECISIONS[job.precision]
    if job.options.mode == "sync":
        return SyncExchanger(comm, domain, job.n_slices, real_t)
    from ptylive.daemon.engine.exchange.asynchronous import AsyncExchanger

    return AsyncExchanger(comm, domain, job.n_slices, real_t, complex_t, job.options.max_staleness,
                          job.options.updates_per_iteration)


def _print_progress(total: int, started: float) -> Any:
    def show(iteration: int, loss: float, seconds: float) -> None:
        print(f"iteration {iteration + 1:4d}/{total}  loss {loss:.6e}  {seconds:6.3f} s/it  "
              f"elapsed {time.perf_counter() - started:7.1f} s", file=sys.stderr, flush=True)

    return show


STAT_NAMES = ("compute_s", "exchange_wait_s", "bytes_sent", "peak_memory_bytes", "predicted_memory_bytes",
              "staleness_mean", "staleness_max", "iterations_total_s")


def _write(job: ReconstructionJob, volume: np.ndarray, probe: np.ndarray, positions: np.ndarray,
           report: EngineReport, stats: np.ndarray, scale: float) -> None:
    tmp = job.out_path.with_name(job.out_path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("object", data=volume)
        f.create_dataset("probe", data=probe)
        f.create_dataset("loss", data=np.asarray(report.loss_history))
        f.create_dataset("positions_px", data=positions)
        ranks = f.create_group("ranks")
        for i, name in enumerate(STAT_NAMES):
            ranks.create_dataset(name, data=stats[:, i])
        attrs = {"mode": job.options.mode, "n_ranks": job.n_ranks, "iterations": job.options.iterations,
                 "precision": job.precision, "n_slices": job.n_slices, "slice_thickness_A": job.slice_thickness_A,
                 "upsampling": job.upsampling, "loss_function": job.options.loss, "detector_scale": scale,
                 "pixel_size_A": job.metadata.pixel_size_A, "energy_eV": job.metadata.energy_eV,
                 "source": str(job.scan_path), "step_size": job.options.step, "backend": job.backend}
        f.attrs.update(attrs)
    tmp.replace(job.out_path)
    if not job.quiet:
        print(f"wrote {job.out_path}", file=sys.stderr)
