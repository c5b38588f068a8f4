"""Virtual detector images of 4D-STEM frames: BF, ADF, centre of mass (DPC) and iDPC.

Pure array functions (numpy or CuPy through ``get_array_module``). Per frame: the bright-field sum
inside the disk of radius α, annular sums over [inner, outer] mrad and the centre of mass in mrad
relative to the zero-frequency pixel (D//2, D//2) (``docs/physics.md``). iDPC integrates a
scan-shaped CoM field and is not per frame.

Every per-frame value is a weighted sum of the frame's pixels, so :func:`detector_weights` builds the weights
once (one row per sum) and :func:`values_from_sums` turns the sums into values: :func:`frame_values` is the two
in one, and a worker (:mod:`ptylive.daemon.worker.virtual`) keeps the weights of its series and pays one
matrix-vector product per frame. :func:`kind_descriptions` says what each kind is (label, units, rings), for
rank 0's ``/virtual.json`` and the final file's ``virtual/`` group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VirtualDetector:
    """Where the virtual detectors lie, in mrad.

    Attributes
    ----------
    convergence_semiangle_mrad : float
        α: the bright-field disk's radius.
    detector_pixel_mrad : float
        The angle one detector pixel spans.
    annuli_mrad : tuple of (float, float)
        ADF rings [inner, outer) in mrad; ``adf0``, ``adf1``, … in this order.
    """

    convergence_semiangle_mrad: float
    detector_pixel_mrad: float
    annuli_mrad: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.convergence_semiangle_mrad <= 0 or self.detector_pixel_mrad <= 0:
            raise ValueError("convergence_semiangle_mrad and detector_pixel_mrad must be > 0")
        for inner, outer in self.annuli_mrad:
            if not 0 <= inner < outer:
                raise ValueError(f"annulus [{inner}, {outer}] mrad: need 0 <= inner < outer")


def default_detector(convergence_semiangle_mrad: float, detector_pixel_mrad: float,
                     detector_px: int) -> VirtualDetector:
    """One ADF ring from 1.5 α to the detector's edge (its inscribed circle)."""
    edge = edge_mrad(detector_pixel_mrad, detector_px)
    inner = 1.5 * convergence_semiangle_mrad
    annuli = ((inner, edge),) if edge > inner else ()
    return VirtualDetector(convergence_semiangle_mrad, detector_pixel_mrad, annuli)


