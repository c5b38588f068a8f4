"""Quality measures of a reconstruction against a known truth."""

from __future__ import annotations

import numpy as np

from ptylive.gpu.backend import to_numpy


def projected_phase(volume: np.ndarray) -> np.ndarray:
    """Sum over slices of the phase of each slice's transmission: (S, H, W) → (H, W)."""
    return np.angle(to_numpy(volume)).sum(axis=0)


def scanned_region(positions_px: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Bounding box of the probe centres (where every pixel is well illuminated)."""
    lo = np.clip(np.ceil(positions_px.min(axis=0)).astype(int), 0, None)
    hi = np.minimum(np.floor(positions_px.max(axis=0)).astype(int) + 1, shape)
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def phase_correlation(estimate: np.ndarray, truth: np.ndarray, positions_px: np.ndarray) -> float:
    """Pearson correlation of the projected phases over the scanned region.

    Parameters
    ----------
    estimate, truth : (S, H, W) complex
        Transmissions (slice counts may differ; phases are summed).
    positions_px : (P, 2)
    """
    region = scanned_region(positions_px, truth.shape[-2:])
    a = projected_phase(estimate)[region].ravel()
    b = projected_phase(truth)[region].ravel()
    return float(np.corrcoef(a, b)[0, 1])
