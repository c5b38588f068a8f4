"""A worker's start from the checkpoints of a recovered series (the worker's side of
:mod:`ptylive.daemon.service.resume`).

Rank 0 snapshots a recovered series' checkpoints (``*.resume.npz``,
:func:`~ptylive.daemon.service.checkpoints.resume_path`) before it re-streams the series; a worker that finds a
snapshot of the series it starts takes over from them: its extended tile assembled from every snapshot whose
tile overlaps it (its own and its neighbours' own tiles; vacuum where a worker had none), the probe of the
lowest-numbered snapshot (every worker refines the same probe), each frame's corrected position, and the
iteration count, loss and frame histories, cut to the fewest iterations any snapshot had so that every worker
goes on from the same iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.checkpoints import Checkpoint, read_checkpoint, resume_path
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """Where a worker takes a recovered series over.

    Attributes
    ----------
    volume : (S, h, w) complex
        The worker's extended tile.
    probe : (N, N) or (K, N, N) complex
    iterations : int
        The fewest iterations any snapshot had.
    loss_history : list of float
    frames_history : list of int
        This worker's, cut to ``iterations`` entries.
    positions_px : (P, 2) float64
        Per row of the worker's frame store, the corrected position its checkpoint held (NaN: none).
    """

    volume: npt.NDArray[np.complexfloating]
    probe: npt.NDArray[np.complexfloating]
    iterations: int
    loss_history: list[float]
    frames_history: list[int]
    positions_px: npt.NDArray[np.float64]


def _inconsistency(checkpoint: Checkpoint, geometry: SeriesGeometry, worker: int) -> str | None:
    """Why a snapshot that reads cannot be taken over (a damaged or foreign file), or None."""
    final, tile = checkpoint.final, geometry.domains[worker].tile
    volume, probe, corrected = final.arrays[0], final.arrays[1], final.arrays[2]
    if volume.ndim != 3 or volume.shape[1:] != tile.shape:
        return f"its tile is {volume.shape}, worker {worker}'s is {tile.shape}"
    if len(final.header["received"]) != len(corrected) or corrected.shape[1:] != (2,):
        return f"{len(final.header['received'])} frames received but {corrected.shape} positions"
    if probe.shape[-1] != geometry.window_px or probe.ndim not in (2, 3):
        return f"its probe is {probe.shape}, the window {geometry.window_px} px"
    if len(final.header["loss_history"]) < int(final.header["iterations"]):
        return "its loss history is shorter than its iterations"
    return None


def _snapshots(folder: Path, start: SeriesStart, geometry: SeriesGeometry) -> dict[int, Checkpoint]:
    """Every usable snapshot of the series whose start is ``start``: a stale one of another start, one that does not
    read and one that does not fit its worker's tile are skipped (logged), never raised into the worker."""
    found = {}
    for worker in range(len(geometry.domains)):
        path = resume_path(folder, start.series_id, worker)
        if not path.exists():
            continue
        try:
            checkpoint = read_checkpoint(path)
        except ValueError as exc:
            logger.error("resume snapshot skipped: %s", exc)
            continue
        if checkpoint.start != start or checkpoint.n_workers != len(geometry.domains):
            continue
        reason = _inconsistency(checkpoint, geometry, worker)
        if reason is not None:
            logger.error("resume snapshot %s skipped: %s", path, reason)
            continue
        found[worker] = checkpoint
    return found


def load_resume(folder: Path | None, start: SeriesStart, geometry: SeriesGeometry, worker: int,
                global_index: npt.NDArray[np.int64]) -> ResumePoint | None:
    """The state ``worker`` takes the series over from, or None when no snapshot of it is there.

    Parameters
    ----------
    global_index : (P,) int64
        The frame index of each row of the worker's frame store.
    """
    if folder is None:
        return None
    snapshots = _snapshots(folder, start, geometry)
    if not snapshots:
        return None
    domain = geometry.domains[worker]
    extended = domain.extended
    first = snapshots[min(snapshots)].final
    n_slices = first.arrays[0].shape[0]
    volume = np.ones((n_slices, *extended.shape), dtype=first.arrays[0].dtype)
    for other, checkpoint in snapshots.items():
        tile = geometry.domains[other].tile
        overlap = tile.intersect(extended)
        if overlap is None:
            continue
        into_rows, into_cols = overlap.relative_to(extended)
        from_rows, from_cols = overlap.relative_to(tile)
        volume[:, into_rows, into_cols] = checkpoint.final.arrays[0][:, from_rows, from_cols]
    iterations = min(int(c.final.header["iterations"]) for c in snapshots.values())
    positions = np.full((len(global_index), 2), np.nan)
    own = snapshots.get(worker)
    loss_history: list[float] = []
    frames_history: list[int] = []
    if own is not None:
        row_of = {int(g): r for r, g in enumerate(global_index)}
        for index, corrected in zip(own.final.header["received"], own.final.arrays[2], strict=True):
            row = row_of.get(int(index))
            if row is not None:
                positions[row] = corrected
        loss_history = [float(x) for x in own.final.header["loss_history"][:iterations]]
        frames_history = [int(x) for x in own.final.header["frames_history"][:iterations]]
    else:  # no checkpoint of its own (vacuum tile): its histories start empty at the shared iteration
        loss_history, frames_history = [0.0] * iterations, [0] * iterations
    logger.info("worker %d takes series %r over at iteration %d from the snapshots of workers %s", worker,
                start.series_id, iterations, sorted(snapshots))
    return ResumePoint(volume, np.asarray(first.arrays[1]), iterations, loss_history, frames_history, positions)
