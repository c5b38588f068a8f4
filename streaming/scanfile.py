"""The scan file (HDF5) for simulation, replay and offline reconstruction.

Layout (documented in ``docs/scanfile.md``)::

    /                      attrs: energy_eV, convergence_semiangle_mrad, defocus_A,
                                  pixel_size_A, detector_pixel_mrad,
                                  optional slice_thickness_A, n_slices
    /intensities           [n, rows, cols] any real dtype, zero frequency at the centre
    /positions_px          [n, 2] (row, col) probe centres in object pixels
    /probe                 optional, complex [N, N], real space, centred
    /object_truth          optional, complex [S, H, W] transmission (simulations)

The object's extent is not stored: it is the smallest box holding every
window (see :func:`object_shape_for`), unless ``object_truth`` fixes it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)

REQUIRED_ATTRS = ("energy_eV", "convergence_semiangle_mrad", "defocus_A", "pixel_size_A", "detector_pixel_mrad")


class ScanFileError(ValueError):
    """A scan file that cannot be reconstructed; the message names the problem."""


@dataclass(frozen=True)
class ScanMetadata:
    """Everything about a scan except the frames."""

    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float
    pixel_size_A: float
    detector_pixel_mrad: float
    n_positions: int
    detector_px: int
    slice_thickness_A: float | None = None
    n_slices: int | None = None
    object_shape: tuple[int, int] | None = None


def object_shape_for(positions_px: np.ndarray, window_px: int) -> tuple[int, int]:
    """Smallest object (from pixel 0) holding every ``window_px`` window."""
    ends = np.floor(positions_px).astype(np.int64) - window_px // 2 + window_px
    return int(ends[:, 0].max()), int(ends[:, 1].max())


def _attr(f: h5py.File, name: str, path: Path) -> float:
    if name not in f.attrs:
        raise ScanFileError(f"{path}: missing root attribute {name!r}")
    value = f.attrs[name]
    try:
        value = float(np.asarray(value).item())
    except (TypeError, ValueError):
        raise ScanFileError(f"{path}: attribute {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ScanFileError(f"{path}: attribute {name!r} is not finite ({value})")
    return value


def read_metadata(path: str | Path) -> ScanMetadata:
    """Read and validate everything but the frames' values.

    Raises
    ------
    ScanFileError
        Missing or non-numeric attributes, missing datasets, wrong dtypes or
        mismatched shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ScanFileError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        attrs = {name: _attr(f, name, path) for name in REQUIRED_ATTRS}
        for name in ("energy_eV", "convergence_semiangle_mrad", "pixel_size_A", "detector_pixel_mrad"):
            if attrs[name] <= 0:
                raise ScanFileError(f"{path}: attribute {name!r} must be positive, got {attrs[name]}")
        for name in ("intensities", "positions_px"):
            if name not in f:
                raise ScanFileError(f"{path}: missing dataset {name!r}")
        intensities, positions = f["intensities"], f["positions_px"]
        if intensities.ndim != 3 or intensities.shape[1] != intensities.shape[2]:
            raise ScanFileError(f"{path}: 'intensities' must be [n, D, D], got shape {intensities.shape}")
        if intensities.dtype.kind not in "fiu":
            raise ScanFileError(f"{path}: 'intensities' must be real numbers, got dtype {intensities.dtype}")
        if positions.shape != (intensities.shape[0], 2) or positions.dtype.kind not in "fiu":
            raise ScanFileError(
                f"{path}: 'positions_px' must be real [{intensities.shape[0]}, 2] to match "
                f"'intensities', got {positions.dtype} {positions.shape}")
        if intensities.shape[0] == 0:
            raise ScanFileError(f"{path}: the scan has no frames")
        slice_thickness = _attr(f, "slice_thickness_A", path) if "slice_thickness_A" in f.attrs else None
        n_slices = int(_attr(f, "n_slices", path)) if "n_slices" in f.attrs else None
        object_shape = tuple(f["object_truth"].shape[-2:]) if "object_truth" in f else None
        if "probe" in f and (f["probe"].ndim != 2 or f["probe"].shape[0] != f["probe"].shape[1]):
            raise ScanFileError(f"{path}: 'probe' must be square [N, N], got {f['probe'].shape}")
        return ScanMetadata(n_positions=intensities.shape[0], detector_px=intensities.shape[1],
                            slice_thickness_A=slice_thickness, n_slices=n_slices,
                            object_shape=object_shape, **attrs)  # type: ignore[arg-type]


def read_positions(path: str | Path) -> np.ndarray:
    """``positions_px`` (n, 2) float64; raises ScanFileError on NaN/inf."""
    with h5py.File(path, "r") as f:
        positions = np.asarray(f["positions_px"][...], dtype=np.float64)
    if not np.isfinite(positions).all():
        bad = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        raise ScanFileError(f"{path}: positions_px[{bad}] is not finite: {positions[bad]}")
    return positions


def read_frames(path: str | Path, indices: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Intensities of the frames ``indices`` (ascending), as ``dtype`` (k, D, D).

    Raises ScanFileError when a frame holds NaN or infinity.
    """
    with h5py.File(path, "r") as f:
        frames = np.asarray(f["intensities"][np.asarray(indices, dtype=np.int64)], dtype=dtype)
    finite = np.isfinite(frames).all(axis=(1, 2))
    if not finite.all():
        bad = int(indices[np.flatnonzero(~finite)[0]])
        raise ScanFileError(f"{path}: intensities[{bad}] holds NaN or infinity")
    return frames


def read_optional(path: str | Path, name: str) -> np.ndarray | None:
    """A whole optional dataset (``probe``, ``object_truth``) or None."""
    with h5py.File(path, "r") as f:
        return np.asarray(f[name][...]) if name in f else None


def write_scan(path: str | Path, metadata: dict[str, float], intensities: np.ndarray,
               positions_px: np.ndarray, probe: np.ndarray | None = None,
               object_truth: np.ndarray | None = None) -> None:
    """Write a scan file (see the module docstring for the layout)."""
    missing = [name for name in REQUIRED_ATTRS if name not in metadata]
    if missing:
        raise ValueError(f"scan metadata lacks {missing}")
    with h5py.File(path, "w") as f:
        for key, value in metadata.items():
            f.attrs[key] = value
        f.create_dataset("intensities", data=intensities, chunks=(1, *intensities.shape[1:]))
        f.create_dataset("positions_px", data=np.asarray(positions_px, dtype=np.float64))
        if probe is not None:
            f.create_dataset("probe", data=probe)
        if object_truth is not None:
            f.create_dataset("object_truth", data=object_truth)
