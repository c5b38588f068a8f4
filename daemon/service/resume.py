"""Resuming a recovered series from the last run's recording (rank 0's side; issue 12, §1).

After an abnormal end the next start writes each interrupted series from its workers' checkpoints
(:meth:`~ptylive.daemon.service.checkpoints.CheckpointFolder.recover`, status ``recovered``). With
``[service] resume_from_recording`` and ``[ingest] record_to`` set, rank 0 then also refines such a series on:

1. :func:`plan_resumes` checks, per recovered series, that the recording the last run kept
   (:attr:`~ptylive.streaming.recording.Recorder.previous`) holds the very start the checkpoints hold, every
   frame the checkpoints had received, and that this run would split it the same way (workers, grid, slices);
   otherwise the checkpoint version is all that is written, and the log says why.
2. The checkpoint version is written first, as without a resume (a second crash loses nothing), but keeps
   its checkpoints (:attr:`~ptylive.daemon.service.final_writer.FinalJob.keep_checkpoints`), and each is
   snapshotted (:meth:`~ptylive.daemon.service.checkpoints.CheckpointFolder.snapshot`) for the workers.
3. :func:`resume_feed` re-streams the series' recorded messages (start, frames, an end; a ``series_end`` is
   added where none was recorded) through the ingest before any new series (:meth:`Ingest.preload
   <ptylive.streaming.ingest.Ingest.preload>`): admission, routing, the byte bound and the workers' frame stores
   stay the one path, and the new recording holds the series again.
4. The workers start from the snapshots (:mod:`ptylive.daemon.worker.resume`) and run ``resume_iterations``
   more once every frame is back; the series ends ``recovered``, in a second file (``<stem>-1.h5``) whose
   ``resumed_from_iteration`` says where it took over. Its checkpoints and snapshots are removed then.

Only ptylive stream v1 recordings are read back (:mod:`ptylive.daemon.service.recorded_series`); with a
DECTRIS format the checkpoint version is written and the log says the resume is not available.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.service.config import DaemonConfig, apply_overrides
from ptylive.daemon.service.final_writer import FinalJob
from ptylive.daemon.service.recorded_series import scan_recording, series_messages
from ptylive.streaming.protocol import encode_series_end
from ptylive.streaming.recording import RecordingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePlan:
    """One recovered series to refine on from ``recording``.

    Attributes
    ----------
    series_id : str
    recording : Path
        The last run's recording (kept under a new name at this start).
    starts_seen : int
        Which recorded start of the series the checkpoints belong to (its last).
    ended : bool
        Whether the recording holds its end (if not, :func:`resume_feed` adds one).
    from_iteration : int
        The fewest iterations any checkpoint had: where every worker takes over.
    frames : int
        Frames recorded after that start.
    """

    series_id: str
    recording: Path
    starts_seen: int
    ended: bool
    from_iteration: int
    frames: int

    def result_attrs(self) -> dict[str, Any]:
        """The resumed file's attributes (beyond ``status = recovered``)."""
        return {"resumed_from_iteration": self.from_iteration, "resumed_from_recording": self.recording.name}


def _same_split(recovered: SeriesGeometry, current: SeriesGeometry) -> bool:
    """Whether two geometries of a series place every worker's tile alike (a checkpoint fits this run)."""
    return (recovered.pixel_size_A == current.pixel_size_A and recovered.window_px == current.window_px
            and recovered.object_shape == current.object_shape and len(recovered.domains) == len(current.domains)
            and all(a.tile == b.tile for a, b in zip(recovered.domains, current.domains, strict=True)))


