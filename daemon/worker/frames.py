"""The frames one worker holds for one series: preallocated, filled as they arrive, turned into loss targets.

Every frame of the worker's probe group has a row, reserved at series start, so memory is known
before the first frame (the daemon refuses series that would not fit). A frame's row holds its raw
intensities until the next iteration turns them into the loss's target with the current detector
scale ``α``; when the (global, running) estimate of ``α`` moves, rows already converted are rescaled
in place (``√(1/α)`` for the amplitude loss, ``1/α`` for Poisson), so the raw frames never exist twice.

A frame of a cropped, binned or masked detector is made into its ``(D, D)`` frame here, as it arrives
(:attr:`SeriesGeometry.detector <ptylive.daemon.engine.geometry.SeriesGeometry>`,
:mod:`ptylive.streaming.detector_frames`): masked pixels hold 0 in the raw rows, so they add nothing to the
intensity sum (the model's sum leaves them out too: :func:`ptylive.daemon.worker.refine.probe_power`), and become
:data:`~ptylive.gpu.loss.MASKED_TARGET` in the targets, which every loss leaves out.

A frame with a header position is placed by :func:`~ptylive.streaming.ownership.owner_for`, the rule the
ingest routed it by, so a frame the ingest counted as received is a frame this store keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.worker.virtual import VirtualFrames
from ptylive.gpu.backend import get_array_module
from ptylive.gpu.loss import measured_target
from ptylive.streaming.compression import CompressionError
from ptylive.streaming.detector_frames import DetectorPreprocessing
from ptylive.streaming.ownership import NotPlaceable, owner_for
from ptylive.streaming.protocol import Frame

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class FrameStore:
    """Frames of one worker's probe group.

    Attributes
    ----------
    global_index : (P,) int64
        Frame index of each row (the probe group, ascending).
    targets : (P, D, D) real
        Raw intensities of new rows; loss targets once converted.
    received, converted : (P,) bool
    positions_px : (P, 2) float64
        Each row's nominal position (object pixels): the series' scan, replaced by the frame header's
        position where a frame carries one. Position correction starts from these and writes them as
        ``positions_nominal_px``.
    starts : (P, 2) int64, shifts : (P, 2) real
        The window of ``positions_px``: start relative to the extended tile, sub-pixel shift. The tile's
        own windows (:class:`~ptylive.daemon.engine.tile.TileState`) are copies, taken when a row is first
        iterated (:func:`ptylive.daemon.worker.refine.take_new_windows`).
    intensity_sum : float
        Sum of the raw intensities of every received frame (for the global ``α``), masked pixels left out.
    detector : DetectorPreprocessing or None
        Crop, flatfield, mask and bin of each raw frame; None: frames are stored as they come.
    mask : (D, D) bool or None
        Masked detector pixels (on the targets' device); None: none.
    rejected : dict
        Frames this worker could not use, by reason (``"not_in_group"``, ``"position_outside_tile"``; for
        compressed frames, decoded here rather than by the ingest, ``"corrupt_payload"`` and ``"non_finite"``).
    virtual : VirtualFrames or None
        Given each stored frame's intensities (:mod:`ptylive.daemon.worker.virtual`: BF, ADF, CoM for rank 0).
    """

    geometry: SeriesGeometry
    worker: int
    loss: str
    global_index: np.ndarray
    targets: Any
    positions_px: np.ndarray
    starts: np.ndarray
    shifts: np.ndarray
    received: np.ndarray
    converted: np.ndarray
    scale: float = float("nan")
    intensity_sum: float = 0.0
    detector: DetectorPreprocessing | None = None
    mask: Any = None
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("not_in_group", "position_outside_tile", "corrupt_payload", "non_finite"), 0))
    _row_of: dict[int, int] = field(default_factory=dict)
    virtual: VirtualFrames | None = None  # each frame's virtual detector values (set by the worker at series start)
    # loss = "auto" (daemon.engine.loss_choice): (D, D) bool numpy mask beyond the bright-field disk, and the
    # received frames' counts there (set by the worker at series start; None: the loss is given)
    dark_field: np.ndarray | None = None
    dark_field_sum: float = 0.0

    @classmethod
    def allocate(cls, geometry: SeriesGeometry, worker: int, loss: str, xp: Any, real_dtype: Any) -> FrameStore:
        domain = geometry.domains[worker]
        index = np.asarray(domain.positions, dtype=np.int64)
        d = geometry.detector_px
        positions = np.array(geometry.positions_px[index], dtype=np.float64)
        starts, shifts = domain.extended.windows(positions, geometry.window_px)
        store = cls(geometry, worker, loss, index, xp.zeros((len(index), d, d), real_dtype), positions, starts,
                    shifts.astype(real_dtype), np.zeros(len(index), bool), np.zeros(len(index), bool))
        store._row_of = {int(g): r for r, g in enumerate(index)}
        if not geometry.detector.identity:  # crop, bin, flatfield or mask: applied to each frame as it arrives
            store.detector = geometry.detector
            if geometry.detector.output_mask is not None:
                store.mask = xp.asarray(geometry.detector.output_mask)
        return store

    @property
    def n_received(self) -> int:
        return int(self.received.sum())

    def add(self, frame: Frame) -> bool:
        """Store a frame (a header position replaces the nominal one); False if it cannot be used here."""
        row = self._row_of.get(frame.frame_index)
        if row is None:
            self.rejected["not_in_group"] += 1
            logger.error("worker %d got frame %d of series %r outside its probe group", self.worker,
                         frame.frame_index, self.geometry.series_id)
            return False
        if self.received[row]:  # the ingest drops duplicates; a second copy would double-count the sum
            return False
        try:
            pixels = frame.pixels  # a compressed frame is decoded here, on the worker
        except CompressionError as exc:
            self.rejected["corrupt_payload"] += 1
            logger.error("worker %d: frame %d of series %r does not decode: %s", self.worker, frame.frame_index,
                         self.geometry.series_id, exc)
            return False
        if frame.encoding != "raw" and pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            self.rejected["non_finite"] += 1  # the ingest checks raw frames only
            return False
        if frame.position_A is not None and not self._place(row, frame.frame_index, frame.position_A):
            return False
        if self.detector is not None:  # raw (H, W) -> (D, D) on the host: cropped, flatfielded, masked 0, binned
            pixels = self.detector.apply(pixels, self.targets.dtype)
        xp = get_array_module(self.targets)
        self.targets[row] = xp.asarray(pixels, dtype=self.targets.dtype)
        self.intensity_sum += float(np.sum(pixels, dtype=np.float64))
        if self.dark_field is not None:  # loss = "auto" chooses from how strongly the specimen scatters
            self.dark_field_sum += float(np.sum(pixels[self.dark_field], dtype=np.float64))
        self.received[row] = True
        self.converted[row] = False
        if self.virtual is not None:  # on the intensities the row now holds, before they become a loss target
            self.virtual.add(row, self.targets[row])
        return True

    def _place(self, row: int, frame_index: int, position_A: tuple[float, float]) -> bool:
        """Move row ``row``'s window to the header position, by the ingest's rule; False if it cannot go there."""
        domain = self.geometry.domains[self.worker]
        try:
            placement = owner_for(self.geometry.owners, frame_index, position_A)
        except NotPlaceable as exc:  # the ingest rejects these before they count: a bug if it happens
            self.rejected["position_outside_tile"] += 1
            logger.error("worker %d dropped a frame: %s", self.worker, exc)
            return False
        if placement.worker != self.worker:  # the same rule routed it: a bug if it happens
            self.rejected["not_in_group"] += 1
            logger.error("worker %d got frame %d of series %r, which belongs to worker %d", self.worker, frame_index,
                         self.geometry.series_id, placement.worker)
            return False
        self.starts[row] = np.subtract(placement.start_px, (domain.extended.row0, domain.extended.col0))
        self.shifts[row] = placement.shift_px
        self.positions_px[row] = np.add(placement.start_px, placement.shift_px) + self.geometry.window_px // 2
        return True

    def set_scale(self, scale: float) -> None:
        """Use detector scale ``scale``: rescale converted rows, convert new ones."""
        if not scale > 0:
            raise ValueError(f"detector scale must be positive, got {scale!r}")
        done = np.flatnonzero(self.converted)
        if done.size and scale != self.scale:
            ratio = self.scale / scale
            factor = np.sqrt(ratio) if self.loss == "amplitude" else ratio
            self.targets[done] *= self.targets.dtype.type(factor)
        new = np.flatnonzero(self.received & ~self.converted)
        if new.size:
            block = self.targets[new] / self.targets.dtype.type(scale)
            self.targets[new] = measured_target(self.loss, block, self.mask)
            self.converted[new] = True
        self.scale = scale

    def memory_bytes(self) -> int:
        return int(self.targets.nbytes + self.positions_px.nbytes + self.starts.nbytes + self.shifts.nbytes)
