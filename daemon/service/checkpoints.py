"""Crash-only persistence: the workers' tile checkpoints, and the files rank 0 recovers from them at start.

Every ``[service] checkpoint_interval_s`` each worker saves its tile as the ``final`` message it would send
now (:class:`Checkpoint`: the series' start, how many workers ran it, its upsampling, and the
:class:`~ptylive.daemon.service.messages.FinalMessage`: own tile, probe, iterations, loss history, received
frames, corrected and nominal positions), one file per (series, worker), replaced atomically::

    state folder/
        <stem>-<hash>.w0.ckpt.npz     worker 0's latest checkpoint of one series   (write temp, fsync, rename)
        <stem>-<hash>.w1.ckpt.npz
        ...

A series to be resumed from the recording (:mod:`ptylive.daemon.service.resume`) also gets a snapshot of its
checkpoints, ``<stem>-<hash>.w<worker>.resume.npz`` (hard links, made by :meth:`CheckpointFolder.snapshot`): the
workers start from those, all from the same files, while their own checkpoints of the resumed run replace the
``.ckpt.npz`` ones.

Rank 0 removes a series' checkpoints once its final file is written (:meth:`CheckpointFolder.forget`). Any
checkpoint still there when the service starts belongs to a series that ended abnormally (a crash, a
SIGKILL, a worker that died and took the MPI job down): :meth:`CheckpointFolder.recover` turns each such
series into a :class:`~ptylive.daemon.service.final_writer.FinalJob` of status ``recovered``, the tiles of
workers without a checkpoint filled with vacuum (their indices in the file's ``missing_workers``), which
the final writer writes and the collector announces like any other final file.

The format is ``numpy.savez`` (no pickle: loaded with ``allow_pickle=False``): the header as JSON bytes,
the series start in its wire form (``streaming.protocol``, decoded and checked again on reading), and the
four arrays of a ``final`` message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.service.final_writer import FinalJob, FinalOutcome
from ptylive.daemon.service.messages import FinalHeader, FinalMessage
from ptylive.daemon.service.results import output_stem
from ptylive.streaming import protocol
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

SUFFIX = ".ckpt.npz"
RESUME_SUFFIX = ".resume.npz"  # a snapshot of a checkpoint that a resumed series starts from
RECOVERED = "recovered"
ARRAYS = ("tile", "probe", "positions_px", "positions_nominal_px")  # a final message's arrays, in order
STATE_SUBFOLDER = ".ptylive-state"  # in the results folder, when [service] state_folder is unset
#: Rank 0's state-folder operations that can fail (label ``kind`` of ``ptylive_checkpoint_failures_total``).
FOLDER_OPERATIONS = ("remove",)
#: Every ``kind`` of ``ptylive_checkpoint_failures_total``: rank 0's operations, and the workers' ``write``s
#: (counted on each worker, carried in its heartbeats' ``checkpoint_failures``).
FAILURE_KINDS = (*FOLDER_OPERATIONS, "write")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One worker's latest state of one series: what it would send as its ``final`` now.

    Attributes
    ----------
    start : SeriesStart
    n_workers : int
        Workers that ran the series (its geometry depends on it).
    upsampling : int
        The series' upsampling (with its overrides).
    final : FinalMessage
        Arrays: tile volume ``(S, h, w)`` complex (halos dropped), probe ``(N, N)`` or ``(K, N, N)`` complex,
        positions ``(R, 2)`` float64 as corrected and as nominal, for the ``R`` frames of ``received``.
    """

    start: SeriesStart
    n_workers: int
    upsampling: int
    final: FinalMessage

    @property
    def worker(self) -> int:
        return int(self.final.header["worker"])


def state_folder(configured: str, output_folder: Path) -> Path:
    """``[service] state_folder``, or ``<output folder>/.ptylive-state`` when it is ``""``."""
    return Path(configured) if configured else output_folder / STATE_SUBFOLDER


