"""Result tools: ``ptylive inspect``, ``ptylive export`` and ``ptylive plot`` (their options and what they do).

Each reads a result file of ``ptylive reconstruct`` or ``ptylive serve`` through
:mod:`ptylive.daemon.service.result_file`; a path that is not one is a user error (one ``error:`` line,
exit status 2, from :func:`ptylive.daemon.cli.main.main`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TIMING_COLUMNS = (("compute_s", "compute s", "{:.3f}"), ("exchange_wait_s", "exchange wait s", "{:.3f}"),
                  ("frames_received", "frames", "{:.0f}"), ("peak_memory_bytes", "peak memory", None),
                  ("predicted_memory_bytes", "predicted", None))
#: The sub-commands of this module; each has a handler of the same name.
COMMANDS = ("inspect", "export", "plot")

#: Attributes of a series recovered from checkpoints (:mod:`ptylive.daemon.service.checkpoints`), shown as they are.
RECOVERY_ATTRS = ("missing_workers", "recovered_workers", "checkpoint_iterations", "resumed_from_iteration",
                  "resumed_from_recording")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect``, ``export`` and ``plot``."""
    from ptylive.daemon.cli.export import FORMATS, WHAT

    p = sub.add_parser("inspect", help="summarise a result file: status, frames, iterations, loss, timings")
    p.add_argument("result", type=Path, help="result file (HDF5) of ptylive reconstruct or ptylive serve")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text (NaN as null)")
    p = sub.add_parser("export", help="write a result's phase, slices, amplitude or probe as TIFF, PNG or .npy")
    p.add_argument("result", type=Path, help="result file (HDF5)")
    p.add_argument("--what", choices=WHAT, default="phase",
                   help="phase: projected phase (H, W), rad; slices: each slice's phase (S, H, W), rad; "
                        "amplitude: each slice's |O| (S, H, W); probe: amplitude and phase (rad) of each mode "
                        "(2K, N, N); default: phase")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="tiff: OME-TIFF with pixel size in Å (needs ptylive[export]); png: 16-bit, one file per "
                        "plane; npy: the float32 array; default: from the suffix of -o")
    p.add_argument("-o", "--out", type=Path, required=True, help="file to write (PNG stacks: OUT_000.png ...)")
    p = sub.add_parser("plot", help="plot a result's loss per iteration and per-rank timings (needs ptylive[plot])")
    p.add_argument("result", type=Path, help="result file (HDF5)")
    p.add_argument("-o", "--out", type=Path, required=True, help="image to write (PNG; format from the suffix)")
    p.add_argument("--dpi", type=int, default=120, help="resolution of the image, dots per inch (default: 120)")


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value: float | None, form: str | None) -> str:
    if form is None:
        return _bytes(value)
    return "-" if value is None else form.format(value)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _rank_lines(per_rank: list[dict[str, float | None]], label: str) -> list[str]:
    columns = [c for c in TIMING_COLUMNS if any(row.get(c[0]) is not None for row in per_rank)]
    header = [label, *(title for _, title, _ in columns)]
    rows = [[str(i), *(_cell(row.get(name), form) for name, _, form in columns)] for i, row in enumerate(per_rank)]
    widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=True)) for r in (header, *rows)]


def format_summary(summary: dict[str, Any]) -> str:
    """The text of ``ptylive inspect``: one fact a line, then the per-rank table."""
    s = summary
    offline = s["kind"] == "offline"
    loss = "-" if s["loss_first"] is None else f"{s['loss_first']:.4e} -> {s['loss_last']:.4e}"
    shape = s["object_shape_px"]
    pixel, thickness = s["pixel_size_A"], s["slice_thickness_A"]
    size = f" at {pixel:.4f} Å/px ({shape[1] * pixel:.1f} × {shape[2] * pixel:.1f} Å)" if pixel else ""
    coverage = s["coverage"]
    unit = "rank" if offline else "worker"
    lines = [
        f"result       {s['path']}",
        f"status       {s['status']}" + (" (offline: written once the run completed)" if offline else ""),
        f"source       {s['source'] or '-'}",
        f"series id    {s['series_id'] or '-'}",
        f"mode         {s['mode'] or '-'}, {s['ranks']} {unit}{'s' if s['ranks'] != 1 else ''}",
        f"frames       {s['frames_received']} of {s['frames_expected']} received",
        f"iterations   {s['iterations']}",
        f"loss         {loss}" + (f" ({s['loss_function']})" if s["loss_function"] else ""),
        f"slices       {s['n_slices']} × " + (f"{thickness:.6g} Å" if thickness is not None else "-"),
        f"object       {shape[1]} × {shape[2]} px{size}",
        "pixel size   " + (f"{pixel:.6g} Å" if pixel else "-"),
        f"probe        {s['probe_shape_px'][0]} × {s['probe_shape_px'][1]} px, {s['probe_modes']} mode(s)",
        f"coverage     frames {_fraction(coverage['frames'])}, scanned area {_fraction(coverage['scanned_area'])}"
        " of the object",
    ]
    if s["virtual_kinds"]:
        lines.append(f"virtual      {', '.join(s['virtual_kinds'])} (group virtual/)")
    lines += [f"{name:<12} {value}" for name, value in s["attributes"].items() if name in RECOVERY_ATTRS
              or name.startswith("worker_rejected_")]
    if s["per_rank"]:
        lines += ["timings", *(f"  {line}" for line in _rank_lines(s["per_rank"], unit))]
    return "\n".join(lines)


def inspect(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.service.result_file import read_summary

    summary = read_summary(args.result)
    print(json.dumps(summary, allow_nan=False) if args.json else format_summary(summary))
    return 0


def export(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.cli.export import export as run_export

    for path in run_export(args.result, args.what, args.out, args.format):
        print(f"wrote {path}")
    return 0


def plot(args: argparse.Namespace, argv: list[str]) -> int:
    from ptylive.daemon.cli.plot import plot as run_plot

    if args.dpi < 10:
        raise ValueError(f"--dpi must be >= 10, got {args.dpi}")
    print(f"wrote {run_plot(args.result, args.out, args.dpi)}")
    return 0
