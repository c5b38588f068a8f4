"""``ptylive bench quality``: reconstruction quality on independent data, beside py4DSTEM and PtyRAD.

For every case file (default: ``tests/data/abtem/*.h5``; any scan file with a truth works, a
``ptylive simulate`` file included):

1. ptylive, as a user runs it: ``ptylive reconstruct CASE --iterations K`` as a subprocess at the
   default settings (no per-case tuning; the probe from the file's optics unless the file carries
   one), once on 1 rank in sync mode and once on R ranks in async mode (``ptylive_args``, e.g.
   ``["--correct-positions"]``, are appended to both commands and named in the rows' ``run``);
2. each peer (``tools/quality_peers.py``) on the same file, with the same slices (count and
   thickness as ptylive used) and the same K, in its own venv; it keeps iterating past K until
   ptylive's 1-rank reconstruction time T is spent, so it reports both "at K iterations" and "at
   equal time" (its last iteration that ended within T);
3. every result scored by the one scorer, ``tests/abtem_cases.py``: projected-phase correlation with
   the truth after sub-pixel registration, per-slice (depth group) correlation, rms position error
   before and after (where the file holds true positions).

Time per iteration is the iterations' own time (ptylive: the slowest rank's ``iterations_total_s``;
peers: their iteration calls), without start-up, file reading or imports; ``wall_s`` is the whole
command. Losses are each code's own metric and do not compare across codes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptylive.tools.quality_cases import (
    default_case_files,
    file_has_probe,
    has_true_positions,
    load_case,
    score_phases,
    score_result_file,
)
from ptylive.tools.quality_peers import PEERS, PeerRequest, PeerUnavailable, ensure_installed, run_peer

logger = logging.getLogger(__name__)

RUN_TIMEOUT_S = 7200.0
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_ptylive(scan: Path, ranks: int, mode: str, iterations: int, out: Path,
                extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """``ptylive reconstruct`` as a subprocess; the result file's timings, loss and settings.

    ``extra_args`` are appended to the command line (flags of ``ptylive reconstruct``).

    Raises
    ------
    RuntimeError
        When the command fails or hangs (with its last lines of stderr).
    """
    command = [sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct", str(scan), "--ranks", str(ranks),
               "--mode", mode, "--iterations", str(iterations), "--quiet", "--out", str(out), *extra_args]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ptylive reconstruct exited {proc.returncode}: " + " ".join(proc.stderr.split())[-400:])
    with h5py.File(out, "r") as f:
        loop_s = float(np.max(f["ranks"]["iterations_total_s"][()]))
        loss = np.asarray(f["loss"][()], np.float64)
        attrs = {k: f.attrs[k] for k in ("n_slices", "slice_thickness_A")}
    return {"wall_s": wall_s, "loop_s": loop_s, "seconds_per_iteration": loop_s / iterations,
            "final_loss": float(loss[-1]) if len(loss) else float("nan"), "iterations_run": int(len(loss)),
            "n_slices": int(attrs["n_slices"]), "slice_thickness_A": float(attrs["slice_thickness_A"]),
            "warnings": [line for line in proc.stderr.splitlines() if "Warning" in line][:3]}


def _ptylive_rows(case: Any, ranks: int, iterations: int, work: Path, probe: str,
                  extra_args: Sequence[str] = ()) -> list[dict[str, Any]]:
    rows = []
    for run_ranks, mode in ((1, "sync"), (ranks, "async")):
        run = " ".join([f"{run_ranks} rank{'s' if run_ranks > 1 else ''} {mode}", *extra_args])
        row: dict[str, Any] = {"code": "ptylive", "run": run, "ptylive_args": list(extra_args),
                               "iterations": iterations, "probe": probe, "loss_metric": "ptylive loss",
                               "source": _source_revision()}
        out = work / f"{case.name}-ptylive-{run_ranks}-{mode}.h5"
        try:
            row.update(run_ptylive(case.path, run_ranks, mode, iterations, out, extra_args))
            scores = score_result_file(out, case)
            row.update({k: scores[k] for k in ("correlation", "shift_px", "per_slice", "finite",
                                               "position_rms_before_A", "position_rms_after_A")})
            row["finite"] = bool(row["finite"] and np.isfinite(row["final_loss"]))
        except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError) as error:
            row["error"] = str(error)
        rows.append(row)
    return rows


def _peer_rows(name: str, case: Any, request: PeerRequest, work: Path) -> list[dict[str, Any]]:
    peer = PEERS[name]
    base: dict[str, Any] = {"code": peer.label}
    try:
        ensure_installed(peer)
        got = run_peer(peer, request, work / f"{case.name}-{name}")
    except PeerUnavailable as error:
        return [dict(base, run=f"{request.iterations} iterations", error=str(error))]
    summary = got["summary"]
    base.update(probe=summary["probe"], loss_metric=summary["loss_metric"], settings=summary["settings"],
                version=summary["version"])
    losses = summary["losses"]
    at_k = dict(base, run=f"{request.iterations} iterations", iterations=request.iterations,
                loop_s=summary["seconds_at_iterations"], warm_up_s=summary.get("warm_up_s", 0.0),
                adapter_wall_s=got["wall_s"],
                seconds_per_iteration=summary["seconds_at_iterations"] / request.iterations,
                final_loss=losses[request.iterations - 1])
    at_k.update(score_phases(got["phase_iterations"], request.slice_thickness_A, case, got["positions_iterations"]))
    n_t = int(summary["iterations_at_time"])
    at_t = dict(base, run=f"equal time ({request.budget_s:.1f} s)", iterations=n_t, loop_s=summary["seconds_at_time"],
                seconds_per_iteration=summary["seconds_at_time"] / n_t if n_t else float("nan"),
                final_loss=losses[n_t - 1] if n_t else float("nan"))
    if got["phase_time"] is None:
        first_s = summary.get("iteration_seconds", [float("nan")])[0]
        at_t["note"] = f"no iteration ended within {request.budget_s:.1f} s (the first took {first_s:.1f} s)"
    else:
        at_t.update(score_phases(got["phase_time"], request.slice_thickness_A, case, got["positions_time"]))
    return [at_k, at_t]


def bench_case(path: Path, ranks: int, iterations: int, peers: Sequence[str], work: Path,
               ptylive_args: Sequence[str] = ()) -> dict[str, Any]:
    """Every run on one case file: ptylive 1 rank sync and R ranks async, then each peer.

    ``ptylive_args`` go to both ptylive runs; the peers' time budget is the 1-rank run's time with them.
    """
    path = path.resolve()  # the peers run in another working directory
    case = load_case(path)
    probe_in_file = file_has_probe(path)
    probe = "the file's probe" if probe_in_file else "built from the file's optics attributes"
    result: dict[str, Any] = {"case": case.name, "file": str(path), "object_shape": list(case.object_shape),
                              "n_positions": len(case.positions_px), "true_positions": has_true_positions(case),
                              "probe_in_file": probe_in_file, "rows": []}
    result["rows"] += _ptylive_rows(case, ranks, iterations, work, f"ptylive: {probe}", ptylive_args)
    reference = result["rows"][0]
    if "error" in reference:
        result["peers_skipped"] = "the 1-rank ptylive run failed, so there is no slice setting or time budget"
        return result
    probe_file = None
    if probe_in_file:
        probe_file = work / f"{case.name}-probe.npy"
        with h5py.File(path, "r") as f:
            np.save(probe_file, np.asarray(f["probe"][()]))
    request = PeerRequest(path, iterations, reference["loop_s"], reference["n_slices"],
                          reference["slice_thickness_A"], case.object_shape, probe_file)
    for name in peers:
        result["rows"] += _peer_rows(name, case, request, work)
    return result


def _source_revision() -> str:
    """``git describe --always --dirty`` of the checkout ptylive runs from ('dirty': uncommitted changes ran)."""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=30, cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """Cores, CPU model, load and versions of what ran (ptylive's with its source revision)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cores": CORES, "cpu": model, "load_average": os.getloadavg()[0], "python": platform.python_version(),
            "ptylive": f"{version('ptylive')} ({_source_revision()})", "numpy": np.__version__,
            "platform": platform.platform()}