def _why_not(job: FinalJob, config: DaemonConfig) -> str | None:
    """Why this run cannot take ``job``'s tiles over from its checkpoints, or None."""
    try:
        reconstruction = apply_overrides(config.reconstruction, job.start.overrides)
        current = series_geometry(job.start, config.workers.ranks, reconstruction.upsampling)
    except ValueError as exc:
        return f"this run would not accept it ({exc})"
    if not _same_split(job.geometry, current):
        return (f"this run splits it differently ({config.workers.ranks} workers, upsampling "
                f"{reconstruction.upsampling})")
    slices = {final.arrays[0].shape[0] for final in job.finals}
    if slices != {reconstruction.n_slices}:
        return f"its checkpoints hold {sorted(slices)} slices, this run reconstructs {reconstruction.n_slices}"
    return None


def plan_resumes(jobs: list[FinalJob], recording: Path | None, config: DaemonConfig) -> dict[str, ResumePlan]:
    """Which recovered series (``jobs``, from :meth:`CheckpointFolder.recover`) to refine on, by series id.

    ``recording`` is the last run's, as this start kept it (None: there was none). Every series not resumed is
    logged with the reason, at INFO where resuming is off and at WARNING where it was asked for but cannot be.
    """
    if not jobs:
        return {}
    if not config.service.resume_from_recording or not config.ingest.record_to:
        logger.info("recovered series %s are not refined further ([service] resume_from_recording needs "
                    "[ingest] record_to)", [job.start.series_id for job in jobs])
        return {}
    if config.ingest.format != "ptylive":
        logger.warning("recovered series %s are not refined further: resuming reads ptylive stream v1 recordings "
                       "only, this daemon records %s", [job.start.series_id for job in jobs], config.ingest.format)
        return {}
    if recording is None:
        logger.warning("recovered series %s are not refined further: the last run left no recording at %s",
                       [job.start.series_id for job in jobs], config.ingest.record_to)
        return {}
    found = scan_recording(recording, [job.start.series_id for job in jobs])
    plans = {}
    for job in jobs:
        series_id, recorded = job.start.series_id, found[job.start.series_id]
        received = {int(i) for final in job.finals for i in final.header["received"]}
        iterations = [int(final.header["iterations"]) for final in job.finals if final.header["received"]]
        reason = _why_not(job, config)
        if reason is None and recorded.start != job.start:
            reason = ("the recording holds no start of it" if recorded.start is None
                      else "its last recorded start is not the one its checkpoints hold")
        if reason is None and not received <= recorded.frame_set:
            reason = (f"{len(received - recorded.frame_set)} of the {len(received)} frames its checkpoints had are "
                      f"not in the recording")
        if reason is None and not iterations:
            reason = "no checkpoint had any frame"
        if reason is not None:
            where = f"; the recording broke: {recorded.error}" if recorded.error else ""
            logger.warning("series %r is written from its checkpoints only, not refined further: %s (%s%s)",
                           series_id, reason, recording, where)
            continue
        plans[series_id] = plan = ResumePlan(series_id, recording, recorded.starts_seen, recorded.ended,
                                             min(iterations), len(recorded.frame_set))
        logger.warning("series %r: refining on from iteration %d with the %d frames of %s%s", series_id,
                       plan.from_iteration, plan.frames, recording,
                       "" if plan.ended else " (its end was not recorded: it is ended after the last frame)")
    return plans


def resume_feed(plans: list[ResumePlan]) -> Iterator[list[bytes]]:
    """Every planned series' recorded messages, one series after the other, each closed by a ``series_end``
    (the recorded one, or one counting the frames re-streamed where none was recorded).

    Reading errors (a recording changed or damaged since it was scanned) end that series' messages early
    (logged); the series then ends with the frames it got.
    """
    for plan in plans:
        sent, ended = 0, False
        try:
            for header, parts in series_messages(plan.recording, plan.series_id, plan.starts_seen):
                sent += header.get("htype") == "frame"
                ended = header.get("htype") == "series_end"
                yield parts
        except (OSError, RecordingError) as exc:
            logger.error("series %r: reading %s broke after %d frames (%s); ending it there", plan.series_id,
                         plan.recording, sent, exc)
        logger.info("series %r: %d recorded frames re-streamed", plan.series_id, sent)
        if not ended:
            yield encode_series_end(plan.series_id, sent)
