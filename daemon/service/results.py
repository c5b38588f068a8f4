"""Result files: the one writer behind ``ptylive reconstruct`` and the streamed series' final files.

:func:`write_result` writes every result file (atomically, per-rank statistics under ``ranks/`` with
the names of :data:`RANK_STATS`); :func:`write_final` assembles a streamed series from every worker's
``final`` message and writes it through :func:`write_result`. Layout of a streamed series' file (the
same names as ``ptylive reconstruct`` writes, plus streaming facts)::

    object          (S, H, W) complex   stitched tiles, halos dropped
    probe           (N, N) complex, or (K, N, N): K incoherent probe modes (``probe_modes`` > 1)
    loss            (I,) float64        summed over workers, per iteration (over the frames used so far)
    frames_used     (I,) int64          frames in each iteration, all workers
    positions_px    (n, 2) float64      nominal probe centres of every frame of the scan
    received        (n,) bool           frames that reached a worker
    ranks/<stat>    (R,)                per worker: compute_s, exchange_wait_s, bytes_sent, ...
    virtual/<kind>  (rows, cols) float32  scan-shaped virtual images (bf, adf0…, com_x, com_y, idpc), NaN where no
                                        frame arrived; attrs units, label, inner_mrad, outer_mrad (NaN: none)
    virtual         group attrs         convergence_semiangle_mrad, detector_pixel_mrad, annuli_mrad (J, 2),
                                        frames_filled, kinds (only when workers sent virtual values)
    attrs           series_id, status, iterations, detector_scale, pixel_size_A, n_slices, slice_thickness_A, ...

The file appears atomically: it is written as ``NAME.partial`` and renamed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.geometry import SeriesGeometry
from ptylive.daemon.service.messages import FinalMessage
from ptylive.daemon.service.virtual_mosaic import VirtualSnapshot
from ptylive.streaming.protocol import SeriesStart

logger = logging.getLogger(__name__)

#: Per-rank statistics of every result file (``ranks/<name>``, one value per rank; NaN where a mode does
#: not measure it: streaming workers do not trace peak memory, offline ranks have no consensus).
RANK_STATS = ("compute_s", "exchange_wait_s", "consensus_wait_s", "bytes_sent", "staleness_mean", "staleness_max",
              "iterations_total_s", "frames_bytes", "frames_received", "peak_memory_bytes", "predicted_memory_bytes")


def write_result(path: Path, datasets: Mapping[str, np.ndarray], rank_stats: Sequence[Mapping[str, float]],
                 attrs: Mapping[str, Any], extend: Callable[[h5py.File], None] | None = None) -> None:
    """Write a result file atomically (``NAME.partial``, then renamed to ``path``); a failed write leaves no file.

    Parameters
    ----------
    datasets : name -> array
        Root datasets (``object`` (S, H, W) complex, ``probe``, ``loss``, ``positions_px`` ...).
    rank_stats : one mapping per rank
        Values of :data:`RANK_STATS`; missing names are written as NaN.
    attrs : root attributes
    extend : callable, optional
        ``extend(f)`` adds more to the open file (groups with their own attributes) before it is renamed.
    """
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data)
            ranks = f.create_group("ranks")
            for name in RANK_STATS:
                ranks.create_dataset(name, data=np.array([float(stats.get(name, np.nan)) for stats in rank_stats]))
            f.attrs.update(attrs)
            if extend is not None:
                extend(f)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a left-over .partial took the name and failed the next series too
        raise


#: Longest file-name stem taken from a series id; a longer id keeps its first characters and a hash of the whole.
MAX_STEM_CHARS = 120


def output_stem(series_id: str) -> str:
    """The file-name stem of a series' final file (:func:`output_path`, before any ``-1``, ``-2``…)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", series_id).lstrip(".") or "series"
    if len(stem) > MAX_STEM_CHARS:
        digest = hashlib.sha256(series_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = f"{stem[:MAX_STEM_CHARS - 13]}-{digest}"
    return stem


def output_path(folder: Path, series_id: str) -> Path:
    """``folder/<series id>.h5`` with unsafe characters replaced; ``-1``, ``-2``… if taken.

    The stem is at most :data:`MAX_STEM_CHARS` characters (a 300-character id once failed with
    ENAMETOOLONG and its reconstruction was lost): a longer id keeps its first characters and 12 hex digits
    of its SHA-256, so distinct long ids get distinct names. The file's ``series_id`` attribute is the id.
    """
    stem = output_stem(series_id)
    path = folder / f"{stem}.h5"
    n = 1
    while path.exists() or path.with_name(path.name + ".partial").exists():
        path, n = folder / f"{stem}-{n}.h5", n + 1
    return path


def _status(finals: list[FinalMessage]) -> str:
    statuses = {m.header["status"] for m in finals}
    return statuses.pop() if len(statuses) == 1 else "+".join(sorted(statuses))


def _positions(geometry: SeriesGeometry, finals: list[FinalMessage]) -> dict[str, npt.NDArray[np.float64]]:
    """``positions_px`` (as corrected) and ``positions_nominal_px`` (scan or frame header) of every frame, (n, 2);
    the series' scan where no frame arrived."""
    corrected = np.array(geometry.positions_px, dtype=np.float64)
    nominal = corrected.copy()
    for message in finals:
        index = np.asarray(message.header["received"], dtype=np.int64)
        if len(message.arrays) >= 4 and len(index):
            corrected[index] = message.arrays[2]
            nominal[index] = message.arrays[3]
    return {"positions_px": corrected, "positions_nominal_px": nominal}


def write_virtual(f: h5py.File, snapshot: VirtualSnapshot) -> None:
    """The ``virtual/`` group: one scan-shaped float32 dataset per kind, its ``units``, ``label``, ``inner_mrad``
    and ``outer_mrad`` (NaN where a kind has no ring), and the detector's angles as the group's attributes."""
    group = f.create_group("virtual")
    described = {entry["kind"]: entry for entry in snapshot.describe()}
    for kind, entry in described.items():
        data = group.create_dataset(kind, data=snapshot.images[kind].astype(np.float32))
        data.attrs.update({"units": entry["units"], "label": entry["label"],
                           "inner_mrad": np.nan if entry["inner_mrad"] is None else entry["inner_mrad"],
                           "outer_mrad": np.nan if entry["outer_mrad"] is None else entry["outer_mrad"]})
    group.attrs.update({"frames_filled": snapshot.frames_filled, "kinds": list(described)})
    if snapshot.detector is not None:
        group.attrs.update({"convergence_semiangle_mrad": snapshot.detector.convergence_semiangle_mrad,
                            "detector_pixel_mrad": snapshot.detector.detector_pixel_mrad,
                            "annuli_mrad": np.array(snapshot.detector.annuli_mrad, dtype=np.float64).reshape(-1, 2)})


def write_final(folder: Path, start: SeriesStart, geometry: SeriesGeometry, finals: list[FinalMessage],
                extra_attrs: dict[str, Any], virtual: VirtualSnapshot | None = None) -> Path:
    """Stitch ``finals`` (one per worker, any order) and write the series' HDF5 file; returns its path.

    ``virtual``: the series' virtual images (rank 0's mosaic when the last final came), written as ``virtual/``.
    """
    finals = sorted(finals, key=lambda m: m.header["worker"])
    if [m.header["worker"] for m in finals] != list(range(len(geometry.domains))):
        raise ValueError(f"series {start.series_id!r}: final tiles of workers "
                         f"{[m.header['worker'] for m in finals]}, expected 0..{len(geometry.domains) - 1}")
    n_slices = finals[0].arrays[0].shape[0]
    volume = np.ones((n_slices, *geometry.object_shape), dtype=finals[0].arrays[0].dtype)
    for message in finals:
        row0, row1, col0, col1 = message.header["tile"]
        volume[:, row0:row1, col0:col1] = message.arrays[0]
    received = np.zeros(len(geometry.positions_px), dtype=bool)
    for message in finals:
        received[np.asarray(message.header["received"], dtype=np.int64)] = True
    histories = [np.asarray(m.header["loss_history"], dtype=np.float64) for m in finals]
    n_iterations = min(len(h) for h in histories)
    path = output_path(folder, start.series_id)
    datasets = {
        "object": volume, "probe": finals[0].arrays[1],
        "loss": np.sum([h[:n_iterations] for h in histories], axis=0),
        "frames_used": np.sum([np.asarray(m.header["frames_history"][:n_iterations], dtype=np.int64)
                               for m in finals], axis=0),
        **_positions(geometry, finals), "received": received}
    attrs = {
        "series_id": start.series_id, "status": _status(finals), "iterations": n_iterations,
        "n_workers": len(finals), "mode": "async", "detector_scale": float(finals[0].header["scale"]),
        "pixel_size_A": geometry.pixel_size_A, "n_slices": n_slices,
        "slice_thickness_A": float(finals[0].header["slice_thickness_A"]), "energy_eV": start.energy_eV,
        "convergence_semiangle_mrad": start.convergence_semiangle_mrad, "defocus_A": start.defocus_A,
        "detector_pixel_mrad": start.detector_pixel_mrad, "window_px": geometry.window_px,
        "frames_expected": len(received), "frames_received": int(received.sum()), **extra_attrs}
    if "loss_function" in finals[0].header:
        attrs["loss_function"] = str(finals[0].header["loss_function"])
    for reason in sorted({r for m in finals for r in m.header.get("rejected", {})}):  # dropped on workers
        attrs[f"worker_rejected_{reason}"] = sum(int(m.header.get("rejected", {}).get(reason, 0)) for m in finals)
    write_result(path, datasets, [cast(Mapping[str, float], m.header["stats"]) for m in finals], attrs,
                 extend=None if virtual is None else lambda f: write_virtual(f, virtual))
    logger.info("series %r: wrote %s (%s)", start.series_id, path, attrs["status"])
    return path
