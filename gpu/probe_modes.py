"""Incoherent probe modes (mixed states): the first guess and the orthogonalisation.

A partially coherent beam is a density matrix ``ρ = Σ_k P_k P_k^H``; the detector sees the
incoherent sum ``Σ_k |Ψ_k|²`` (Thibault & Menzel, Nature 494, 68 (2013); the model is in
:mod:`ptylive.gpu.multislice`). Only ``ρ`` is measurable, so the modes are defined up to a unitary
mix; :func:`orthogonalise_modes` picks the one in which they are orthogonal and sorted by power
(the eigenmodes of ``ρ``), which changes no model intensity.

First guess (:func:`initial_modes`): mode 0 is the coherent probe of the optics (or the file's),
with ``1 − f`` of the power (``f = MODE_POWER_FRACTION``, 5 %); modes ``k ≥ 1`` are that probe
times low-order Hermite-like polynomials of ``u = (x − x̄)/σ_x``, ``v = (y − ȳ)/σ_y`` (its own
centroid and rms width, :func:`mode_shapes`): first ``u² + v² − 2``, what a focal spread adds to a
defocused probe, then ``u`` and ``v``, what a source of finite size adds. They are orthogonalised
against the earlier modes (Gram-Schmidt) and get the powers ``f·(1/k)/Σ_{j<K} 1/j`` (distinct, so
the sort by power is unique). The total power ``Σ_k Σ|P_k|²`` is the probe's (1).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module, to_numpy

logger = logging.getLogger(__name__)

MODE_POWER_FRACTION = 0.05  # of the total power, in modes k >= 1 of the first guess


def mode_shapes(u: np.ndarray, v: np.ndarray, n: int) -> list[np.ndarray]:
    """The first ``n`` shapes that multiply mode 0, in the probe's own coordinates ``u``, ``v``.

    Order: ``u² + v² − 2`` (the derivative of a defocused probe with respect to defocus, which a
    focal spread adds), ``u`` and ``v`` (a shift, which a source of finite size adds), ``uv`` and
    ``u² − v²`` (astigmatic), then the products ``He_a(u) He_b(v)`` of probabilists' Hermite
    polynomials of total degree 3, 4, ...
    """
    shapes = [u * u + v * v - 2.0, u, v, u * v, u * u - v * v]
    degree = 3
    while len(shapes) < n:
        shapes += [_hermite(a, u) * _hermite(degree - a, v) for a in range(degree, -1, -1)]
        degree += 1
    return shapes[:n]


def _hermite(order: int, x: np.ndarray) -> np.ndarray:
    """Probabilists' Hermite polynomial He_order(x)."""
    return np.asarray(np.polynomial.hermite_e.hermeval(x, [0.0] * order + [1.0]))


def initial_modes(probe: Any, n_modes: int, fraction: float = MODE_POWER_FRACTION) -> Any:
    """First guess of ``n_modes`` incoherent modes from one coherent probe.

    Parameters
    ----------
    probe : (N, N) complex
        Mode 0's shape; its power ``Σ|P|²`` becomes the total power of every mode.
    n_modes : int
        K >= 1; K = 1 returns ``probe[None]`` unchanged.
    fraction : float
        Share of the power in modes ``k >= 1`` (0 < fraction < 1).

    Returns
    -------
    (K, N, N) complex
        Orthogonal modes sorted by power, on the probe's array module and dtype.
    """
    if n_modes < 1 or not 0 < fraction < 1:
        raise ValueError(f"need n_modes >= 1 and 0 < fraction < 1, got {n_modes}, {fraction}")
    xp = get_array_module(probe)
    base = to_numpy(probe).astype(np.complex128)
    if n_modes == 1:
        return xp.asarray(base[None].astype(probe.dtype))
    power = float(np.sum(np.abs(base) ** 2))
    weight = np.abs(base) ** 2 / power
    grid = np.indices(base.shape, dtype=np.float64)
    rows, cols = grid[0], grid[1]
    centre = (float(np.sum(weight * rows)), float(np.sum(weight * cols)))
    width = [max(float(np.sqrt(np.sum(weight * (grid - c) ** 2))), 0.5) for grid, c in zip((rows, cols), centre,
                                                                                           strict=True)]
    u, v = (rows - centre[0]) / width[0], (cols - centre[1]) / width[1]
    modes = [base / np.sqrt(power)]
    for shape in mode_shapes(u, v, n_modes - 1):
        mode = base * shape
        for earlier in modes:  # Gram-Schmidt, twice for rounding
            mode = mode - np.vdot(earlier, mode) * earlier
        for earlier in modes:
            mode = mode - np.vdot(earlier, mode) * earlier
        modes.append(mode / np.linalg.norm(mode))
    harmonic = 1.0 / np.arange(1, n_modes)
    powers = np.concatenate([[1.0 - fraction], fraction * harmonic / harmonic.sum()]) * power
    out = np.stack(modes) * np.sqrt(powers)[:, None, None]
    return xp.asarray(out.astype(probe.dtype))


def orthogonalise_modes(modes: Any) -> Any:
    """The eigenmodes of ``ρ = Σ_k P_k P_k^H``: orthogonal, sorted by power, ``ρ`` kept.

    With the Gram matrix ``G_ij = Σ_x conj(P_i) P_j = U Λ U^H`` (``numpy.linalg.eigh`` in float64 on
    the host, K × K), ``Q_a = Σ_j U_ja P_j`` has ``⟨Q_a, Q_b⟩ = Λ_ab`` and ``Σ_a Q_a Q_a^H = ρ``
    (``U`` is unitary), so every model intensity and the total power are unchanged. Columns of
    ``U`` are sorted by descending ``Λ`` and each one's largest entry is made real and positive, so
    modes that were orthogonal and sorted come back as they were. Deterministic: identical input
    gives identical modes (every rank of a ``sync`` run applies the same all-reduced step).

    Parameters
    ----------
    modes : (K, N, N) complex

    Returns
    -------
    (K, N, N) complex
        New array, the input's array module and dtype.
    """
    xp = get_array_module(modes)
    n_modes = modes.shape[0]
    flat = modes.reshape(n_modes, -1).astype(np.complex128)
    gram = to_numpy(flat.conj() @ flat.T)
    gram = 0.5 * (gram + gram.conj().T)
    powers, vectors = np.linalg.eigh(gram)
    order = np.argsort(-powers, kind="stable")
    vectors = vectors[:, order]
    largest = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(n_modes)]
    vectors = vectors * (np.abs(largest) / largest)[None, :]
    mixed = xp.asarray(vectors.T) @ flat
    return mixed.reshape(modes.shape).astype(modes.dtype)


def mode_powers(modes: Any) -> np.ndarray:
    """``Σ|P_k|²`` of each mode: (K,) float64 (one probe (N, N): its power, as (1,))."""
    xp = get_array_module(modes)
    stacked = modes.reshape(-1, modes.shape[-2], modes.shape[-1])
    return np.asarray(to_numpy(xp.sum(stacked.real**2 + stacked.imag**2, axis=(1, 2))), dtype=np.float64)
