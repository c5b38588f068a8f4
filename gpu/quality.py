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
    """Pearson correlation of the projected phases over the scanned region, phases modulo 2π.

    Each estimated pixel takes the multiple of 2π nearest the truth's prediction
    (:func:`modulo_two_pi_towards`): the transmissions are compared, not one branch of their angle.

    Parameters
    ----------
    estimate, truth : (S, H, W) complex
        Transmissions (slice counts may differ; phases are summed).
    positions_px : (P, 2)
    """
    region = scanned_region(positions_px, truth.shape[-2:])
    a = projected_phase(estimate)[region].ravel()
    b = projected_phase(truth)[region].ravel()
    return float(np.corrcoef(modulo_two_pi_towards(a, b), b)[0, 1])


def modulo_two_pi_towards(estimate: np.ndarray, truth: np.ndarray, passes: int = 2) -> np.ndarray:
    """``estimate`` with each pixel moved by the multiple of 2π that brings it nearest the truth's linear fit.

    A transmission fixes each slice's phase only modulo 2π, so two reconstructions that agree as ``exp(iφ)``
    can differ in ``Σ_s angle(O_s)`` by 2π at a pixel: one heavy column whose phase passed π in one slice
    took the correlation of a PbTiO3 reconstruction that matched its truth to 0.9999 (as ``exp(iφ)``) from
    0.999 down to 0.77. The fit ``estimate ≈ c₁ truth + c₀`` (least squares, refitted after each pass)
    allows the arbitrary offset and scale that the correlation ignores anyway.
    """
    a = np.asarray(estimate, dtype=np.float64).copy()
    b = np.asarray(truth, dtype=np.float64)
    for _ in range(passes):
        slope, offset = np.polyfit(b, a, 1)
        a += 2 * np.pi * np.rint((slope * b + offset - a) / (2 * np.pi))
    return a
