"""Batched multislice forward model and its gradient.

For probe positions ``j`` of a batch and slices ``s = 0 … S−1``::

    ψ_0 = shift(P, d_j)                     sub-pixel Fourier shift
    φ_s = ψ_s · O_s[window_j]               transmission
    ψ_{s+1} = F⁻¹[H · F φ_s]                Fresnel propagation
    Ψ_j = crop(fftshift(F φ_{S−1}))         far field on the detector

The gradient is back-propagated through exactly these steps (each linear step
by its adjoint), see :func:`loss_and_gradient`; on request it continues through
the sub-pixel shift to ``∂L/∂d_j`` (:func:`position_gradient`).

**Probe modes** (mixed states, Thibault & Menzel, Nature 494, 68 (2013)): a probe is
either one (N, N) array or K incoherent modes (K, N, N). Every mode ``P_k`` is
propagated through the same windows, and the detector sees ``Σ_k |Ψ_{k,j}|²``;
the loss compares that sum with the data (:func:`ptylive.gpu.loss.model_intensity`).
Each mode's far-field gradient is the loss's per-pixel factor times its own field,
and back-propagates as one probe's does::

    ∂L/∂O_s[window_j] = Σ_k conj(ψ_{k,s}) ∂L/∂φ_{k,s}      illumination Σ_k |ψ_{k,s}|²
    ∂L/∂P_k           = Σ_j shift⁻¹(∂L/∂ψ_{k,0})           ∂L/∂d_j = Σ_k (one mode's)

A (1, N, N) probe runs the one-probe code path (the results are the same arrays, with
the mode axis kept), so K = 1 is bit for bit today's model.

**Recomputed waves** (``wave_segment``, gradient checkpointing): the backward pass needs every ψ_s.
Stored, they take S·B·N² complex, most of a batch's memory at many slices. With segments of
``g`` slices, the forward pass keeps only ψ at every g-th slice (and the last segment whole);
the backward pass recomputes each earlier segment's ψ_s from its first before back-propagating
through it: (⌈S/g⌉ − 1 + g)·B·N² (least at g ≈ √S, :func:`wave_segment_slices`) for one more
transmission and propagation per slice, about 1.5× the slice FFTs. The same operations on the
same inputs, so every result is the stored waves' to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from types import ModuleType
from typing import Any

import numba
import numpy as np

from ptylive.gpu.backend import empty_aligned, get_array_module
from ptylive.gpu.fft import fft2, ifft2
from ptylive.gpu.fused import backward_slice, detector_amplitude_in_place, transmit
from ptylive.gpu.loss import loss_function
from ptylive.gpu.patches import TileSink
from ptylive.gpu.probe import fourier_shift, shift_ramps
from ptylive.gpu.propagation import farfield, farfield_adjoint, propagate

CURVATURE_PER_LOSS = {"amplitude": 2.0, "poisson": 4.0}


@dataclass(frozen=True)
class BatchGradient:
    """Result of one batch.

    Attributes
    ----------
    loss : float
        Sum of the loss over the batch.
    object_gradient : (S, B, N, N) complex or None
        Gradient with respect to each slice's window (None: it went into the ``sink``).
    illumination : (S, B, N, N) real or None
        ``|ψ_s|²``, the illumination preconditioner's contribution (None: into the ``sink``).
    probe_gradient : (N, N) or (K, N, N) complex or None
        Summed over the batch, the probe's shape (one per mode); None unless requested.
    position_gradient : (B, 2) float64 or None
        ``∂L/∂d_j`` (row, col) in loss units per pixel, on the array module of the inputs;
        None unless requested (``want_position_gradient``).
    position_curvature : (B, 2) float64 or None
        A Gauss-Newton curvature scale of the loss along each axis of each position
        (:func:`position_curvature`); with ``position_gradient``.
    """

    loss: float
    object_gradient: Any
    illumination: Any
    probe_gradient: Any | None
    position_gradient: Any | None = None
    position_curvature: Any | None = None


def forward(probe: Any, shifts_px: Any, patches: Any, propagator: Any, detector_px: int) -> Any:
    """Model far field.

    Parameters
    ----------
    probe : (N, N) or (K, N, N) complex
        One probe, or K incoherent modes.
    shifts_px : (B, 2) float
        Sub-pixel shift of each position inside its window.
    patches : (S, B, N, N) complex, or :class:`~ptylive.gpu.patches.SliceWindows`
        Object windows (read one slice at a time).
    propagator : (N, N) complex
    detector_px : int

    Returns
    -------
    (B, D, D) or (K, B, D, D) complex
        One far field per position (and mode); the model intensity is ``Σ_k |Ψ_k|²``
        (:func:`ptylive.gpu.loss.model_intensity`).
    """
    _check_probe(probe)
    if probe.ndim == 3 and probe.shape[0] == 1:
        return forward(probe[0], shifts_px, patches, propagator, detector_px)[None]
    wave = fourier_shift(probe, shifts_px) if probe.ndim == 2 else shifted_modes(probe, shifts_px)
    for s in range(patches.shape[0]):
        wave *= patches[s]
        if s < patches.shape[0] - 1:
            propagate(wave, propagator)
    return farfield(wave, detector_px)


def shifted_modes(probe: Any, shifts_px: Any) -> Any:
    """Every mode shifted to every position: (K, N, N) and (B, 2) -> (K, B, N, N), SIMD-aligned."""
    xp = get_array_module(probe)
    out = empty_aligned(xp, (probe.shape[0], len(shifts_px), *probe.shape[1:]), probe.dtype)
    for k in range(probe.shape[0]):
        out[k] = fourier_shift(probe[k], shifts_px)
    return out


def _check_probe(probe: Any) -> None:
    if probe.ndim not in (2, 3) or probe.shape[-1] != probe.shape[-2] or probe.shape[0] < 1:
        raise ValueError(f"probe must be (N, N) or (K, N, N) with K >= 1, got shape {probe.shape}")


def wave_segment_slices(n_slices: int) -> int:
    """The segment length that holds the fewest waves when they are recomputed: ⌈√S⌉ (1 for one slice)."""
    return max(1, math.isqrt(n_slices - 1) + 1) if n_slices > 1 else 1


def held_waves(n_slices: int, wave_segment: int) -> int:
    """How many ψ_s (each B·N² complex per mode) a batch holds: S when stored, ⌈S/g⌉ − 1 + g with segments of g."""
    if not 0 < wave_segment < n_slices:
        return n_slices
    return -(-n_slices // wave_segment) - 1 + wave_segment


class _Waves:
    """ψ_s of a batch for the backward pass: every slice's, or every g-th slice's plus one segment's.

    ``slot(s)`` is where the forward pass writes ψ_s (for most slices of a segmented store, scratch);
    ``at(s, rewave)``, called for s = S−1 … 0, returns ψ_s, first recomputing its segment with
    ``rewave(ψ_start, slices, out)`` when it is not held.
    """

    def __init__(self, xp: ModuleType, n_slices: int, wave_segment: int, wave_shape: tuple[int, ...],
                 dtype: Any) -> None:
        self.segment = wave_segment if 0 < wave_segment < n_slices else n_slices
        self.held_from = (n_slices - 1) // self.segment * self.segment  # the slices held now: held_from …
        self.held = empty_aligned(xp, (self.segment, *wave_shape), dtype)
        n_marks = held_waves(n_slices, self.segment) - self.segment  # ψ at the start of every segment but the last
        self.marks = empty_aligned(xp, (n_marks, *wave_shape), dtype) if n_marks else None

    def slot(self, s: int) -> Any:
        if s >= self.held_from:
            return self.held[s - self.held_from]
        if s % self.segment == 0:
            assert self.marks is not None
            return self.marks[s // self.segment]
        return self.held[s % self.segment]  # scratch: overwritten before it is read

    def at(self, s: int, rewave: Callable[[Any, range, Any], None]) -> Any:
        if s < self.held_from:
            assert self.marks is not None
            self.held_from = s // self.segment * self.segment
            rewave(self.marks[s // self.segment], range(self.held_from, self.held_from + self.segment), self.held)
        return self.held[s - self.held_from]


def _transmit_modes(wave: Any, patch: Any, stored: Any) -> None:
    """:func:`~ptylive.gpu.fused.transmit` of one wave (B, N, N), or of each mode of (K, B, N, N)."""
    if wave.ndim == patch.ndim:
        transmit(wave, patch, stored)
        return
    for k in range(wave.shape[0]):
        transmit(wave[k], patch, stored[k])


def _rewave(patches: Any, propagator: Any, wave: Any, slices: range, out: Any) -> None:
    """ψ_s of one segment again, from ``wave`` = ψ at its first slice (overwritten): into ``out[0 …]``."""
    for i, s in enumerate(slices):
        _transmit_modes(wave, patches[s], out[i])
        if i < len(slices) - 1:
            propagate(wave, propagator)


def loss_and_gradient(
    probe: Any, shifts_px: Any, patches: Any, propagator: Any, measured: Any,
    loss: str = "amplitude", want_probe_gradient: bool = False, want_position_gradient: bool = False,
    sink: TileSink | None = None, wave_segment: int = 0,
) -> BatchGradient:
    """Loss of one batch and its gradient with respect to object, probe and positions.

    Parameters
    ----------
    probe : (N, N) or (K, N, N) complex
        One probe, or K incoherent modes (see the module docstring).
    shifts_px : (B, 2) float
    patches : (S, B, N, N) complex, or :class:`~ptylive.gpu.patches.SliceWindows`
        Object windows; read only, one slice at a time (``patches[s]``, used before the next is read).
    propagator : (N, N) complex
    measured : (B, D, D) real
        Target of the loss (``√(I/α)`` for amplitude, ``I/α`` for Poisson).
    loss : {"amplitude", "poisson"}
    want_probe_gradient : bool
    want_position_gradient : bool
        Also return ``∂L/∂d_j`` and a curvature scale for each position (one extra batched FFT and
        two fused passes, see :func:`position_gradient` and :func:`position_curvature`); off by
        default, and then nothing else is computed and every other result is unchanged.
    sink : TileSink or None
        Where each slice's object gradient and illumination go as soon as they are known
        (scatter-added into the tile); the result then holds None for both, and the batch's workspace
        is the stored waves ψ_s (S, B, N, N) plus a few (B, N, N) arrays. None: returned as arrays.
    wave_segment : int
        0 (or ≥ S): every ψ_s is stored. g in 1 … S−1: ψ_s is recomputed in segments of g slices
        (the module docstring), for which a ``sink`` is needed; the same results.

    Returns
    -------
    BatchGradient
        ``probe_gradient`` has the probe's shape.
    """
    _check_probe(probe)
    if sink is None and 0 < wave_segment < patches.shape[0]:
        raise ValueError("recomputed waves (wave_segment) need a sink: the stored waves are the returned gradient")
    if probe.ndim == 3 and probe.shape[0] == 1:  # one mode: the one-probe path, the mode axis kept
        result = loss_and_gradient(probe[0], shifts_px, patches, propagator, measured, loss, want_probe_gradient,
                                   want_position_gradient, sink, wave_segment)
        if result.probe_gradient is None:
            return result
        return replace(result, probe_gradient=result.probe_gradient[None])
    if probe.ndim == 3:
        return _loss_and_gradient_modes(probe, shifts_px, patches, propagator, measured, loss, want_probe_gradient,
                                        want_position_gradient, sink, wave_segment)
    xp = get_array_module(probe)
    n_slices, batch, n, _ = patches.shape
    waves = _Waves(xp, n_slices, wave_segment, patches.shape[1:], patches.dtype)  # ψ_s, later the gradients
    illumination = _illumination_out(xp, patches, sink)
    curvature = xp.zeros((batch, 2), dtype=np.float64) if want_position_gradient else None
    rewave = partial(_rewave, patches, propagator)
    wave = fourier_shift(probe, shifts_px)
    for s in range(n_slices):
        transmit(wave, patches[s], waves.slot(s))  # ψ_s kept (or scratch); wave = φ_s
        if s < n_slices - 1:
            propagate(wave, propagator)
    if loss == "amplitude" and xp is np:  # one pass from the exit wave's spectrum to the gradient's
        value = detector_amplitude_in_place(fft2(wave, normalise=False), measured)
        gradient = ifft2(wave, normalise=False)  # ∂L/∂φ_{S-1}
    else:
        value, field_gradient = loss_function(loss)(farfield(wave, measured.shape[-1]), measured)
        gradient = farfield_adjoint(field_gradient, n, out=wave)  # ∂L/∂φ_{S-1}
    backward = propagator.conj()
    for s in range(n_slices - 1, -1, -1):
        # |ψ_s|², ∂L/∂O_s[window] = conj(ψ_s) ∂L/∂φ_s (into waves[s]), ∂L/∂ψ_s = conj(O_s) ∂L/∂φ_s
        psi = waves.at(s, rewave)
        patch, lit = patches[s], illumination[0 if sink is not None else s]
        backward_slice(psi, gradient, patch, lit)
        if curvature is not None:
            add_slice_curvature(patch, lit, curvature)
        if sink is not None:
            sink.add(s, psi, lit)
        if s > 0:
            propagate(gradient, backward)  # ∂L/∂φ_{s-1}
    probe_gradient = None
    if want_probe_gradient:  # adjoint of broadcast-and-shift: shift back, sum over positions
        probe_gradient = fourier_shift(gradient, -xp.asarray(shifts_px)).sum(axis=0)
    object_gradient, illumination = (None, None) if sink is not None else (waves.held, illumination)
    if curvature is None:
        return BatchGradient(value, object_gradient, illumination, probe_gradient)
    positions = position_gradient(probe, shifts_px, gradient)  # overwrites gradient (no longer needed)
    curvature *= CURVATURE_PER_LOSS[loss]
    return BatchGradient(value, object_gradient, illumination, probe_gradient, positions, curvature)


def _illumination_out(xp: ModuleType, patches: Any, sink: TileSink | None) -> Any:
    """(S, B, N, N) real for the result, or one (1, B, N, N) slice of scratch when a sink takes each slice."""
    shape = patches.shape if sink is None else (1, *patches.shape[1:])
    return xp.empty(shape, dtype=np.finfo(patches.dtype).dtype)


def _loss_and_gradient_modes(
    probe: Any, shifts_px: Any, patches: Any, propagator: Any, measured: Any, loss: str,
    want_probe_gradient: bool, want_position_gradient: bool, sink: TileSink | None, wave_segment: int,
) -> BatchGradient:
    """:func:`loss_and_gradient` for K > 1 modes: the modes ride along the batch, (K, B, N, N).

    Scratch: ψ_{k,s} of every mode and slice (S, K, B, N, N), about K times one probe's memory
    and time; the fused amplitude pass is one probe's, so the loss runs on the far fields.
    """
    xp = get_array_module(probe)
    n_slices, batch, n, _ = patches.shape
    n_modes = probe.shape[0]
    waves = _Waves(xp, n_slices, wave_segment, (n_modes, *patches.shape[1:]), patches.dtype)  # later the gradients
    rewave = partial(_rewave, patches, propagator)
    wave = shifted_modes(probe, shifts_px)
    for s in range(n_slices):
        _transmit_modes(wave, patches[s], waves.slot(s))
        if s < n_slices - 1:
            propagate(wave, propagator)
    value, field_gradient = loss_function(loss)(farfield(wave, measured.shape[-1]), measured)
    gradient = farfield_adjoint(field_gradient, n, out=wave)  # ∂L/∂φ_{k,S-1}
    illumination = _illumination_out(xp, patches, sink)
    mode_illumination = xp.empty(patches.shape[1:], dtype=illumination.dtype)
    curvature = xp.zeros((batch, 2), dtype=np.float64) if want_position_gradient else None
    backward = propagator.conj()
    for s in range(n_slices - 1, -1, -1):
        psi = waves.at(s, rewave)  # (K, B, N, N)
        patch, lit = patches[s], illumination[0 if sink is not None else s]
        backward_slice(psi[0], gradient[0], patch, lit)
        for k in range(1, n_modes):  # sums over modes into mode 0's arrays
            backward_slice(psi[k], gradient[k], patch, mode_illumination)
            lit += mode_illumination
            psi[0] += psi[k]
        if curvature is not None:
            add_slice_curvature(patch, lit, curvature)
        if sink is not None:
            sink.add(s, psi[0], lit)
        if s > 0:
            propagate(gradient, backward)
    probe_gradient = None
    if want_probe_gradient:
        back = -xp.asarray(shifts_px)
        probe_gradient = xp.stack([fourier_shift(gradient[k], back).sum(axis=0) for k in range(n_modes)])
    object_gradient = None if sink is not None else xp.ascontiguousarray(waves.held[:, 0])
    illumination = None if sink is not None else illumination
    if curvature is None:
        return BatchGradient(value, object_gradient, illumination, probe_gradient)
    positions = position_gradient(probe[0], shifts_px, gradient[0])
    for k in range(1, n_modes):
        positions += position_gradient(probe[k], shifts_px, gradient[k])
    curvature *= CURVATURE_PER_LOSS[loss]
    return BatchGradient(value, object_gradient, illumination, probe_gradient, positions, curvature)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _shift_gradient(spectrum: np.ndarray, probe_spectrum: np.ndarray, row: np.ndarray, col: np.ndarray,
                    k: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    batch, n, m = spectrum.shape
    for b in range(batch):
        along_rows = 0.0
        along_cols = 0.0
        for i in range(n):
            line = 0.0
            for j in range(m):
                im = (np.conj(spectrum[b, i, j]) * probe_spectrum[i, j] * row[b, i] * col[b, j]).imag
                line += im
                along_cols += k[j] * im
            along_rows += k[i] * line
        out[b, 0] = along_rows
        out[b, 1] = along_cols


def position_gradient(probe: Any, shifts_px: Any, wave_gradient: Any) -> Any:
    """``∂L/∂d_j`` from ``g_j = ∂L/∂ψ_0`` of each position, for ``ψ_0 = fourier_shift(P, d_j)``.

    With unscaled DFTs ``G = F g`` and ``Ψ_0 = F ψ_0 = F(P) e^{−2πi k·d}``, the shift's derivative is
    ``∂ψ_0/∂d_a = F⁻¹[−2πi k_a Ψ_0]``, and in our gradient convention (``δL = Re Σ conj(g) δψ``)
    Parseval gives::

        ∂L/∂d_a = Re Σ_x conj(g) ∂ψ_0/∂d_a = (2π / N²) Σ_k k_a Im(conj(G(k)) Ψ_0(k))

    with ``k`` in cycles per pixel (``fftfreq``). Cost: one batched FFT of ``g``, one FFT of the
    probe, and one fused pass (CPU) or four elementwise passes (other array modules).

    Parameters
    ----------
    probe : (N, N) complex
    shifts_px : (B, 2) real
    wave_gradient : (B, N, N) complex
        ``∂L/∂ψ_0``; overwritten (scratch).

    Returns
    -------
    (B, 2) float64
        Row and column derivative of the loss, per pixel of shift.
    """
    xp = get_array_module(wave_gradient)
    n = wave_gradient.shape[-1]
    probe_spectrum = empty_aligned(xp, probe.shape, wave_gradient.dtype)
    probe_spectrum[...] = probe
    fft2(probe_spectrum, normalise=False)
    spectrum = fft2(wave_gradient, normalise=False)
    row, col = shift_ramps(xp, n, shifts_px, spectrum.dtype)
    k = xp.asarray(np.fft.fftfreq(n), dtype=np.float64)
    if xp is np:
        out = np.empty((len(spectrum), 2), dtype=np.float64)
        _shift_gradient(spectrum, probe_spectrum, row, col, k, out)
    else:
        out = _shift_gradient_arrays(xp, spectrum, probe_spectrum, row, col, k)
    out *= 2.0 * np.pi / (n * wave_gradient.shape[-2])
    return out


def _shift_gradient_arrays(xp: ModuleType, spectrum: Any, probe_spectrum: Any, row: Any, col: Any, k: Any) -> Any:
    """What ``_shift_gradient`` computes, as array expressions (CuPy); overwrites ``spectrum``."""
    xp.conjugate(spectrum, out=spectrum)
    spectrum *= probe_spectrum[None]
    spectrum *= row[:, :, None]
    spectrum *= col[:, None, :]
    imaginary = spectrum.imag
    return xp.stack([imaginary.sum(axis=2, dtype=np.float64) @ k, imaginary.sum(axis=1, dtype=np.float64) @ k],
                    axis=1)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _slice_curvature(patch: np.ndarray, illumination: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    batch, n, m = patch.shape
    for b in range(batch):
        rows = 0.0
        cols = 0.0
        for i in range(1, n - 1):
            for j in range(1, m - 1):
                dr = patch[b, i + 1, j] - patch[b, i - 1, j]
                dc = patch[b, i, j + 1] - patch[b, i, j - 1]
                weight = illumination[b, i, j]
                rows += weight * (dr.real * dr.real + dr.imag * dr.imag)
                cols += weight * (dc.real * dc.real + dc.imag * dc.imag)
        out[b, 0] += 0.25 * rows
        out[b, 1] += 0.25 * cols


def add_slice_curvature(patch: Any, illumination: Any, out: Any) -> None:
    """Add one slice's term of :func:`position_curvature` (without ``c_loss``) to ``out`` (B, 2) float64.

    ``patch`` (B, N, N) complex windows of the slice, ``illumination`` (B, N, N) real ``|ψ_s|²``.
    """
    if get_array_module(patch) is np:
        _slice_curvature(patch, np.ascontiguousarray(illumination), out)
    else:
        _slice_curvature_arrays(patch, illumination, out)


def _slice_curvature_arrays(patch: Any, illumination: Any, out: Any) -> None:
    """What ``_slice_curvature`` computes, as array expressions (CuPy); temporaries are (B, N, N)."""
    inner = illumination[:, 1:-1, 1:-1]
    for axis, difference in enumerate((patch[:, 2:, 1:-1] - patch[:, :-2, 1:-1],
                                       patch[:, 1:-1, 2:] - patch[:, 1:-1, :-2])):
        power = difference.real**2 + difference.imag**2
        out[:, axis] += 0.25 * (inner * power).sum(axis=(1, 2), dtype=np.float64)


def position_curvature(patches: Any, illumination: Any, loss: str) -> Any:
    """Gauss-Newton curvature scale ``h_{j,a}`` of the loss along each axis of each position.

    A relative shift ``δ`` of probe and object changes the wave leaving slice ``s`` by ``ψ_s ∂O_s δ``
    (the common translation of both only adds a phase ramp to the far field, which no intensity sees).
    With ``|O| ≤ 1`` and unitary propagation, and treating the slices' contributions as incoherent::

        h_{j,a} = c_loss · Σ_s Σ_x |ψ_{s,j}(x)|² |∂_a O_s(x)|²       c = 2 (amplitude), 4 (Poisson)

    (``2‖δΨ‖²`` and ``4‖δΨ‖²`` bound the two losses' curvatures along ``δΨ`` near a fit), with central
    differences over the window's interior. Against the exact second derivative on PbTiO3 (3, 10 and 20
    slices, both losses, with and without upsampling) the true curvature is 0.3-2.3 times ``h``, median
    0.6-1.3 (``tests/gpu/test_positions.py`` checks the range).

    Parameters
    ----------
    patches : (S, B, N, N) complex
        Object windows.
    illumination : (S, B, N, N) real
        ``|ψ_s|²`` of each position (:attr:`BatchGradient.illumination`).
    loss : {"amplitude", "poisson"}

    Returns
    -------
    (B, 2) float64
        Row and column curvature, in loss units per pixel².
    """
    if loss not in CURVATURE_PER_LOSS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {tuple(CURVATURE_PER_LOSS)}")
    xp = get_array_module(illumination)
    out = xp.zeros((patches.shape[1], 2), dtype=np.float64)
    for s in range(patches.shape[0]):
        add_slice_curvature(patches[s], illumination[s], out)
    out *= CURVATURE_PER_LOSS[loss]
    return out
