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
    p.add_argument("out", type=Path)
    p.add_argument("--energy-eV", type=float, default=d.energy_eV)
    p.add_argument("--convergence-mrad", type=float, default=d.convergence_semiangle_mrad)
    p.add_argument("--defocus-A", type=float, default=d.defocus_A)
    p.add_argument("--detector-px", type=int, default=d.detector_px)
    p.add_argument("--detector-pixel-mrad", type=float, default=d.detector_pixel_mrad)
    p.add_argument("--upsampling", type=int, default=d.upsampling)
    p.add_argument("--slices", type=int, default=d.n_slices)
    p.add_argument("--slice-thickness-A", type=float, default=d.slice_thickness_A)
    p.add_argument("--scan", type=int, nargs=2, default=d.scan_shape, metavar=("ROWS", "COLS"))
    p.add_argument("--step-px", type=float, default=d.scan_step_px)
    p.add_argument("--crystal", default="PbTiO3", help="ABX3 perovskite formula, e.g. PbTiO3, SrTiO3, BaTiO3")
    p.add_argument("--dose", type=float, default=None, help="electrons per Å² (Poisson noise); none = noise-free")
    p.add_argument("--seed", type=int, default=d.seed)


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION

    p = sub.add_parser("reconstruct", help="reconstruct a scan file on R ranks")
    p.add_argument("scan", type=Path)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--slices", type=int, default=None, help="default: the file's n_slices, else 1")
    p.add_argument("--slice-thickness-A", type=float, default=None)
    p.add_argument("--upsampling", type=int, default=None, help="default: implied by the file's pixel size")
    p.add_argument("--precision", choices=("single", "double"), default="single")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--loss", choices=("amplitude", "poisson"), default="amplitude")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-size", type=float, default=None,
                   help="default: 1.0 sync, 0.5 async; halved for --loss poisson")
    p.add_argument("--refine-probe", action=argparse.BooleanOptionalAction, default=None,
                   help="refine the probe with the object (default: on when the probe is built from the optics "
                        "attributes, which is rarely the microscope's; off when the file holds a probe for the "
                        "window, which is then trusted)")
    p.add_argument("--correct-positions", action=argparse.BooleanOptionalAction, default=True,
                   help="refine every probe position and a global affine of the scan from iteration 3, held to "
                        "the affine by a shot-noise prior (result: positions_px corrected, positions_nominal_px as "
                        "read); default: on (perturbed SrTiO3 0.85 -> 0.97; on exact positions it costs at most "
                        "0.008, docs/physics.md); --no-correct-positions trusts the file's positions")
    p.add_argument("--probe-modes", type=int, default=1, metavar="K",
                   help="incoherent probe modes for a partially coherent beam (default: 1, one coherent probe; "
                        "K > 1 needs --refine-probe and costs about K times per position; result: probe (K, N, N))")
    p.add_argument("--max-staleness", type=int, default=4, help="in updates")
    p.add_argument("--updates-per-iteration", type=int, default=DEFAULT_UPDATES_PER_ITERATION,
                   help=f"mini-batches per iteration (default: {DEFAULT_UPDATES_PER_ITERATION}; docs/physics.md)")
    p.add_argument("--depth-regularisation", type=float, default=0.0, metavar="MU",
                   help="weight of a penalty on slice-to-slice differences, dimensionless (relative to the "
                        "illumination; MU = 0.1 removes about a tenth of the difference per update); default: 0, "
                        "off (docs/physics.md, Depth regularisation)")
    p.add_argument("-o", "--out", type=Path, required=True, help="result file (HDF5) to write")
    p.add_argument("--quiet", action="store_true")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION

    p = sub.add_parser("plan", help="predict memory per rank (from a scan file or from sizes)")
    p.add_argument("scan", type=Path, nargs="?")
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--slices", type=int, default=None)
    p.add_argument("--object", type=int, nargs=2, metavar=("ROWS", "COLS"))
    p.add_argument("--positions", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--detector", type=int, default=None, help="default: the window (no upsampling)")
    p.add_argument("--upsampling", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=("single", "double"), default="single")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    p.add_argument("--updates-per-iteration", type=int, default=DEFAULT_UPDATES_PER_ITERATION,
                   help=f"global mini-batches per iteration (default: {DEFAULT_UPDATES_PER_ITERATION})")
    p.add_argument("--json", action="store_true")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against references measured in the same run)")
    p.add_argument("what", choices=("engine", "ingest", "quality"))
    p.add_argument("cases", type=Path, nargs="*", help="quality: scan files (default: tests/data/abtem/*.h5)")
    p.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--ranks", type=int, default=4, help="quality: ranks of the async run (the other: 1, sync)")
    p.add_argument("--iterations", type=int, default=30, help="quality: iterations, for every code")
    p.add_argument("--peers", default="py4dstem,ptyrad", help="quality: peer codes, comma-separated, or 'none'")
    p.add_argument("--json", action="store_true", help="quality: JSON instead of the table")
    p.add_argument("--ptylive-args", default="", metavar="FLAGS",
                   help="quality: extra flags for both ptylive runs, e.g. --ptylive-args=--correct-positions")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming daemon (ingest, workers, previews) from a TOML config")
    p.add_argument("--config", type=Path, required=True)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve + fake detector streaming a simulated PbTiO3 scan + live previews")
    p.add_argument("--ranks", type=int, default=2, help="worker ranks")
    p.add_argument("--out", type=Path, default=Path("ptylive-demo"), help="folder for config and results")
    p.add_argument("--rate", type=float, default=100.0, help="frames per second from the fake detector")
    p.add_argument("--scan", type=int, nargs=2, default=(24, 24), metavar=("ROWS", "COLS"))
    p.add_argument("--dose", type=float, default=1e6, help="electrons per Å² (Poisson noise)")
    p.add_argument("--final-iterations", type=int, default=20)
    p.add_argument("--http-port", type=int, default=0, help="viewer port (0: any free port)")
    p.add_argument("--keep-running", action="store_true", help="keep serving after the series (Ctrl-C stops)")


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
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    parser.add_argument("--version", action="version", version=f"ptylive {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_simulate, _add_reconstruct, _add_plan, _add_bench, _add_serve, _add_demo, _add_replay,
                _add_service):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ptylive.daemon.cli import commands

    try:
        return commands.run(args, argv)
    except (ValueError, OSError) as exc:  # ScanFileError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