def edge_mrad(detector_pixel_mrad: float, detector_px: int) -> float:
    """The radius of the frames' inscribed circle, ``(D // 2)·Δθ`` mrad: the largest whole ring a D-square frame
    holds."""
    return (detector_px // 2) * detector_pixel_mrad


def configured_detector(convergence_semiangle_mrad: float, detector_pixel_mrad: float, detector_px: int,
                        annuli_mrad: tuple[tuple[float, float], ...]) -> tuple[VirtualDetector, tuple[str, ...]]:
    """A detector with the given ADF rings, fitted to D-square frames: a ring reaching past the inscribed edge
    (:func:`edge_mrad`) is cut at it, so that every ring is a whole annulus (past the edge only the frame's corners
    would be summed); a ring wholly past it is left out (the later rings move up one ``adf`` index).

    Returns
    -------
    detector : VirtualDetector
    notes : tuple of str
        One sentence per ring cut or left out (empty when every ring fits).
    """
    edge = edge_mrad(detector_pixel_mrad, detector_px)
    kept: list[tuple[float, float]] = []
    notes: list[str] = []
    for inner, outer in annuli_mrad:
        if inner >= edge:
            notes.append(f"ADF ring {inner:g}–{outer:g} mrad left out: it lies past the frames' edge at {edge:g} mrad")
        elif outer > edge:
            notes.append(f"ADF ring {inner:g}–{outer:g} mrad cut to {inner:g}–{edge:g} mrad, the frames' edge")
            kept.append((inner, edge))
        else:
            kept.append((inner, outer))
    return VirtualDetector(convergence_semiangle_mrad, detector_pixel_mrad, tuple(kept)), tuple(notes)


def angles_mrad(detector_px: int, detector_pixel_mrad: float, xp: Any = np) -> tuple[Any, Any]:
    """Scattering angles (ky, kx) in mrad of each pixel, zero at (D//2, D//2); each (D, D)."""
    axis = (xp.arange(detector_px) - detector_px // 2) * detector_pixel_mrad
    return axis[:, None] + 0 * axis[None, :], 0 * axis[:, None] + axis[None, :]


#: The sums :func:`detector_weights` builds beyond the rings: the CoM numerators and the total intensity.
SUM_NAMES = ("com_x", "com_y", "total")


def detector_weights(detector: VirtualDetector, detector_px: int, xp: Any = np) -> tuple[tuple[str, ...], Any]:
    """The weights of every per-frame sum, one row each: ``frames.reshape(N, D·D) @ weights.T`` gives them all.

    Returns
    -------
    names : tuple of str
        ``bf``, ``adf0``…, then :data:`SUM_NAMES` (``com_x``, ``com_y``: Σ I·kx, Σ I·ky in mrad; ``total``: Σ I).
    weights : array, shape (len(names), D·D), float64
        In ``xp`` (numpy or CuPy).
    """
    ky, kx = angles_mrad(detector_px, detector.detector_pixel_mrad, xp)
    radius = xp.sqrt(ky * ky + kx * kx)
    rows = [radius <= detector.convergence_semiangle_mrad]
    rows += [(radius >= inner) & (radius < outer) for inner, outer in detector.annuli_mrad]
    rows += [kx, ky, xp.ones_like(radius)]
    names = ("bf", *(f"adf{j}" for j in range(len(detector.annuli_mrad))), *SUM_NAMES)
    return names, xp.stack([row.astype(xp.float64).reshape(-1) for row in rows])


def values_from_sums(names: tuple[str, ...], sums: Any) -> dict[str, Any]:
    """:func:`frame_values`' dict from the ``(N, len(names))`` sums of :func:`detector_weights`: the CoM
    numerators divided by the total (NaN for an empty frame); ``total`` itself is left out."""
    xp = get_array_module(sums)
    column = {name: sums[:, j] for j, name in enumerate(names)}
    total = column["total"]
    safe = xp.where(total != 0, total, xp.nan)
    values = {name: column[name] for name in names if name not in SUM_NAMES}
    values["com_x"] = column["com_x"] / safe
    values["com_y"] = column["com_y"] / safe
    return values


def frame_values(frames: Any, detector: VirtualDetector) -> dict[str, Any]:
    """Per-frame virtual detector values.

    Parameters
    ----------
    frames : array, shape (N, D, D)
        Diffraction intensities.
    detector : VirtualDetector

    Returns
    -------
    dict of str to array, each shape (N,)
        ``bf``, ``adf0``…, ``com_x``, ``com_y`` (mrad; NaN for an empty frame).
    """
    xp = get_array_module(frames)
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
        raise ValueError(f"frames must be (N, D, D), got {frames.shape}")
    names, weights = detector_weights(detector, frames.shape[1], xp)
    data = frames.reshape(frames.shape[0], -1).astype(xp.float64, copy=False)
    return values_from_sums(names, data @ weights.T)


def kind_descriptions(detector: VirtualDetector) -> dict[str, dict[str, Any]]:
    """What each virtual image is, in the order rank 0 lists them: ``label``, ``units`` (``counts``, ``mrad``, or
    ``mrad·px`` for iDPC, which is relative), ``inner_mrad`` and ``outer_mrad`` (bf: 0 and α; adf*: the ring; else
    None). The kinds are ``bf``, ``adf0``…, ``com_x``, ``com_y`` and ``idpc``."""
    alpha = detector.convergence_semiangle_mrad
    kinds: dict[str, dict[str, Any]] = {
        "bf": {"label": f"BF 0–{alpha:g} mrad", "units": "counts", "inner_mrad": 0.0, "outer_mrad": alpha}}
    for j, (inner, outer) in enumerate(detector.annuli_mrad):
        kinds[f"adf{j}"] = {"label": f"ADF {inner:g}–{outer:g} mrad", "units": "counts",
                            "inner_mrad": float(inner), "outer_mrad": float(outer)}
    for kind, label, units in (("com_x", "CoM x", "mrad"), ("com_y", "CoM y", "mrad"),
                               ("idpc", "iDPC", "mrad·px")):
        kinds[kind] = {"label": label, "units": units, "inner_mrad": None, "outer_mrad": None}
    return kinds


def integrated_dpc(com_x: Any, com_y: Any, step_x: float = 1.0, step_y: float = 1.0) -> Any:
    """iDPC: the scalar field whose gradient best matches (com_x, com_y), by Fourier integration.

    iDPC = F⁻¹[(kx F[com_x] + ky F[com_y]) / (i 2π |k|²)], the k = 0 term set to 0 (mean zero).

    Parameters
    ----------
    com_x, com_y : array, shape (rows, cols)
        Centre of mass along columns (x) and rows (y); NaN (no frame yet) is taken as 0.
    step_x, step_y : float
        Scan steps; the result is in CoM units × step units.

    Returns
    -------
    array, shape (rows, cols), real
    """
    xp = get_array_module(com_x, com_y)
    if com_x.shape != com_y.shape or com_x.ndim != 2:
        raise ValueError(f"com_x {com_x.shape} and com_y {com_y.shape} must be one 2D shape")
    rows, cols = com_x.shape
    kx = xp.fft.fftfreq(cols, d=step_x)[None, :]
    ky = xp.fft.fftfreq(rows, d=step_y)[:, None]
    k2 = kx * kx + ky * ky
    k2[0, 0] = 1.0
    fx = xp.fft.fft2(xp.nan_to_num(com_x.astype(xp.float64)))
    fy = xp.fft.fft2(xp.nan_to_num(com_y.astype(xp.float64)))
    spectrum = (kx * fx + ky * fy) / (2j * np.pi * k2)
    spectrum[0, 0] = 0.0
    return xp.fft.ifft2(spectrum).real
