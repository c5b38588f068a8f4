"""Fused single-pass elementwise steps of the multislice gradient.

On the CPU each step is one numba loop instead of several numpy passes with
temporaries (measured: numpy's multi-pass ``|ψ|²`` and amplitude projection
run 3-6x below a fused pass). Other array modules (CuPy) run the equivalent
array expressions, so results agree to rounding.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ptylive.gpu.backend import get_array_module
from ptylive.gpu.loss import AMPLITUDE_DELTA_PER_PIXEL


@numba.njit(cache=True, nogil=True)
def _transmit(wave: np.ndarray, patch: np.ndarray, stored: np.ndarray) -> None:  # pragma: no cover
    w, p, st = wave.reshape(-1), patch.reshape(-1), stored.reshape(-1)
    for i in range(w.size):
        st[i] = w[i]
        w[i] = w[i] * p[i]


def transmit(wave: Any, patch: Any, stored: Any) -> None:
    """``stored ← ψ`` and ``ψ ← ψ · O`` in one pass; all (B, N, N), C-contiguous."""
    if get_array_module(wave) is np:
        _transmit(wave, patch, stored)
        return
    stored[...] = wave
    wave *= patch


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _detector_amplitude(spectrum: np.ndarray, target: np.ndarray, scale: float,
                        delta2: float) -> float:  # pragma: no cover
    batch, detector, _ = target.shape
    n = spectrum.shape[-1]
    half = detector // 2
    # FFT-order index ranges of the detector's two halves along each axis (see propagation._blocks):
    # detector [0, half) <- FFT [n - half, n); detector [half, D) <- FFT [0, D - half).
    starts_det = (0, half)
    starts_fft = (n - half, 0)
    lengths = (half, detector - half)
    total = 0.0
    for b in range(batch):
        for rb in range(2):
            for i in range(lengths[rb]):
                r, ti = starts_fft[rb] + i, starts_det[rb] + i
                for cb in range(2):
                    c0, tj0 = starts_fft[cb], starts_det[cb]
                    row, target_row = spectrum[b, r, c0:c0 + lengths[cb]], target[b, ti, tj0:tj0 + lengths[cb]]
                    for j in range(lengths[cb]):  # real arithmetic in the spectrum's precision (no double literal)
                        if target_row[j] < 0:  # a masked pixel: no loss, no gradient
                            row[j] = 0
                            continue
                        re, im = row[j].real * scale, row[j].imag * scale
                        amplitude = np.sqrt(re * re + im * im + delta2)
                        residual = amplitude - target_row[j]
                        total += residual * residual
                        factor = (residual + residual) / amplitude * scale
                        row[j] = complex(re * factor, im * factor)
        if detector < n:  # frequencies beyond the detector get no gradient
            for r in range(n):
                on_row = r < detector - half or r >= n - half
                for c in range(n):
                    if not (on_row and (c < detector - half or c >= n - half)):
                        spectrum[b, r, c] = 0
    return total


def detector_amplitude_in_place(spectrum: np.ndarray, target: np.ndarray) -> float:
    """Far-field crop, amplitude loss and the crop's adjoint in one pass (CPU only).

    Parameters
    ----------
    spectrum : (B, N, N) complex
        *Unscaled* FFT of the exit waves, FFT order; overwritten with the
        *unscaled* inverse-FFT input of the gradient (zero outside the detector).
    target : (B, D, D) real
        ``√(I/α)``; negative at masked pixels (:data:`ptylive.gpu.loss.MASKED_TARGET`).

    Returns
    -------
    float
        The loss. Numpy arrays only: other array modules take
        :func:`ptylive.gpu.propagation.farfield` and :mod:`ptylive.gpu.loss`.
    """
    if get_array_module(spectrum) is not np:
        raise TypeError("detector_amplitude_in_place is the CPU path; use farfield + amplitude_loss")
    target = np.ascontiguousarray(target)
    n, detector = spectrum.shape[-1], target.shape[-1]
    real = spectrum.real.dtype.type
    delta = AMPLITUDE_DELTA_PER_PIXEL / detector
    return float(_detector_amplitude(spectrum, target.astype(real, copy=False), real(1.0 / n), real(delta * delta)))


@numba.njit(cache=True, nogil=True)
def _backward(stored: np.ndarray, gradient: np.ndarray, patch: np.ndarray,
              illumination: np.ndarray) -> None:  # pragma: no cover
    w, g, p, il = stored.reshape(-1), gradient.reshape(-1), patch.reshape(-1), illumination.reshape(-1)
    for i in range(w.size):
        psi = w[i]
        il[i] = psi.real * psi.real + psi.imag * psi.imag
        w[i] = np.conj(psi) * g[i]
        g[i] = g[i] * np.conj(p[i])


def backward_slice(stored: Any, gradient: Any, patch: Any, illumination: Any) -> None:
    """One slice of back-propagation in one pass.

    ``illumination ← |ψ|²``, ``stored ← conj(ψ)·g`` (the object gradient) and
    ``g ← g·conj(O)`` (the gradient with respect to ψ); all (B, N, N).
    """
    xp = get_array_module(stored)
    if xp is np:
        _backward(stored, gradient, patch, illumination)
        return
    illumination[...] = stored.real ** 2 + stored.imag ** 2
    xp.conjugate(stored, out=stored)
    stored *= gradient
    gradient *= patch.conj()
