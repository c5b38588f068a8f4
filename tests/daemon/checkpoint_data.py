"""A small recovered series for the checkpoint and resume tests: its start and a worker's checkpoint of it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.checkpoints import Checkpoint
from ptylive.daemon.service.messages import FinalMessage
from ptylive.streaming.protocol import SeriesStart

START = SeriesStart(series_id="crashed/1", scan_shape=(4, 4), scan_step_A=(1.0, 1.0), detector_shape=(16, 16),
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0, overrides={"final_iterations": 5})
QUALITY = {"frames_used": 8, "frames_expected": 8, "frames_received": 8, "loss": 1.0, "loss_per_frame": 0.1,
           "convergence_rate": None, "wait_fraction": 0.0, "staleness_max": 0}


def checkpoint(geometry: SeriesGeometry, worker: int, value: complex, iterations: int = 3) -> Checkpoint:
    """Worker ``worker``'s checkpoint: its tile filled with ``value``, its probe with ``value`` too."""
    domain = geometry.domains[worker]
    t = domain.tile
    volume = np.full((2, t.row1 - t.row0, t.col1 - t.col0), value, np.complex64)
    received = [int(i) for i in domain.positions]
    positions = geometry.positions_px[received] + 0.25  # "corrected"
    header: Any = {"series_id": START.series_id, "worker": worker, "status": "complete", "iterations": iterations,
                   "tile": [t.row0, t.row1, t.col0, t.col1], "loss_history": [float(worker + 1)] * iterations,
                   "frames_history": [len(received)] * iterations, "scale": np.float64(2.5),
                   "slice_thickness_A": 1.5, "rejected": {}, "received": received,
                   "stats": {"compute_s": 1.0, "bytes_sent": np.int64(7)}, **QUALITY}
    arrays = (volume, np.full((16, 16), value, np.complex64), positions, geometry.positions_px[received])
    return Checkpoint(START, 2, 1, FinalMessage(header, arrays))
