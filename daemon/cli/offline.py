"""``ptylive reconstruct``: the offline job, a scan file reconstructed on R ranks.

The launcher (:func:`ptylive.daemon.cli.commands.reconstruct`) validates the job once
(:func:`validate`: every attribute, every frame finite, windows inside the object) and hands the
checked :class:`ReconstructionJob` to the ranks as JSON, never pickled: in the environment
variable :data:`JOB_ENV` when it starts ``mpiexec`` itself (ranks run ``python -m
ptylive.daemon.cli.offline``, not the CLI again), or broadcast as bytes by rank 0 when the user
started ``mpiexec``. Every rank then runs the engine (:mod:`ptylive.daemon.engine`) on its extended
tile, exactly as a streaming worker does; rank 0 stitches the tiles and writes the result through
:func:`ptylive.daemon.service.results.write_result`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptylive.daemon.cli.offline_stop import (
    AgreedStop,
    IterationVote,
    Progress,
    StopRequested,
    StopSignals,
    finish_async,
    reduced_report,
)
from ptylive.daemon.engine.decomposition import RankDomain, decompose, stitch
from ptylive.daemon.engine.exchange.factory import async_exchanger, sync_exchanger
from ptylive.daemon.engine.exchange.gather import gather_rows, gather_to_root
from ptylive.daemon.engine.exchange.protocols import SyncExchange
from ptylive.daemon.engine.exchange.sync import common_round_slices
from ptylive.daemon.engine.iteration import EngineReport, fit_scale, run_async, run_sync
from ptylive.daemon.engine.loss_choice import choose_loss, dark_field_fraction
from ptylive.daemon.engine.memory_plan import rank_memory
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.positions import PositionCorrection, counting_noise
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.daemon.service.results import RANK_STATS, write_result
from ptylive.gpu.backend import PRECISIONS, backend_module, to_numpy
from ptylive.gpu.patches import check_windows, window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.warmup import compile_kernels
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

#: Halo margin (px) around every extended tile when positions are corrected: windows move inside it, so
#: the clipping of a corrected window depends on the object's edges only, never on the number of ranks.
POSITION_MARGIN_PX = 6

#: Environment variable that carries the validated job (JSON) to ranks started by the launcher.
JOB_ENV = "PTYLIVE_RECONSTRUCT_JOB"


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
    pixel_size_A: float
    edge_fraction: float
    quiet: bool = False
    counted: bool = False  # every intensity an integer: detector counts (Poisson noise of known size)
    dark_field_fraction: float = 0.0  # of the mean pattern's counts, beyond the disk (loss = "auto" chose by it)

    @property
    def window_px(self) -> int:
        return self.metadata.detector_px * self.upsampling

    def positions(self) -> np.ndarray:
        """(n, 2) probe positions in reconstruction pixels (the file's, rescaled to :attr:`pixel_size_A`)."""
        return scaled_positions(read_positions(self.scan_path), self.metadata, self.pixel_size_A, self.window_px)

    def to_json(self) -> str:
        """The job as JSON (paths as strings); :meth:`from_json` reads it back."""
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> ReconstructionJob:
        fields = json.loads(text)
        meta = fields["metadata"]
        if meta["object_shape"] is not None:
            meta["object_shape"] = tuple(meta["object_shape"])
        return cls(**{**fields, "scan_path": Path(fields["scan_path"]), "out_path": Path(fields["out_path"]),
                      "options": EngineOptions(**fields["options"]), "metadata": ScanMetadata(**meta),
                      "object_shape": tuple(fields["object_shape"])})


def slice_thickness_for(meta: ScanMetadata, n_slices: int, slice_thickness_A: float | None) -> float:
    """Slice thickness in Å: as given, else the file's total thickness shared by ``n_slices``.

    A file that says 40 slices of 1.95 Å holds a 78 Å specimen: ``--slices 20`` then reconstructs
    20 slices of 3.9 Å, not half the specimen. ``--slice-thickness-A`` overrides the total.
    """
    if slice_thickness_A is not None:
        if not slice_thickness_A >= 0 or (n_slices > 1 and slice_thickness_A == 0):
            raise ValueError(f"--slice-thickness-A must be > 0 for {n_slices} slices, got {slice_thickness_A}")
        return float(slice_thickness_A)
    if meta.slice_thickness_A is None:
        if n_slices > 1:
            raise ValueError("several slices need a slice thickness: give --slice-thickness-A or the file's "
                             "slice_thickness_A attribute")
        return 0.0
    total = meta.slice_thickness_A * (meta.n_slices or 1)
    return total / n_slices


def validate(scan_path: Path, out_path: Path, n_ranks: int, n_slices: int | None,
             slice_thickness_A: float | None, upsampling: int | None, precision: str, backend: str,
             options: EngineOptions, quiet: bool = False, probe_refinement_chosen: bool = True) -> ReconstructionJob:
    """Check the scan and the options; raise ScanFileError/ValueError naming the problem.

    Unless ``probe_refinement_chosen``, a probe that the file holds for this window is trusted: it is not
    refined (one probe mode). On own PbTiO3 simulations at 1e5 e/Å² with the exact probe in the file,
    refining it cost 0.976 -> 0.916 (16 × 16 scan) and 0.80 on the default scan.
    """
    meta = read_metadata(scan_path)
    slices = n_slices if n_slices is not None else (meta.n_slices or 1)
    if slices < 1:
        raise ValueError(f"number of slices must be >= 1, got {slices}")
    thickness = slice_thickness_for(meta, slices, slice_thickness_A)
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
    pixel = reconstruction_pixel_A(meta, upsampling)
    positions = scaled_positions(read_positions(scan_path), meta, pixel, window)
    shape = meta.object_shape if pixel == meta.pixel_size_A and meta.object_shape else object_shape_for(positions,
                                                                                                      window)
    starts, _ = window_starts(positions, window)
    try:
        check_windows(shape, starts, window)
    except ValueError as exc:
        raise ScanFileError(f"{scan_path}: positions outside the object: {exc}") from None
    pattern_sum = np.zeros((meta.detector_px, meta.detector_px))
    counted = True
    for first in range(0, meta.n_positions, 256):  # NaN anywhere fails before any rank starts
        block = read_frames(scan_path, np.arange(first, min(first + 256, meta.n_positions)))
        pattern_sum += block.sum(axis=0)
        counted = counted and bool(np.all(block == np.rint(block)))
    probe = read_optional(scan_path, "probe")
    if probe is not None and probe.shape != (window, window):
        if pixel == meta.pixel_size_A:
            raise ScanFileError(f"{scan_path}: 'probe' is {probe.shape}, expected ({window}, {window}) "
                                f"for detector {meta.detector_px} px x upsampling {upsampling}")
        logger.warning("the file's probe is on its own %s grid, not the %d-px window of upsampling %d: the probe "
                       "is built from the optics attributes", probe.shape, window, upsampling)
    elif probe is not None and not probe_refinement_chosen and options.refine_probe and options.probe_modes == 1:
        logger.info("the file holds the probe: it is not refined (--refine-probe to refine it)")
        options = dataclasses.replace(options, refine_probe=False)
    if not out_path.parent.exists():
        raise ValueError(f"output folder {out_path.parent} does not exist")
    counted = counted and bool(pattern_sum.sum() > 0)
    fraction = dark_field_fraction(pattern_sum, meta.detector_pixel_mrad, meta.convergence_semiangle_mrad)
    options = dataclasses.replace(options, loss=choose_loss(options.loss, fraction, counted))
    return ReconstructionJob(scan_path, out_path, n_ranks, slices, thickness, upsampling, precision,
                             backend, options, meta, shape, pixel, edge_fraction(pattern_sum), quiet,
                             counted=counted, dark_field_fraction=fraction)


def _initial_state(job: ReconstructionJob, domain: RankDomain, all_positions: np.ndarray, xp: Any) -> TileState:
    meta = job.metadata
    real_t = PRECISIONS[job.precision][0]
    probe = read_optional(job.scan_path, "probe")
    if probe is not None and probe.shape != (job.window_px, job.window_px):
        probe = None  # on the file's grid, not this upsampling's (validate warned)
    optics = TileOptics(meta.energy_eV, meta.convergence_semiangle_mrad, meta.defocus_A, job.pixel_size_A,
                        job.window_px, job.n_slices, job.slice_thickness_A, probe)
    starts, shifts = domain.extended.windows(all_positions[domain.positions], job.window_px)
    frames = xp.asarray(read_frames(job.scan_path, domain.positions, dtype=real_t))
    state = set_up_tile(domain, optics, starts, shifts, frames, xp, job.precision, job.options.probe_modes,
                        job.options.missing_cone)
    if job.options.correct_positions:
        state.positions = PositionCorrection.start(all_positions[domain.positions],
                                                   job.options.positions_from_iteration)
    return state


def _shot_noise_prior(state: TileState, job: ReconstructionJob) -> None:
    """Position correction on counted data gets the shot-noise prior (:func:`refine_positions`)."""
    if state.positions is not None and job.counted:
        state.positions.noise_px2_loss = counting_noise(job.options.loss, state.scale)


def implied_upsampling(meta: ScanMetadata) -> float:
    """The upsampling the file's pixel size stands for, unrounded: λ / (D · Δθ · pixel)."""
    return wavelength_A(meta.energy_eV) / (meta.detector_px * meta.detector_pixel_mrad * 1e-3 * meta.pixel_size_A)


def infer_upsampling(meta: ScanMetadata) -> int:
    """Upsampling implied by the file's pixel size (:func:`implied_upsampling`), rounded, at least 1."""
    return max(1, int(round(implied_upsampling(meta))))


#: Fraction of the mean pattern's intensity on the detector's outer ring above which a hint suggests upsampling.
EDGE_HINT = 1e-3


def reconstruction_pixel_A(meta: ScanMetadata, upsampling: int) -> float:
    """Object pixel of a window ``upsampling`` × the detector: ``λ / (u D Δθ)``, Å.

    The file's own pixel must be such a pixel for a whole ``u`` (the file is consistent); any
    ``upsampling`` then works on it, the positions rescaled to the finer or coarser grid.
    """
    implied = implied_upsampling(meta)
    if implied < 0.99 or abs(implied - round(implied)) > 0.01 * implied:
        raise ScanFileError(
            f"pixel_size_A={meta.pixel_size_A:.5g} is not lambda/(u*N*dtheta) for a whole u (it implies u = "
            f"{implied:.3g} with N = {meta.detector_px} px, dtheta = {meta.detector_pixel_mrad} mrad)")
    return wavelength_A(meta.energy_eV) / (upsampling * meta.detector_px * meta.detector_pixel_mrad * 1e-3)


def scaled_positions(positions_px: np.ndarray, meta: ScanMetadata, pixel_size_A: float, window_px: int) -> np.ndarray:
    """(n, 2) file positions in pixels of ``pixel_size_A``; shifted whole pixels so no window starts below 0."""
    if pixel_size_A == meta.pixel_size_A:
        return positions_px
    scaled = positions_px * (meta.pixel_size_A / pixel_size_A)
    starts, _ = window_starts(scaled, window_px)
    return scaled + np.maximum(-starts.min(axis=0), 0)


def edge_fraction(pattern: np.ndarray, ring_px: int = 2) -> float:
    """Share of ``pattern`` (D, D) intensity within ``ring_px`` of the detector edge."""
    total = float(pattern.sum())
    inner = float(pattern[ring_px:-ring_px, ring_px:-ring_px].sum())
    return (total - inner) / total if total > 0 else 0.0


def run_rank(job: ReconstructionJob, comm: Any | None, signals: StopSignals | None = None) -> None:
    """Reconstruct this rank's tile; rank 0 stitches and writes ``job.out_path``.

    A stop signal (``signals``, :mod:`.offline_stop`) ends the iterations early at a point every rank
    agrees on; the result so far is written with status ``interrupted``.

    Peak memory is measured with tracemalloc (numpy reports its buffers to it) from after the
    kernels are compiled, so it counts the arrays of the reconstruction rather than compiled code
    and imported modules.
    """
    if job.backend == "numpy":
        compile_kernels(*PRECISIONS[job.precision])
    tracemalloc.start()
    rank = 0 if comm is None else comm.Get_rank()
    positions = job.positions()
    margin = POSITION_MARGIN_PX if job.options.correct_positions else 0  # corrected windows stay inside
    domains = decompose(job.object_shape, positions, job.window_px, job.n_ranks, margin_px=margin)
    domain = domains[rank]
    state = _initial_state(job, domain, positions, backend_module(job.backend))
    started = time.perf_counter()
    progress = None if (rank != 0 or job.quiet) else progress_printer(job.options.iterations, started)
    if progress is not None:
        print(f"{job.n_slices} slices x {job.slice_thickness_A:.4g} A = {job.n_slices * job.slice_thickness_A:.4g} A "
              f"thick; window {job.window_px} px (upsampling {job.upsampling}) of {job.pixel_size_A:.4g} A; "
              f"{job.n_ranks} rank(s), {job.options.mode}; {job.options.loss} loss ({job.dark_field_fraction:.2%} of "
              f"the counts beyond the bright-field disk{'' if job.counted else ', not counts'})", file=sys.stderr,
              flush=True)
        if job.upsampling == 1 and job.edge_fraction > EDGE_HINT:
            print(f"note: {job.edge_fraction:.2%} of the intensity falls on the detector's outer ring: scattering "
                  "beyond the detector aliases on a grid at its Nyquist pixel; --upsampling 2 may fit better",
                  file=sys.stderr, flush=True)
    report, exchanger, stopped = _iterate(job, state, domains, rank, comm, progress, signals)
    rounds = common_round_slices(domains, job.n_slices, job.precision)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    predicted = rank_memory(domain, job.n_slices, job.window_px, job.metadata.detector_px,
                            job.options.batch_size, job.precision, job.options.mode,
                            job.options.updates_per_iteration, job.options.probe_modes,
                            total_positions=len(positions), round_slices=rounds,
                            recompute_waves=job.options.recompute_waves,
                            missing_cone=job.options.missing_cone > 0).total
    measured = {"compute_s": report.compute_s, "exchange_wait_s": exchanger.stats.wait_s, "consensus_wait_s": 0.0,
                "bytes_sent": exchanger.stats.bytes_sent, "staleness_mean": _mean(exchanger.stats.staleness),
                "staleness_max": max(exchanger.stats.staleness, default=0),
                "iterations_total_s": sum(report.iterations_s), "frames_bytes": state.targets.nbytes,
                "frames_received": len(domain.positions), "peak_memory_bytes": peak,
                "predicted_memory_bytes": predicted}
    stats = np.array([float(measured[name]) for name in RANK_STATS], dtype=np.float64)
    volumes, all_stats = gather_to_root(comm, domains, to_numpy(state.volume), stats)
    corrected = state.positions.state.positions_px if state.positions is not None else positions[domain.positions]
    rows = gather_rows(comm, [len(d.positions) for d in domains], corrected)
    if rank == 0:
        result = stitch((job.n_slices, *job.object_shape), domains, volumes)
        final_positions = positions.copy()
        for d, r in zip(domains, rows, strict=True):
            final_positions[d.positions] = r
        _write(job, result, to_numpy(state.probe), positions, final_positions, report, all_stats, state.scale,
               stopped)


def _iterate(job: ReconstructionJob, state: TileState, domains: list[RankDomain], rank: int, comm: Any | None,
             progress: Callable[[int, float, float], None] | None,
             signals: StopSignals | None) -> tuple[EngineReport, SyncExchange, str | None]:
    """Run the engine on this rank; returns its report, exchanger and the stop signal's name (None: ran to the end)."""
    signals = signals if signals is not None else StopSignals()
    done = Progress()
    if job.options.mode == "sync" or job.n_ranks == 1:  # one rank: async has nobody to wait for
        agreed = AgreedStop(sync_exchanger(comm, domains, rank, job.n_slices, job.precision), signals)
        fit_scale(state, agreed, job.options)
        _shot_noise_prior(state, job)
        try:
            return run_sync(state, agreed, job.options, done.recorder(progress),
                            between_batches=agreed.between_batches), agreed.exchanger, None
        except StopRequested as stop:
            return reduced_report(done, agreed, "sync"), agreed.exchanger, str(stop)
    asynchronous = async_exchanger(comm, domains, rank, job.n_slices, job.precision, job.options)
    fit_scale(state, asynchronous, job.options)
    _shot_noise_prior(state, job)
    per_iteration = job.options.updates_per_iteration  # progress's step: the iteration's last update
    vote = IterationVote(comm, signals, job.options.iterations,
                         while_waiting=lambda i: asynchronous.progress(state.volume, (i + 1) * per_iteration - 1))
    try:
        return run_async(state, asynchronous, job.options, done.recorder(progress, vote)), asynchronous, None
    except StopRequested as stop:
        finish_async(state, asynchronous, job.options, len(done.losses))
        return reduced_report(done, asynchronous, "async"), asynchronous, str(stop)


def _mean(values: list[int]) -> float:
    return float(np.mean(values)) if values else 0.0


def progress_printer(total: int, started: float,
                     clock: Callable[[], float] = time.perf_counter) -> Callable[[int, float, float], None]:
    """``show(iteration, loss, seconds)``: one stderr line per iteration, with the time left.

    The time left is the mean time per iteration so far (set-up included) times the iterations left.
    """
    def show(iteration: int, loss: float, seconds: float) -> None:
        done, elapsed = iteration + 1, clock() - started
        remaining = elapsed / done * max(total - done, 0)
        print(f"iteration {done:4d}/{total}  loss {loss:.6e}  {seconds:6.3f} s/it  elapsed {elapsed:7.1f} s  "
              f"remaining {remaining:7.1f} s", file=sys.stderr, flush=True)

    return show


def _write(job: ReconstructionJob, volume: np.ndarray, probe: np.ndarray, nominal: np.ndarray,
           positions: np.ndarray, report: EngineReport, stats: np.ndarray, scale: float,
           stopped: str | None = None) -> None:
    done = len(report.loss_history)
    attrs = {"mode": job.options.mode, "n_ranks": job.n_ranks, "iterations": done,
             "iterations_requested": job.options.iterations,
             "status": "complete" if stopped is None else "interrupted",
             "precision": job.precision, "n_slices": job.n_slices, "slice_thickness_A": job.slice_thickness_A,
             "upsampling": job.upsampling, "loss_function": job.options.loss, "detector_scale": scale,
             "pixel_size_A": job.pixel_size_A, "energy_eV": job.metadata.energy_eV,
             "source": str(job.scan_path), "step_size": job.options.step, "backend": job.backend}
    per_rank = [dict(zip(RANK_STATS, row, strict=True)) for row in stats]
    attrs["positions_corrected"] = job.options.correct_positions
    attrs["depth_regularisation"] = job.options.depth_regularisation
    attrs["missing_cone"] = job.options.missing_cone
    attrs["recompute_waves"] = job.options.recompute_waves
    if stopped is not None:
        attrs["stop_signal"] = stopped
    write_result(job.out_path, {"object": volume, "probe": probe, "loss": np.asarray(report.loss_history),
                                "positions_px": positions, "positions_nominal_px": nominal}, per_rank, attrs)
    if stopped is not None:
        print(f"interrupted ({stopped}) after {done} of {job.options.iterations} iterations: wrote {job.out_path}",
              file=sys.stderr, flush=True)
    elif not job.quiet:
        print(f"wrote {job.out_path}", file=sys.stderr)


def run_job(job: ReconstructionJob, comm: Any | None) -> None:
    """Run ``job`` on this rank (SIGTERM, SIGINT, SIGHUP: stop early and save); with CuPy each rank takes the GPU
    of its node-local rank."""
    with StopSignals().installed() as signals:
        if job.backend != "cupy" or comm is None:
            run_rank(job, comm, signals)
            return
        import cupy  # type: ignore[import-not-found]
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        with cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()):
            run_rank(job, comm, signals)


def main() -> int:
    """Entry point of ranks started by the launcher: the job comes from :data:`JOB_ENV`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    job = ReconstructionJob.from_json(os.environ[JOB_ENV])
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != job.n_ranks:
        raise SystemExit(f"error: the job needs {job.n_ranks} ranks but mpiexec started {comm.Get_size()}")
    run_job(job, comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