def checkpoint_path(folder: Path, series_id: str, worker: int) -> Path:
    """``folder/<safe stem>-<12 hex of the id's SHA-256>.w<worker>.ckpt.npz``: bounded, distinct per id."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", series_id)[:40]
    digest = hashlib.sha256(series_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return folder / f"{stem}-{digest}.w{worker}{SUFFIX}"


def resume_path(folder: Path, series_id: str, worker: int) -> Path:
    """The snapshot of :func:`checkpoint_path` that a resumed series starts from (``.resume.npz``)."""
    path = checkpoint_path(folder, series_id, worker)
    return path.with_name(path.name.removesuffix(SUFFIX) + RESUME_SUFFIX)


def _plain(value: Any) -> Any:
    """A numpy scalar in a header as the Python number JSON can write."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} in a checkpoint header; expected JSON values")


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the folder.

    A reader finds the previous checkpoint or this one, never a part; a failed write leaves the previous one.
    """
    final = checkpoint.final
    header = {"final": final.header, "n_workers": checkpoint.n_workers, "upsampling": checkpoint.upsampling,
              "written_s": time.time()}
    tile, probe, corrected, nominal = final.arrays  # in the order of ARRAYS
    start = np.frombuffer(protocol.encode_series_start(checkpoint.start)[0], dtype=np.uint8)
    encoded = json.dumps(header, default=_plain).encode()
    partial = path.with_name(path.name + ".tmp")
    try:
        with open(partial, "wb") as stream:
            np.savez(stream, header=np.frombuffer(encoded, dtype=np.uint8), start=start, tile=tile, probe=probe,
                     positions_px=corrected, positions_nominal_px=nominal)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``; ValueError naming the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            header = json.loads(bytes(stored["header"]))
            start = protocol.decode([bytes(stored["start"])])
            arrays = tuple(stored[name] for name in ARRAYS)
    except (OSError, ValueError, KeyError, protocol.ProtocolError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(start, SeriesStart) or not isinstance(header, dict) or "final" not in header:
        raise ValueError(f"checkpoint {path} holds no series start or no final header")
    final = FinalMessage(cast(FinalHeader, header["final"]), arrays)
    return Checkpoint(start, int(header["n_workers"]), int(header["upsampling"]), final)


def _vacuum_final(like: FinalMessage, worker: int, tile: list[int]) -> FinalMessage:
    """A missing worker's tile as vacuum (ones), with the probe and scale of a present one (all hold the same
    probe; the file takes worker 0's)."""
    n_slices = like.arrays[0].shape[0]
    volume = np.ones((n_slices, tile[1] - tile[0], tile[3] - tile[2]), dtype=like.arrays[0].dtype)
    header = {**like.header, "worker": worker, "tile": tile, "iterations": 0, "received": [], "rejected": {},
              "loss_history": [0.0] * len(like.header["loss_history"]),
              "frames_history": [0] * len(like.header["frames_history"]), "stats": {}}
    empty = np.zeros((0, 2), np.float64)
    return FinalMessage(cast(FinalHeader, header), (volume, like.arrays[1], empty, empty))


def recovered_job(checkpoints: list[Checkpoint]) -> FinalJob:
    """The final file of one interrupted series from its workers' checkpoints (at least one).

    Workers without a checkpoint get vacuum tiles; the file's attributes ``missing_workers`` and
    ``recovered_workers`` say which, and ``checkpoint_iterations`` how far each present tile had come.
    """
    first = min(checkpoints, key=lambda c: c.worker)
    geometry = series_geometry(first.start, first.n_workers, first.upsampling)
    present = {c.worker: c.final for c in checkpoints}
    finals = []
    for worker, domain in enumerate(geometry.domains):
        t = domain.tile
        tile = [t.row0, t.row1, t.col0, t.col1]
        message = present[worker] if worker in present else _vacuum_final(first.final, worker, tile)
        header = cast(FinalHeader, {**message.header, "status": RECOVERED})
        finals.append(FinalMessage(header, message.arrays))
    missing = [w for w in range(first.n_workers) if w not in present]
    attrs: dict[str, Any] = {
        "missing_workers": np.asarray(missing, dtype=np.int64),
        "recovered_workers": np.asarray(sorted(present), dtype=np.int64),
        "checkpoint_iterations": np.asarray([present[w].header["iterations"] if w in present else 0
                                             for w in range(first.n_workers)], dtype=np.int64)}
    return FinalJob(first.start, geometry, finals, attrs)


def _final_written_after(output_folder: Path, series_id: str, since_s: float) -> Path | None:
    """A final file of ``series_id`` in ``output_folder`` modified after ``since_s`` (a crash between writing it
    and removing the checkpoints), or None."""
    stem = output_stem(series_id)
    for path in output_folder.glob(f"{stem}*.h5"):  # the stem's characters are none of glob's
        if not re.fullmatch(re.escape(stem) + r"(-\d+)?\.h5", path.name) or path.stat().st_mtime < since_s:
            continue
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("series_id") == series_id:
                    return path
        except OSError:
            continue
    return None


