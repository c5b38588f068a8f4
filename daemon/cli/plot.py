"""``ptylive plot``: a result file's convergence and per-rank timings in one figure (matplotlib, ``[plot]`` extra).

Left: the loss per iteration (log scale) and, for a streamed series, the frames used in each iteration on a
second axis (the loss of a growing scan rises with its frames before it falls). Right: per rank, compute time
and time spent waiting on the halo exchange (seconds, stacked). The figure is drawn without pyplot (no global
state, no display): :class:`matplotlib.figure.Figure` renders through Agg.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ptylive.daemon.service.result_file import read_convergence, read_summary

logger = logging.getLogger(__name__)


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, MaxNLocator), or a ValueError naming the extra to install."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ValueError("ptylive plot needs matplotlib: pip install 'ptylive[plot]'") from None
    return Figure, MaxNLocator


def _timings(per_rank: list[dict[str, float | None]], name: str) -> np.ndarray:
    return np.array([row.get(name) if row.get(name) is not None else 0.0 for row in per_rank], dtype=np.float64)


def plot(result: Path, out: Path, dpi: int = 120) -> Path:
    """Draw ``result``'s convergence and per-rank timings into ``out`` (format from its suffix, PNG by default)."""
    figure_class, MaxNLocator = _matplotlib()  # noqa: N806 (a class)
    summary = read_summary(result)
    convergence = read_convergence(result)
    figure = figure_class(figsize=(10, 4), layout="constrained")
    loss_axes, ranks_axes = figure.subplots(1, 2, width_ratios=(3, 2))
    loss = convergence["loss"]
    assert loss is not None
    iterations = np.arange(1, len(loss) + 1)
    loss_axes.plot(iterations, loss, marker="o", markersize=3, color="C0", label="loss")
    if len(loss) and np.all(loss[np.isfinite(loss)] > 0):
        loss_axes.set_yscale("log")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_xlabel("iteration")
    loss_axes.set_ylabel(f"loss ({summary['loss_function'] or 'summed over frames'})", color="C0")
    frames = convergence["frames_used"]
    if frames is not None:
        frames_axes = loss_axes.twinx()
        frames_axes.step(iterations, frames, where="mid", color="C1", label="frames used")
        frames_axes.set_ylabel("frames used", color="C1")
    name = summary["series_id"] or Path(str(summary["source"] or result)).name
    loss_axes.set_title(f"{name}: {summary['status']}, {summary['mode']}")
    per_rank = summary["per_rank"]
    ranks = np.arange(len(per_rank))
    compute, wait = _timings(per_rank, "compute_s"), _timings(per_rank, "exchange_wait_s")
    ranks_axes.bar(ranks, compute, color="C2", label="compute")
    ranks_axes.bar(ranks, wait, bottom=compute, color="C3", label="exchange wait")
    ranks_axes.set_xticks(ranks)
    ranks_axes.set_xlim(-0.5 - 0.5 * (len(ranks) < 3), len(ranks) - 0.5 + 0.5 * (len(ranks) < 3))
    ranks_axes.set_xlabel("worker" if summary["kind"] == "streamed" else "rank")
    ranks_axes.set_ylabel("time (s)")
    ranks_axes.set_title("per-rank timings")
    ranks_axes.legend()
    figure.savefig(out, dpi=dpi)
    logger.info("plotted %s to %s", result, out)
    return out
