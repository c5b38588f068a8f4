"""What each ``ptylive`` sub-command does (argument parsing lives in :mod:`cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any

from ptylive.daemon.cli.launcher import relaunch, under_mpi

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
PEER_DEATH_GRACE_S = 1.0  # how long a rank whose MPI call failed waits before MPI_Abort


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.cli import result_tools

    if args.command in result_tools.COMMANDS:
        return int(getattr(result_tools, args.command)(args, argv))
    handler = {"simulate": simulate, "reconstruct": reconstruct, "plan": plan, "bench": bench, "serve": serve,
               "demo": demo, "replay": replay, "service": service}[args.command]
    return handler(args, argv)


def simulate(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.gpu.simulate import SimulationSpec
    from ptylive.gpu.simulate import simulate as run_simulation
    from ptylive.streaming.scanfile import write_scan

    match = re.fullmatch(r"([A-Z][a-z]?)([A-Z][a-z]?)([A-Z][a-z]?)3", args.crystal)
    if match is None:
        raise ValueError(f"--crystal must be an ABX3 formula such as PbTiO3, got {args.crystal!r}")
    a_site, b_site, x_site = match.groups()
    spec = SimulationSpec(
        energy_eV=args.energy_eV, convergence_semiangle_mrad=args.convergence_mrad, defocus_A=args.defocus_A,
        detector_px=args.detector_px, upsampling=args.upsampling, detector_pixel_mrad=args.detector_pixel_mrad,
        n_slices=args.slices, slice_thickness_A=args.slice_thickness_A, scan_shape=tuple(args.scan),
        scan_step_px=args.step_px, a_site=a_site, b_site=b_site, x_site=x_site,
        dose_e_per_A2=args.dose, seed=args.seed,
    )
    if spec.n_slices < 1 or spec.detector_px < 4 or min(spec.scan_shape) < 1 or not spec.scan_step_px > 0:
        raise ValueError("--slices, --scan and --step-px must be positive and --detector-px >= 4")
    n_positions = spec.scan_shape[0] * spec.scan_shape[1]
    if not args.quiet:
        print(f"simulating {n_positions} positions: {spec.n_slices} slices, window {spec.window_px} px",
              file=sys.stderr, flush=True)
    began = time.perf_counter()
    shown = [began]

    def progress(done: int, total: int) -> None:  # at most one line a second, with the time left
        now = time.perf_counter()
        if done < total and now - shown[0] >= 1.0:
            shown[0] = now
            left = (now - began) / done * (total - done)
            print(f"simulated {done}/{total} positions, about {left:.0f} s left", file=sys.stderr, flush=True)

    result = run_simulation(spec, on_batch=None if args.quiet else progress)
    seconds = time.perf_counter() - began
    if not args.quiet:
        print(f"simulated {len(result.positions_px)}/{n_positions} positions in {seconds:.1f} s "
              f"({len(result.positions_px) / max(seconds, 1e-9):,.1f} positions/s)", file=sys.stderr, flush=True)
    write_scan(args.out, result.metadata, result.intensities, result.positions_px, result.probe, result.object_truth)
    truth = result.object_truth
    print(f"wrote {args.out}: {len(result.positions_px)} positions, object {truth.shape[1]}x{truth.shape[2]} px "
          f"x {truth.shape[0]} slices, window {spec.window_px} px, pixel {spec.pixel_size_A:.4f} Å")
    return 0


def _validate(args: argparse.Namespace) -> Any:
    from ptylive.daemon.cli.offline import validate
    from ptylive.daemon.service.config import ReconstructionConfig

    settings = ReconstructionConfig(loss=args.loss, batch_size=args.batch_size, step_size=args.step_size,
                                    refine_probe=args.refine_probe is not False,
                                    correct_positions=args.correct_positions,
                                    probe_modes=args.probe_modes, max_staleness=args.max_staleness,
                                    updates_per_iteration=args.updates_per_iteration,
                                    depth_regularisation=args.depth_regularisation,
                                    missing_cone=args.missing_cone, recompute_waves=args.recompute_waves)
    return validate(args.scan, args.out, args.ranks, args.slices, args.slice_thickness_A, args.upsampling,
                    args.precision, args.backend, settings.engine_options(args.mode, args.iterations), args.quiet,
                    probe_refinement_chosen=args.refine_probe is not None)


def reconstruct(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate once, then run here (one rank), under a new ``mpiexec``, or under the user's ``mpiexec``."""
    from ptylive.daemon.cli.offline import JOB_ENV, ReconstructionJob, run_job
    from ptylive.daemon.engine.exchange.gather import broadcast_bytes

    if not under_mpi():
        job = _validate(args)  # one clear message before any rank starts
        if args.ranks == 1 and args.hostfile is None:
            run_job(job, None)
            return 0
        return relaunch(args.ranks, [], module="ptylive.daemon.cli.offline", env={JOB_ENV: job.to_json()},
                        hostfile=args.hostfile)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    message = b""
    if comm.Get_rank() == 0:
        try:
            job = _validate(args)
            if comm.Get_size() != args.ranks:
                raise ValueError(f"--ranks {args.ranks} but mpiexec started {comm.Get_size()} ranks")
            message = b"J" + job.to_json().encode()
        except (ValueError, OSError) as exc:
            message = b"E" + str(exc).encode()
    message = broadcast_bytes(comm, message if comm.Get_rank() == 0 else None)
    if message[:1] == b"E":
        if comm.Get_rank() == 0:
            print(f"error: {message[1:].decode()}", file=sys.stderr)
        return EXIT_USAGE
    run_job(ReconstructionJob.from_json(message[1:].decode()), comm)
    return 0


