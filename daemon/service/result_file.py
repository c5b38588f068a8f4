"""Reading result files: the other side of :mod:`ptylive.daemon.service.results`.

``ptylive reconstruct`` and ``ptylive serve`` write the same names (:func:`~ptylive.daemon.service.results.
write_result`); a streamed series adds ``frames_used``, ``received`` and the series' attributes. This module
opens such a file, says clearly when a path is not one (:class:`ResultFileError`), and summarises it
(:func:`read_summary`) for ``ptylive inspect``, ``ptylive plot`` and anything that lists results.

Coverage has two parts: ``frames`` is the fraction of the scan's frames that reached a worker (1 offline),
``scanned_area`` the fraction of the object inside the bounding box of the received probe centres, where
every pixel is well illuminated (:func:`ptylive.gpu.quality.scanned_region`, the region the quality scores
use); the rest of the object is halo, lit only by the probe's edges.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptylive.daemon.service.results import RANK_STATS
from ptylive.gpu.quality import scanned_region

logger = logging.getLogger(__name__)

#: Datasets every result file holds (``ranks`` is a group of :data:`RANK_STATS`).
REQUIRED = ("object", "probe", "loss", "ranks")


class ResultFileError(ValueError):
    """A path that is no readable ptylive result file; the message names the path and what was expected."""


@contextmanager
def open_result(path: Path) -> Iterator[h5py.File]:
    """Open ``path`` read-only after checking that it is a ptylive result file.

    Raises
    ------
    ResultFileError
        The file is missing, is not HDF5, or lacks one of :data:`REQUIRED`.
    """
    if not path.exists():
        raise ResultFileError(f"{path}: no such file (expected a ptylive result, HDF5)")
    if not path.is_file():
        raise ResultFileError(f"{path} is not a file (expected a ptylive result, HDF5)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ResultFileError(f"{path} is not an HDF5 file (expected a ptylive result): {exc}") from None
    with f:
        missing = [name for name in REQUIRED if name not in f]
        if missing:
            hint = " (it looks like a scan file: reconstruct it with ptylive reconstruct)" if "intensities" in f else ""
            raise ResultFileError(f"{path} is not a ptylive result: no {', '.join(map(repr, missing))} "
                                  f"(found {sorted(f)}){hint}")
        if f["object"].ndim != 3:
            raise ResultFileError(f"{path}: 'object' has shape {f['object'].shape}; expected (slices, rows, cols)")
        yield f


def plain(value: Any) -> Any:
    """An HDF5 attribute value as JSON-ready Python: numbers, strings, lists; NaN and inf as None."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rank_table(f: h5py.File) -> list[dict[str, float | None]]:
    """One mapping per rank of :data:`RANK_STATS` (seconds, bytes, counts); None where a mode did not measure it."""
    ranks = f["ranks"]
    names = [name for name in RANK_STATS if name in ranks]
    n = max((len(ranks[name]) for name in names), default=0)
    return [{name: plain(float(ranks[name][i])) for name in names} for i in range(n)]


def _coverage(f: h5py.File, frames_received: int, frames_expected: int) -> dict[str, float | None]:
    frames = frames_received / frames_expected if frames_expected else None
    if "positions_px" not in f:
        return {"frames": frames, "scanned_area": None}
    positions = f["positions_px"][...]
    if "received" in f:
        positions = positions[f["received"][...].astype(bool)]
    shape = f["object"].shape[1:]
    if not len(positions):
        return {"frames": frames, "scanned_area": 0.0}
    rows, cols = scanned_region(positions, shape)
    area = max(rows.stop - rows.start, 0) * max(cols.stop - cols.start, 0)
    return {"frames": frames, "scanned_area": area / (shape[0] * shape[1])}


def _frames(f: h5py.File, attrs: dict[str, Any]) -> tuple[int, int]:
    """(received, expected): the series' attributes, else every position of the scan (offline)."""
    n_positions = len(f["positions_px"]) if "positions_px" in f else 0
    return (int(attrs.get("frames_received", n_positions)), int(attrs.get("frames_expected", n_positions)))


def read_summary(path: Path) -> dict[str, Any]:
    """What a result file says about its run, as plain Python (``ptylive inspect --json`` prints it).

    Returns
    -------
    dict
        ``path``, ``kind`` (``offline`` or ``streamed``), ``status`` (an offline file is written only when its
        run completed: ``complete``), ``source``, ``series_id``, ``mode``, ``ranks``, ``frames_received``,
        ``frames_expected``, ``iterations``, ``loss_function``, ``loss_first``, ``loss_last``, ``n_slices``,
        ``slice_thickness_A``, ``pixel_size_A``, ``object_shape_px`` [S, H, W], ``probe_shape_px``,
        ``probe_modes``, ``coverage`` {``frames``, ``scanned_area``} (fractions), ``per_rank`` (list of
        :func:`rank_table` rows), ``virtual_kinds`` (the ``virtual/`` group's images, sorted; empty without one)
        and ``attributes`` (every root attribute).
    """
    with open_result(path) as f:
        attrs = {name: plain(value) for name, value in f.attrs.items()}
        streamed = "series_id" in attrs
        loss = f["loss"][...]
        probe_shape = list(f["probe"].shape)
        received, expected = _frames(f, attrs)
        return {
            "path": str(path), "kind": "streamed" if streamed else "offline",
            "status": attrs.get("status", "complete"), "source": attrs.get("source"),
            "series_id": attrs.get("series_id"), "mode": attrs.get("mode"),
            "ranks": attrs.get("n_workers" if streamed else "n_ranks", len(rank_table(f))),
            "frames_received": received, "frames_expected": expected,
            "iterations": attrs.get("iterations", len(loss)), "loss_function": attrs.get("loss_function"),
            "loss_first": plain(float(loss[0])) if len(loss) else None,
            "loss_last": plain(float(loss[-1])) if len(loss) else None,
            "n_slices": f["object"].shape[0], "slice_thickness_A": attrs.get("slice_thickness_A"),
            "pixel_size_A": attrs.get("pixel_size_A"), "object_shape_px": list(f["object"].shape),
            "probe_shape_px": probe_shape[-2:], "probe_modes": probe_shape[0] if len(probe_shape) == 3 else 1,
            "coverage": _coverage(f, received, expected), "per_rank": rank_table(f),
            "virtual_kinds": sorted(f["virtual"]) if isinstance(f.get("virtual"), h5py.Group) else [],
            "attributes": attrs,
        }


def read_convergence(path: Path) -> dict[str, np.ndarray | None]:
    """``loss`` (I,) float64 per iteration and ``frames_used`` (I,) int64 (None offline: every frame, always)."""
    with open_result(path) as f:
        return {"loss": f["loss"][...].astype(np.float64),
                "frames_used": f["frames_used"][...].astype(np.int64) if "frames_used" in f else None}
