"""Missing-cone regularisation of the multislice object: depth structure the probe cannot measure is removed.

A probe of convergence semi-angle α transfers an object component of lateral frequency ``k_r`` and depth
frequency ``k_z`` only where two of its plane waves differ by both: ``|k_z| ≤ λ/2 · (|k₂|² − |k₁|²)``, about
``α |k_r|`` for small ``k_r``. Outside that cone (slow lateral variation changing with depth) the data say
nothing, the gradient still moves it, and the reconstruction drifts: on a static 62 Å SrTiO3 crystal at 32
slices the phase gathered in the middle slices with absorption there, and the correlation with the truth fell to
0.41 while the loss kept falling. The field's codes weaken that cone every iteration (fold_slice's
``regularize_layers``: ``W = 1 − (2/π) atan((β k_z / k_r)²)`` applied to the object's 3-D spectrum). Here:

* the cone's edge ``k_r = s · |k_z| / α`` takes half weight (``s`` the ``strength``, 1 by default: β = 1/α in
  physical units, no tuning per data set);
* per depth frequency ``k_z ≠ 0`` of ``ln O`` (:func:`log_transmission`; FFT along the slices), the component is
  replaced by itself minus
  its lateral low-pass ``G_σ * ·``, a Gaussian of ``σ = √(ln 2 / 2π²) / k_c`` whose transfer is ½ at
  ``k_c = s |k_z| / α``; the depth mean (``k_z = 0``) is kept;
* ``G_σ`` is truncated at :data:`TRUNCATION_SIGMAS` σ (the kernel's radius ``R``), so the correction at a voxel
  needs the object only within ``R`` pixels of it. That is what decomposes: the owner of a voxel computes
  its correction from its extended tile exactly as one rank would, wherever the tile's halo is at least ``R``
  wide (the window's half is, on a dense scan, far more: ``R`` was 11 px against a 32-px halo on the abTEM
  cases), and the other copies receive it in the halo exchange. The tile is padded by its edge values,
  which at the object's own edge is what one rank does too.

The change of ``ln O`` is linear in ``ln O`` and keeps its depth mean (the projected phase and ``Π|O_s|``); it
is applied in full once per iteration (as fold_slice does), and the amplitude constraint follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module
from ptylive.gpu.fft import fft_axes

#: The low-pass kernel's radius in σ: its weight beyond is below 3e-11 of the centre's (exact to float64 rounding).
TRUNCATION_SIGMAS = 7.0
#: Columns transformed along the slices at a time (the transform's scratch stays a small part of the tile).
COLUMN_CHUNK = 64
#: Branch cut of the phase: potentials are positive, so a slice's phase lies in about [0, 3] rad; the cut at −π/2
#: leaves room on both sides (a cut at −π wrapped nothing on the abTEM cases either, but left less).
PHASE_CUT_RAD = -math.pi / 2
#: ``|O|`` below this is taken as this in the logarithm (the amplitude constraint keeps ``|O| ≤ 1``).
AMPLITUDE_FLOOR = 1e-6
_SIGMA_AT_HALF = math.sqrt(math.log(2.0) / (2.0 * math.pi**2))  # Gaussian of transfer 1/2 at k = 1: σ·k_c


@dataclass(frozen=True)
class ConeFilter:
    """The per-depth-frequency lateral kernels of one object grid.

    Attributes
    ----------
    sigmas_px : tuple of float
        σ of the low-pass of each depth frequency, in FFT order along the slices; 0 for ``k_z = 0``.
    radius_px : int
        The largest kernel's radius ``R`` (the halo the correction needs).
    """

    sigmas_px: tuple[float, ...]
    radius_px: int


def cone_filter(n_slices: int, slice_thickness_A: float, pixel_size_A: float, convergence_semiangle_mrad: float,
                strength: float = 1.0) -> ConeFilter:
    """The kernels for ``n_slices`` slices of ``slice_thickness_A`` on pixels of ``pixel_size_A``.

    ``strength`` ``s`` scales the cone's edge, ``k_c = s |k_z| / α``: larger removes more depth structure.
    """
    if not (strength > 0 and convergence_semiangle_mrad > 0 and slice_thickness_A > 0 and pixel_size_A > 0):
        raise ValueError("strength, convergence semi-angle, slice thickness and pixel size must be positive")
    alpha = convergence_semiangle_mrad * 1e-3
    kz = np.abs(np.fft.fftfreq(n_slices, d=slice_thickness_A))
    sigmas = tuple(0.0 if k == 0 else float(_SIGMA_AT_HALF * alpha / (strength * k) / pixel_size_A) for k in kz)
    return ConeFilter(sigmas, int(math.ceil(TRUNCATION_SIGMAS * max(sigmas, default=0.0))))


def _kernel_transfer(xp: Any, sigma_px: float, radius: int, length: int, dtype: Any) -> Any:
    """DFT (length ``length``) of the normalised Gaussian of ``sigma_px`` truncated at ``radius``, centred at 0."""
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    weights /= weights.sum()
    kernel = np.zeros(length)
    kernel[offsets % length] = weights
    return xp.asarray(np.fft.fft(kernel).astype(dtype))


def lateral_lowpass(plane: Any, sigma_px: float, radius: int) -> Any:
    """``G_σ * plane`` with the Gaussian truncated at ``radius`` px, the plane padded by its edge values.

    Parameters
    ----------
    plane : (H, W) complex

    Returns
    -------
    (H, W) complex: a new array, or a view of one (the padded plane's middle).
    """
    xp = get_array_module(plane)
    if radius == 0 or sigma_px == 0:
        return plane.copy()
    padded = xp.pad(plane, radius, mode="edge")
    rows = _kernel_transfer(xp, sigma_px, radius, padded.shape[0], plane.dtype)
    cols = _kernel_transfer(xp, sigma_px, radius, padded.shape[1], plane.dtype)
    fft_axes(padded, (0, 1))  # in place: one padded plane in all
    padded *= rows[:, None]
    padded *= cols[None, :]
    smooth = fft_axes(padded, (0, 1), inverse=True)
    return smooth[radius:radius + plane.shape[0], radius:radius + plane.shape[1]]


def log_transmission(volume: Any, out: Any = None) -> Any:
    """``ln|O| + i·φ`` with φ on ``(PHASE_CUT_RAD, PHASE_CUT_RAD + 2π]`` and ``|O|`` floored at :data:`AMPLITUDE_FLOOR`.

    Parameters
    ----------
    volume : (..., H, W) complex
    out : complex array of ``volume``'s shape, or None
        Where to write it (any strides; must not overlap ``volume``); None: a new array.

    Returns
    -------
    Complex array of ``volume``'s shape and dtype (``out``); besides it, two real arrays of that shape are used.
    """
    xp = get_array_module(volume)
    real_t = volume.real.dtype.type
    out = xp.empty(volume.shape, volume.dtype) if out is None else out
    amplitude = xp.abs(volume)
    xp.maximum(amplitude, real_t(AMPLITUDE_FLOOR), out=amplitude)
    xp.log(amplitude, out=amplitude)
    xp.multiply(volume, volume.dtype.type(np.exp(-1j * (PHASE_CUT_RAD + math.pi))), out=out)  # the cut moved
    phase = xp.angle(out)  # from −π to PHASE_CUT_RAD
    phase += real_t(PHASE_CUT_RAD + math.pi)
    out.real[...] = amplitude
    out.imag[...] = phase
    return out


def cone_correction(volume: Any, cone: ConeFilter, out: Any = None) -> Any:
    """The change ``O·(exp(W ⊛ ln O − ln O) − 1)`` that removes the missing cone from ``volume``.

    The filter acts on the log-amplitude and the phase (:func:`log_transmission`), as fold_slice's does on the
    amplitude and the unwrapped phase: their depth means (the projected phase) are kept exactly, while a filter
    of ``O − 1`` averaged strong phases as complex numbers (our own PbTiO3, whose PbO and TiO2 planes differ by
    2 rad, fell from 0.98 to −0.38).

    Parameters
    ----------
    volume : (S, H, W) complex
        Object transmission; S must match ``cone``.
    out : (S, H, W) complex or None
        Where to write the correction (may be a strided view; must not overlap ``volume``); None: a new array.

    Returns
    -------
    (S, H, W) complex, of ``volume``'s dtype: ``out``, or a new array (``volume`` is not changed). Zero for one
    slice.
    """
    xp = get_array_module(volume)
    n_slices, _, width = volume.shape
    if len(cone.sigmas_px) != n_slices:
        raise ValueError(f"cone filter for {len(cone.sigmas_px)} slices, volume has {n_slices}")
    if out is not None and out.shape != volume.shape:
        raise ValueError(f"out has shape {out.shape}, volume {volume.shape}")
    spectrum = xp.empty_like(volume) if out is None else out
    for first in range(0, width, COLUMN_CHUNK):  # FFT along the slices, a block of columns at a time, in place
        block = slice(first, first + COLUMN_CHUNK)
        fft_axes(log_transmission(volume[:, :, block], out=spectrum[:, :, block]), (0,))
    for k, sigma in enumerate(cone.sigmas_px):
        if sigma == 0:  # the depth mean is measured: kept
            spectrum[k] = 0
        else:  # the change is minus the low-pass (what lies inside the cone's blind part)
            xp.negative(lateral_lowpass(spectrum[k], sigma, int(math.ceil(TRUNCATION_SIGMAS * sigma))),
                        out=spectrum[k])
    for first in range(0, width, COLUMN_CHUNK):
        block = slice(first, first + COLUMN_CHUNK)
        change = fft_axes(spectrum[:, :, block], (0,), inverse=True)
        xp.exp(change, out=change)
        change -= 1
        change *= volume[:, :, block]
    return spectrum