def plan(args: argparse.Namespace, argv: list[str]) -> int:
    import numpy as np

    from ptylive.daemon.engine.memory_plan import format_table, plan_memory, synthetic_positions

    if args.scan is not None:
        from ptylive.daemon.cli.offline import (
            EDGE_HINT,
            edge_fraction,
            infer_upsampling,
            reconstruction_pixel_A,
            scaled_positions,
        )
        from ptylive.streaming.scanfile import object_shape_for, read_frames, read_metadata, read_positions

        meta = read_metadata(args.scan)
        upsampling = args.upsampling or infer_upsampling(meta)
        detector, window = meta.detector_px, meta.detector_px * upsampling
        pixel = reconstruction_pixel_A(meta, upsampling)
        positions = scaled_positions(read_positions(args.scan), meta, pixel, window)
        shape = (meta.object_shape if pixel == meta.pixel_size_A and meta.object_shape
                 else object_shape_for(positions, window))
        slices = args.slices or meta.n_slices or 1
        sample = np.unique(np.linspace(0, meta.n_positions - 1, min(meta.n_positions, 256)).astype(np.int64))
        edge = edge_fraction(read_frames(args.scan, sample).sum(axis=0))
        if upsampling == 1 and edge > EDGE_HINT:
            print(f"note: {edge:.2%} of the intensity falls on the detector's outer ring: --upsampling 2 may fit "
                  "better (memory below is for upsampling 1)", file=sys.stderr)
    else:
        if args.object is None or args.positions is None or args.window is None:
            raise ValueError("without a scan file, give --object ROWS COLS, --positions N and --window N")
        window = args.window
        detector = args.detector or (window // (args.upsampling or 1))
        shape = tuple(args.object)
        positions = synthetic_positions(shape, args.positions, window)
        slices = args.slices or 1
    result = plan_memory(shape, np.asarray(positions), args.ranks, slices, window, detector,
                         args.batch_size, args.precision, args.mode, args.updates_per_iteration, args.probe_modes,
                         recompute_waves=args.recompute_waves, missing_cone=args.missing_cone > 0)
    if args.json:
        print(json.dumps({"object_shape": list(shape), "n_slices": slices, "window_px": window,
                          "detector_px": detector, "ranks": [m.as_dict() for m in result]}, default=list))
    else:
        print(f"object {shape[0]}x{shape[1]} px x {slices} slices, {len(positions)} positions, "
              f"window {window} px, detector {detector} px, {args.precision} precision, {args.mode} mode")
        print(format_table(result))
    return 0


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Run a benchmark registered under the ``ptylive.bench`` entry points (``ptylive.tools``).

    The benchmarks import the daemon, so the CLI finds them by entry point rather than by import:
    imports flow one way (docs/architecture.md).
    """
    from importlib.metadata import entry_points

    found = {point.name: point for point in entry_points(group="ptylive.bench")}
    if args.what not in found:
        raise ValueError(f"no benchmark {args.what!r} is installed; found {sorted(found) or 'none'} "
                         "(reinstall ptylive: pip install -e .)")
    options = {"engine": {"quick": args.quick, "backend": args.backend}, "ingest": {"quick": args.quick},
               "gpu": {"quick": args.quick, "as_json": args.json},
               "quality": {"cases": args.cases, "ranks": args.ranks, "iterations": args.iterations,
                           "peers": args.peers, "as_json": args.json, "ptylive_args": args.ptylive_args}}[args.what]
    return int(found[args.what].load()(**options))


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.service.config import control_token, load_config

    config = load_config(args.config)
    if not under_mpi():
        if not config.output.folder.is_dir():  # one clear message before any rank starts
            raise ValueError(f"output folder {config.output.folder} does not exist")
        control_token(config.http, os.environ)  # the token file too (rank 0 reads it again, as it starts)
        return relaunch(config.workers.ranks + 1, argv, hostfile=args.hostfile)  # ignored by the ranks
    from mpi4py import MPI

    from ptylive.daemon.cli.serve import run as run_serve

    comm = MPI.COMM_WORLD
    try:
        return run_serve(config, comm)
    except Exception as exc:  # a bug on one rank must not leave the others running
        logger.exception("rank %d failed; aborting the job", comm.Get_rank())
        if isinstance(exc, MPI.Exception):
            # Most likely a peer died (MPI_Test's "process_vm_readv failed"): give its guard the time to name it
            # before our MPI_Abort tears the job down (daemon/cli/rank_guard.py).
            time.sleep(PEER_DEATH_GRACE_S)
        comm.Abort(1)
        return 1


def demo(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.cli.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(ranks=args.ranks, out=args.out, rate_hz=args.rate, scan_shape=tuple(args.scan),
                                dose_e_per_A2=args.dose, final_iterations=args.final_iterations,
                                http_port=args.http_port, keep_running=args.keep_running))


def replay(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.streaming.replay import run as run_replay

    return run_replay(args)


def service(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.cli.service_install import install, next_steps

    for path in install(args.prefix, force=args.force):
        print(f"wrote {path}")
    print(next_steps(args.prefix))
    return 0