def _number(value: Any, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one line per case and run."""
    lines = ["| case | code | run | it | corr | per-slice corr (entrance → exit) | pos rms before → after Å | "
             "s/it | wall s | final loss (own metric) |", "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for case in report["cases"]:
        for row in case["rows"]:
            head = f"| {case['case']} | {row['code']} | {row['run']} |"
            if "error" in row:
                lines.append(f"{head} | **failed** | {row['error'][:300]} | | | | |")
                continue
            if "note" in row:
                lines.append(f"{head} {row.get('iterations', '')} | — | {row['note']} | | | | |")
                continue
            slices = " ".join(_number(x, ".2f") for x in row.get("per_slice", []))
            positions = (f"{_number(row.get('position_rms_before_A'), '.3f')} → "
                         f"{_number(row.get('position_rms_after_A'), '.3f')}") if case["true_positions"] else "—"
            finite = "" if row.get("finite", True) else " **NaN/inf**"
            lines.append(f"{head} {row.get('iterations', '')} | {_number(row.get('correlation'), '.3f')}{finite} | "
                         f"{slices} | {positions} | {_number(row.get('seconds_per_iteration'), '.3f')} | "
                         f"{_number(row.get('wall_s'), '.1f')} | {_number(row.get('final_loss'), '.4g')} |")
    return "\n".join(lines)


def main(cases: Sequence[Path] | None = None, ranks: int = 4, iterations: int = 30,
         peers: str | Sequence[str] = "py4dstem,ptyrad", as_json: bool = False,
         ptylive_args: str | Sequence[str] = ()) -> int:
    """Run the quality benchmark and print a markdown table (or JSON).

    Parameters
    ----------
    cases : sequence of Path, optional
        Scan files with a truth; default every ``tests/data/abtem/*.h5`` of the checkout.
    ranks : int
        Ranks of the async ptylive run (the other run is 1 rank, sync).
    iterations : int
        K, for every code.
    peers : str or sequence of str
        Peer names (``py4dstem``, ``ptyrad``), comma-separated or a sequence; ``"none"`` or empty: none.
    as_json : bool
        Print one JSON object instead of the table.
    ptylive_args : str or sequence of str
        Extra flags for both ``ptylive reconstruct`` runs (a string is split on whitespace), e.g.
        ``"--correct-positions"``; no per-case tuning otherwise. They are recorded in each row's ``run``.

    Returns
    -------
    int
        0, or 1 when there is no case file or any ptylive run failed.
    """
    names = [p for p in (peers.split(",") if isinstance(peers, str) else peers) if p and p != "none"]
    extra = ptylive_args.split() if isinstance(ptylive_args, str) else list(ptylive_args)
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; expected some of {sorted(PEERS)} or 'none'")
    files = [Path(p) for p in cases] if cases else default_case_files()
    if not files:
        print("error: no case files (tests/data/abtem/*.h5 is empty; pass scan files)", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"machine": machine(), "iterations": iterations, "ranks": ranks, "peers": names,
                              "ptylive_args": extra, "cases": []}
    with tempfile.TemporaryDirectory(prefix="ptylive-bench-quality-") as tmp:
        for path in files:
            logger.warning("case %s", path)
            report["cases"].append(bench_case(path, ranks, iterations, names, Path(tmp), extra))
            logger.warning("case %s done:\n%s", path.name, format_table({"cases": report["cases"][-1:]}))
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    peer_versions = {row["code"]: row["version"] for case in report["cases"] for row in case["rows"]
                     if "version" in row}
    report["machine"].update(peer_versions)
    if as_json:
        print(json.dumps(report, indent=1, default=float))
    else:
        m = report["machine"]
        print(f"# ptylive bench quality: {iterations} iterations; ptylive 1 rank sync and {ranks} ranks async; "
              f"{m['cores']} cores ({m['cpu']}), load {m['load_average']:.2f} → {m['load_average_end']:.2f}; "
              + ", ".join(f"{k} {v}" for k, v in m.items() if k in ("python", "ptylive", "numpy", *peer_versions)))
        print()
        print(format_table(report))
    failed = any("error" in row for case in report["cases"] for row in case["rows"] if row["code"] == "ptylive")
    return 1 if failed else 0


def _command_line(argv: Sequence[str] | None = None) -> int:
    """``python -m ptylive.tools.bench_quality``: ``ptylive bench quality``'s options plus ``--ptylive-args``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ptylive.tools.bench_quality", description=__doc__.splitlines()[0])
    p.add_argument("cases", type=Path, nargs="*", help="scan files (default: tests/data/abtem/*.h5)")
    p.add_argument("--ranks", type=int, default=4, help="ranks of the async run (the other: 1, sync)")
    p.add_argument("--iterations", type=int, default=30, help="iterations, for every code")
    p.add_argument("--peers", default="py4dstem,ptyrad", help="peer codes, comma-separated, or 'none'")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.add_argument("--ptylive-args", default="", metavar="FLAGS",
                   help="extra flags for both ptylive reconstruct runs, one string (write it with '=': "
                        "--ptylive-args=--correct-positions)")
    args = p.parse_args(argv)
    return main(args.cases or None, args.ranks, args.iterations, args.peers, args.json, args.ptylive_args)


if __name__ == "__main__":
    sys.exit(_command_line())
