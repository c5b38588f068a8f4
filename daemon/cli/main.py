"""The ``ptylive`` command line: serve, demo, simulate, reconstruct, plan, bench, replay.

Errors a user can fix (bad files, bad options) print one ``error:`` line and
exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from ptylive.gpu.simulate import SimulationSpec

    d = SimulationSpec()
    p = sub.add_parser("simulate", help="write a simulated perovskite scan file (HDF5)")
    p.add_argument("out", type=Path, help="scan file to write (HDF5)")
    p.add_argument("--energy-eV", type=float, default=d.energy_eV, help="beam energy in eV (default: %(default)s)")
    p.add_argument("--convergence-mrad", type=float, default=d.convergence_semiangle_mrad,
                   help="probe convergence semi-angle in mrad (default: %(default)s)")
    p.add_argument("--defocus-A", type=float, default=d.defocus_A, help="probe defocus in Å (default: %(default)s)")
    p.add_argument("--detector-px", type=int, default=d.detector_px,
                   help="side of the square detector in pixels (default: %(default)s)")
    p.add_argument("--detector-pixel-mrad", type=float, default=d.detector_pixel_mrad,
                   help="detector pixel in mrad (default: %(default)s)")
    p.add_argument("--upsampling", type=int, default=d.upsampling,
                   help="object pixels per detector-limited pixel: window = detector × upsampling px "
                        "(default: %(default)s)")
    p.add_argument("--slices", type=int, default=d.n_slices, help="object slices (default: %(default)s)")
    p.add_argument("--slice-thickness-A", type=float, default=d.slice_thickness_A,
                   help="slice thickness in Å (default: %(default)s)")
    p.add_argument("--scan", type=int, nargs=2, default=d.scan_shape, metavar=("ROWS", "COLS"),
                   help="raster of probe positions (default: %(default)s)")
    p.add_argument("--step-px", type=float, default=d.scan_step_px,
                   help="scan step in object pixels (default: %(default)s)")
    p.add_argument("--crystal", default="PbTiO3",
                   help="ABX3 perovskite formula, e.g. PbTiO3, SrTiO3, BaTiO3 (default: %(default)s)")
    p.add_argument("--dose", type=float, default=None,
                   help="electrons per Å², with Poisson noise (default: none, noise-free)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the noise (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (default: progress shown)")


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION

    p = sub.add_parser("reconstruct", help="reconstruct a scan file on R ranks")
    p.add_argument("scan", type=Path, help="scan file to reconstruct (HDF5, docs/scanfile.md)")
    p.add_argument("--ranks", type=int, default=1,
                   help="MPI ranks, one tile each; more than 1 starts mpiexec (default: %(default)s)")
    p.add_argument("--hostfile", type=Path, default=None,
                   help="hosts for the ranks, passed to mpiexec -f (one host[:slots] a line; docs/operations.md) "
                        "(default: this host, or the nodes of a Slurm allocation)")
    p.add_argument("--iterations", type=int, default=30,
                   help="passes over every position (default: %(default)s)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="halo exchange: sync (every update waits for it) or async (bounded staleness) "
                        "(default: %(default)s)")
    p.add_argument("--slices", type=int, default=None, help="object slices (default: the file's n_slices, else 1)")
    p.add_argument("--slice-thickness-A", type=float, default=None,
                   help="slice thickness in Å (default: the file's total thickness over --slices)")
    p.add_argument("--upsampling", type=int, default=None,
                   help="object pixels per detector-limited pixel (default: implied by the file's pixel size)")
    p.add_argument("--precision", choices=("single", "double"), default="single",
                   help="floating point of the arrays (default: %(default)s)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="numpy (CPU) or cupy (CUDA GPU) (default: %(default)s)")
    p.add_argument("--loss", choices=("auto", "amplitude", "poisson"), default="auto",
                   help="data term (default: %(default)s: Poisson for counted data of a weak scatterer, under 1 %% "
                        "of the counts beyond the bright-field disk, amplitude otherwise; docs/physics.md, Losses)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="most positions propagated at once per rank (default: %(default)s; fewer where their "
                        "stored waves would outgrow half the rank's tile, docs/decomposition.md)")
    p.add_argument("--step-size", type=float, default=None,
                   help="update step, dimensionless (default: 1.0 sync, 0.5 async; halved for --loss poisson)")
    p.add_argument("--refine-probe", action=argparse.BooleanOptionalAction, default=None,
                   help="refine the probe with the object (default: on when the probe is built from the optics "
                        "attributes, which is rarely the microscope's; off when the file holds a probe for the "
                        "window, which is then trusted)")
    p.add_argument("--correct-positions", action=argparse.BooleanOptionalAction, default=True,
                   help="refine every probe position and a global rotation of the scan from iteration 3, held "
                        "to it by a shot-noise prior (result: positions_px corrected, positions_nominal_px as "
                        "read); default: on (perturbed SrTiO3 0.85 -> 0.97; on exact positions it costs at most "
                        "0.008, docs/physics.md); --no-correct-positions trusts the file's positions")
    p.add_argument("--probe-modes", type=int, default=1, metavar="K",
                   help="incoherent probe modes for a partially coherent beam (default: 1, one coherent probe; "
                        "K > 1 needs --refine-probe and costs about K times per position; result: probe (K, N, N))")
    p.add_argument("--max-staleness", type=int, default=4,
                   help="async: most updates a neighbour's halo may lag behind (default: %(default)s)")
    p.add_argument("--updates-per-iteration", type=int, default=DEFAULT_UPDATES_PER_ITERATION,
                   help=f"mini-batches per iteration (default: {DEFAULT_UPDATES_PER_ITERATION}; docs/physics.md)")
    p.add_argument("--depth-regularisation", type=float, default=0.0, metavar="MU",
                   help="weight of a penalty on slice-to-slice differences, dimensionless (relative to the "
                        "illumination; MU = 0.1 removes about a tenth of the difference per update); default: 0, "
                        "off (docs/physics.md, Depth regularisation)")
    p.add_argument("--missing-cone", type=float, default=1.0, metavar="S",
                   help="strength of the missing-cone filter, dimensionless: depth structure outside the probe's "
                        "transfer cone (k_r < S |k_z| / alpha) is removed once per iteration; default: %(default)s "
                        "(the cone's own edge); 0: off; no effect on one slice (docs/physics.md, Missing cone)")
    p.add_argument("--recompute-waves", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each batch's slice waves in the backward pass from every ceil(sqrt(S))-th slice "
                        "instead of storing all S: the same result, 19 of 100 waves' memory at 100 slices, about "
                        "1.5x the slice FFTs (default: off; ptylive plan --recompute-waves shows the memory)")
    p.add_argument("-o", "--out", type=Path, required=True, help="result file (HDF5) to write")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr (default: progress shown)")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION

    p = sub.add_parser("plan", help="predict memory per rank (from a scan file or from sizes)")
    p.add_argument("scan", type=Path, nargs="?",
                   help="scan file (HDF5); without one, give --object, --positions and --window")
    p.add_argument("--ranks", type=int, required=True, help="MPI ranks to plan for")
    p.add_argument("--slices", type=int, default=None, help="object slices (default: the file's n_slices, else 1)")
    p.add_argument("--object", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="object size in pixels (required without a scan file)")
    p.add_argument("--positions", type=int, help="number of probe positions (required without a scan file)")
    p.add_argument("--window", type=int, help="side of the probe window in pixels (required without a scan file)")
    p.add_argument("--detector", type=int, default=None,
                   help="side of the detector in pixels (default: the window over --upsampling)")
    p.add_argument("--upsampling", type=int, default=None,
                   help="object pixels per detector-limited pixel (default: implied by the file, else 1)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="most positions propagated at once per rank (default: %(default)s; fewer where their "
                        "stored waves would outgrow half the rank's tile, docs/decomposition.md)")
    p.add_argument("--precision", choices=("single", "double"), default="single",
                   help="floating point of the arrays (default: %(default)s)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="halo exchange (default: %(default)s)")
    p.add_argument("--updates-per-iteration", type=int, default=DEFAULT_UPDATES_PER_ITERATION,
                   help=f"global mini-batches per iteration (default: {DEFAULT_UPDATES_PER_ITERATION})")
    p.add_argument("--probe-modes", type=int, default=1,
                   help="incoherent probe modes K; each stores its own waves (default: %(default)s)")
    p.add_argument("--missing-cone", type=float, default=1.0, metavar="S",
                   help="plan for reconstruct --missing-cone S: 0 leaves the filter's scratch out (default: "
                        "%(default)s, on)")
    p.add_argument("--recompute-waves", action="store_true",
                   help="plan for reconstruct --recompute-waves: a batch holds ceil(S/g) - 1 + g of its S slice "
                        "waves, g = ceil(sqrt(S))")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against references measured in the same run)")
    p.add_argument("what", choices=("engine", "gpu", "ingest", "quality"),
                   help="the benchmark to run (gpu: the engine on CuPy, the card named; tools/device_check.sh)")
    p.add_argument("cases", type=Path, nargs="*", help="quality: scan files (default: tests/data/abtem/*.h5)")
    p.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="engine: numpy (CPU) or cupy (CUDA GPU) (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=4,
                   help="quality: ranks of the async run; the other runs 1, sync (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=30,
                   help="quality: iterations, for every code (default: %(default)s)")
    p.add_argument("--peers", default="py4dstem,ptyrad",
                   help="quality: peer codes, comma-separated, or 'none' (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="quality, gpu: JSON instead of the table")
    p.add_argument("--ptylive-args", default="", metavar="FLAGS",
                   help="quality: extra flags for both ptylive runs, e.g. --ptylive-args=--correct-positions "
                        "(default: none)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming daemon (ingest, workers, previews) from a TOML config")
    p.add_argument("--config", type=Path, required=True,
                   help="TOML config file (docs/daemon.md; example: systemd/ptylive.toml)")
    p.add_argument("--hostfile", type=Path, default=None,
                   help="hosts for the ranks, passed to mpiexec -f; rank 0 on the first (docs/operations.md) "
                        "(default: this host, or the nodes of a Slurm allocation)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve + fake detector streaming a simulated PbTiO3 scan + live previews")
    p.add_argument("--ranks", type=int, default=2, help="worker ranks (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("ptylive-demo"),
                   help="folder for config, log and results (default: %(default)s)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="frames per second from the fake detector (default: %(default)s)")
    p.add_argument("--scan", type=int, nargs=2, default=(24, 24), metavar=("ROWS", "COLS"),
                   help="raster of probe positions (default: %(default)s)")
    p.add_argument("--dose", type=float, default=1e6,
                   help="electrons per Å², with Poisson noise (default: %(default)s)")
    p.add_argument("--final-iterations", type=int, default=20,
                   help="iterations after the last frame, before the final file (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=0, help="viewer port; 0: any free port (default: %(default)s)")
    p.add_argument("--keep-running", action="store_true",
                   help="keep serving after the series, until Ctrl-C (default: stop after it)")


def _add_replay(sub: argparse._SubParsersAction) -> None:
    from ptylive.streaming.replay import add_arguments

    add_arguments(sub.add_parser("replay", help="send a scan file, a 4-D array or a ZeroMQ dump recording to a "
                                                "running daemon"))


def _add_service(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("service", help="install the systemd unit, example config, Prometheus job and Grafana files")
    actions = p.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help="write the packaged files under a prefix (see docs/operations.md)")
    install.add_argument("--prefix", type=Path, required=True, metavar="DIR",
                         help="root the files go under: DIR/etc/systemd/system/ptylive.service, "
                              "DIR/etc/ptylive/ptylive.toml, ... (/ for the host itself)")
    install.add_argument("--force", action="store_true", help="replace files that exist (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    from ptylive import __version__

    parser = argparse.ArgumentParser(prog="ptylive", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO, the engine's per-iteration lines included (default: warnings only; "
                             "serve: ptylive's INFO lines)")
    parser.add_argument("--version", action="version", version=f"ptylive {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_reconstruct, _add_plan, _add_bench, _add_serve, _add_demo, _add_replay,
                _add_service):
        add(sub)
    from ptylive.daemon.cli.result_tools import add_parsers as add_result_tools  # inspect, export, plot

    add_result_tools(sub)
    return parser


def serve_log_filter(record: logging.LogRecord) -> bool:
    """What plain ``serve`` logs: warnings and errors, and ptylive's INFO lines (series started, refused, ended
    with its status and final file; workers' per-series lines) less the engine's per-iteration ones."""
    if record.levelno >= logging.WARNING:
        return True
    return (record.levelno >= logging.INFO and record.name.startswith("ptylive.")
            and not record.name.startswith("ptylive.daemon.engine"))


def configure_logging(command: str, verbose: bool) -> None:
    """Log to stderr (the journal, under systemd): INFO with ``-v``; else warnings, and for ``serve``
    :func:`serve_log_filter`'s INFO lines. Nothing changes where logging is set up already (tests)."""
    handler = logging.StreamHandler()
    if command == "serve" and not verbose:
        handler.addFilter(serve_log_filter)
    logging.basicConfig(level=logging.INFO if verbose or command == "serve" else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_logging(args.command, args.verbose)
    from ptylive.daemon.cli import commands

    try:
        return commands.run(args, argv)
    except (ValueError, OSError) as exc:  # ScanFileError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