def checkpoint_status(folder_failures: dict[str, int], worker_reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``/status`` ``checkpoints``: failures by kind (``remove`` on rank 0, ``write`` summed over the workers),
    and ``write_failures`` per worker as of its last heartbeat (a worker not heard from yet is absent)."""
    per_worker = {worker: int(report.get("checkpoint_failures", 0))
                  for worker, report in sorted(worker_reports.items())}
    return {"failures": {**folder_failures, "write": sum(per_worker.values())}, "write_failures": per_worker}


class CheckpointFolder:
    """Rank 0's side of the checkpoints: recovery at start, removal once a series' file is written.

    Parameters
    ----------
    folder : Path
        The state folder (created, mode 0700, when missing).
    """

    def __init__(self, folder: Path, on_failure: Callable[[str], None] | None = None) -> None:
        self.folder = folder
        self.on_failure = on_failure
        self.failures: dict[str, int] = dict.fromkeys(FOLDER_OPERATIONS, 0)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _failed(self, operation: str, what: str, exc: OSError) -> None:
        """Count and log a failed operation on the state folder; rank 0 goes on (``on_failure``: a metric)."""
        self.failures[operation] += 1
        logger.error("checkpoints: could not %s (%s; %d such failures so far)", what, exc, self.failures[operation])
        if self.on_failure is not None:
            self.on_failure(operation)

    def recover(self, output_folder: Path, fallback_folder: Path | None = None) -> list[FinalJob]:
        """Jobs writing every interrupted series found here (status ``recovered``), oldest checkpoint first.

        A series whose final file was written after its last checkpoint, in ``output_folder`` or in
        ``fallback_folder`` (the final writer's: a crash after a fallback write and before the checkpoints'
        removal), only has its checkpoints removed; an unreadable checkpoint is renamed ``*.unreadable``
        (logged) so that it is not read again.
        """
        for partial in self.folder.glob(f"*{SUFFIX}.tmp"):  # a write cut short: the checkpoint before it stands
            partial.unlink(missing_ok=True)
        for snapshot in self.folder.glob(f"*{RESUME_SUFFIX}"):  # a resume cut short: made again if it is resumed
            snapshot.unlink(missing_ok=True)
        by_series: dict[str, list[Checkpoint]] = defaultdict(list)
        newest: dict[str, float] = defaultdict(float)
        for path in sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            try:
                checkpoint = read_checkpoint(path)
            except ValueError as exc:
                logger.error("%s; renamed to %s.unreadable", exc, path.name)
                path.replace(path.with_name(path.name + ".unreadable"))
                continue
            by_series[checkpoint.start.series_id].append(checkpoint)
            newest[checkpoint.start.series_id] = max(newest[checkpoint.start.series_id], path.stat().st_mtime)
        jobs = []
        for series_id, checkpoints in by_series.items():
            folders = [output_folder] if fallback_folder is None else [output_folder, fallback_folder]
            written = next(filter(None, (_final_written_after(f, series_id, newest[series_id]) for f in folders)), None)
            if written is not None:
                logger.info("series %r: its final file %s is newer than its checkpoints; removing them", series_id,
                            written)
                self.remove(series_id)
                continue
            try:
                job = recovered_job(checkpoints)
            except ValueError as exc:  # a geometry this version no longer accepts
                logger.error("series %r cannot be recovered from its checkpoints: %s", series_id, exc)
                continue
            missing = list(job.extra_attrs["missing_workers"])
            logger.warning("series %r ended abnormally: writing it from the checkpoints of workers %s%s", series_id,
                           sorted(c.worker for c in checkpoints),
                           f" (workers {missing} had none: vacuum tiles)" if missing else "")
            jobs.append(job)
        return jobs

    def remove(self, series_id: str) -> int:
        """Remove every checkpoint of ``series_id``; how many were removed.

        Never raises: a checkpoint that cannot be removed (read-only or vanished state folder) is counted
        (``failures["remove"]``) and logged, and stays; the next start finds the series' file newer than it
        and removes it then.
        """
        prefix = checkpoint_path(self.folder, series_id, 0).name.removesuffix(f".w0{SUFFIX}")
        removed = 0
        try:  # the prefix's characters are none of glob's
            found = [*self.folder.glob(f"{prefix}.w*{SUFFIX}"), *self.folder.glob(f"{prefix}.w*{RESUME_SUFFIX}")]
        except OSError as exc:
            self._failed("remove", f"list the checkpoints of series {series_id!r} in {self.folder}", exc)
            return 0
        for path in found:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._failed("remove", f"remove checkpoint {path}", exc)
                continue
            removed += 1
        return removed

    def snapshot(self, series_id: str, workers: list[int]) -> None:
        """Snapshot the checkpoints of ``workers`` for a resume (:func:`resume_path`: a hard link, or a copy where
        the file system has none); OSError if one cannot be made (the ones made are removed again)."""
        made = []
        try:
            for worker in workers:
                source, target = checkpoint_path(self.folder, series_id, worker), resume_path(self.folder, series_id,
                                                                                             worker)
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    if not source.exists():
                        raise
                    shutil.copyfile(source, target)
                made.append(target)
        except OSError:
            for target in made:
                target.unlink(missing_ok=True)
            raise

    def forget(self, outcome: FinalOutcome) -> None:
        """After a final file is written (also to the fallback): its series' checkpoints are no longer needed.

        A file that could not be written anywhere keeps them, so the next start writes it again; so does the
        checkpoint version of a series that is then resumed (``keep_checkpoints``: its resumed file removes them).
        """
        if outcome.path is not None and not outcome.job.keep_checkpoints:
            self.remove(outcome.job.start.series_id)
