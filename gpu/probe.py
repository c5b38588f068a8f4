"""Probe synthesis and sub-pixel probe shifts.

``P(k) = A(k) · exp(−i χ(k))`` with ``χ(k) = (2π/λ)(½ C10 (λk)² + ¼ C30 (λk)⁴)``,
``C10 = −defocus_A`` (abTEM convention: positive defocus is underfocus) and a
round aperture ``λ|k| ≤ α`` whose rim pixels carry the root of their area inside (a detector pixel
integrates intensity). The real-space probe is centred at pixel
``(N//2, N//2)`` and normalised to ``Σ|P|² = 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numba
import numpy as np

from ptylive.gpu.backend import empty_aligned, get_array_module
from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.physics import wavelength_A

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeOptics:
    """Probe-forming optics.

    Attributes
    ----------
    energy_eV : float
        Beam energy.
    convergence_semiangle_mrad : float
        Aperture semi-angle α.
    defocus_A : float
        ``−C10``; positive is underfocus.
    c30_A : float
        Spherical aberration C30 (= Cs) in Å.
    """

    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float = 0.0
    c30_A: float = 0.0

    def __post_init__(self) -> None:
        if not self.convergence_semiangle_mrad > 0:
            raise ValueError(
                f"convergence_semiangle_mrad must be positive, got {self.convergence_semiangle_mrad!r}"
            )
        wavelength_A(self.energy_eV)  # validates the energy


def make_probe(
    optics: ProbeOptics, window_px: int, pixel_size_A: float, xp: ModuleType = np,
    dtype: Any = np.complex64, aperture_supersampling: int = 16,
) -> Any:
    """Synthesise the real-space probe.

    ``aperture_supersampling`` sub-pixels per axis measure the aperture rim (:func:`aperture_amplitude`);
    1 is the hard, point-sampled aperture.

    Returns
    -------
    probe : (window_px, window_px) complex
        Centred at ``(N//2, N//2)``, ``Σ|P|² = 1``.
    """
    if window_px < 2 or not pixel_size_A > 0:
        raise ValueError(f"need window_px >= 2 and pixel_size_A > 0, got {window_px}, {pixel_size_A}")
    lam = wavelength_A(optics.energy_eV)
    k = np.fft.fftfreq(window_px, d=pixel_size_A)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    alpha = optics.convergence_semiangle_mrad * 1e-3
    if alpha / lam < 1.5 * abs(k[1]):
        raise ValueError(
            f"aperture of {optics.convergence_semiangle_mrad} mrad spans less than 1.5 Fourier "
            f"pixels at pixel_size_A={pixel_size_A} and window_px={window_px}; enlarge the window"
        )
    c10 = -optics.defocus_A
    chi = (2 * math.pi / lam) * (0.5 * c10 * lam**2 * k2 + 0.25 * optics.c30_A * lam**4 * k2**2)
    aperture = aperture_amplitude(k, alpha / lam, aperture_supersampling)
    spectrum = aperture * np.exp(-1j * chi)
    probe = np.fft.fftshift(np.fft.ifft2(spectrum))
    probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
    return xp.asarray(probe.astype(dtype))


APERTURE_SUPERSAMPLING = 16


def aperture_amplitude(k: np.ndarray, k_max: float, supersampling: int = APERTURE_SUPERSAMPLING) -> np.ndarray:
    """Amplitude of a round aperture of radius ``k_max`` on the Fourier pixels of frequencies ``k``.

    A detector pixel integrates the intensity over its area, so a pixel that the aperture edge
    cuts receives the fraction of its area inside the aperture; the amplitude is that fraction's
    square root (measured on ``supersampling``² sub-pixels; 1 inside, 0 outside).

    Parameters
    ----------
    k : (N,) float
        Frequencies of the grid (``numpy.fft.fftfreq`` order), 1/Å.
    k_max : float
        Aperture radius α/λ in 1/Å.

    Returns
    -------
    (N, N) float64
    """
    dk = abs(k[1] - k[0])
    sub = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    fine = (k[:, None] + dk * sub[None, :]).ravel()  # (N·s,) sub-pixel centres per axis
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2 <= k_max**2)
    n = len(k)
    fraction = inside.reshape(n, supersampling, n, supersampling).mean(axis=(1, 3))
    return np.sqrt(fraction)


def shift_ramps(xp: ModuleType, n: int, shifts_px: Any, dtype: Any) -> tuple[Any, Any]:
    """Per-axis Fourier phase ramps for shifts ``(B, 2)`` in pixels.

    Returns
    -------
    row_ramp, col_ramp : (B, n) complex
        ``exp(−2πi k d)`` along rows and columns; their outer product is the
        2-D ramp.
    """
    k = xp.asarray(np.fft.fftfreq(n), dtype=np.float64)
    shifts = xp.asarray(shifts_px, dtype=np.float64)
    row = xp.exp(-2j * np.pi * shifts[:, 0:1] * k[None, :]).astype(dtype)
    col = xp.exp(-2j * np.pi * shifts[:, 1:2] * k[None, :]).astype(dtype)
    return row, col


def fourier_shift(wave: Any, shifts_px: Any) -> Any:
    """Shift ``wave`` by sub-pixel amounts with a Fourier phase ramp.

    Parameters
    ----------
    wave : (N, N) or (B, N, N) complex
        One wave (broadcast to every shift) or one per shift.
    shifts_px : (B, 2) float
        ``(row, col)`` shifts in pixels; positive moves content to larger indices.

    Returns
    -------
    (B, N, N) complex
        New, SIMD-aligned array. The adjoint is ``fourier_shift(·, −shifts_px)``. Where every shift is
        exactly zero the shift is the identity: ``wave`` is copied (broadcast), no FFT is done.
    """
    xp = get_array_module(wave)
    n = wave.shape[-1]
    b = len(shifts_px)
    out = empty_aligned(xp, (b, wave.shape[-2], n), wave.dtype)
    if not get_array_module(shifts_px).any(shifts_px):  # -0.0 counts as zero too (the adjoint's shifts)
        out[...] = wave
        return out
    row, col = shift_ramps(xp, n, shifts_px, wave.dtype)
    row *= row.real.dtype.type(1.0 / (n * wave.shape[-2]))  # both FFTs' scale on the small ramp
    if wave.ndim == 2:  # one probe for every position: transformed once
        spectrum = empty_aligned(xp, wave.shape, wave.dtype)
        spectrum[...] = wave
        spectrum = fft2(spectrum, normalise=False)[None]
    else:  # one wave per shift: transformed in place in ``out``
        out[...] = wave
        spectrum = fft2(out, normalise=False)
    if xp is np:
        _ramped(spectrum, row, col, out)
    else:
        xp.multiply(spectrum, row[:, :, None], out=out)
        out *= col[:, None, :]
    return ifft2(out, normalise=False)


@numba.njit(cache=True, nogil=True)
def _ramped(spectrum: np.ndarray, row: np.ndarray, col: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[b] = spectrum[b or 0] · row[b, :, None] · col[b, None, :]`` in one pass; ``spectrum`` may be ``out``."""
    batch, n, m = out.shape
    one = spectrum.shape[0] == 1
    for b in range(batch):
        source = spectrum[0] if one else spectrum[b]
        for i in range(n):
            r = row[b, i]
            for j in range(m):
                out[b, i, j] = (source[i, j] * r) * col[b, j]
