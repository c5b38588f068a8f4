"""Simulated 4D-STEM scans of a perovskite crystal for tests, demos and benchmarks.

The object is ``exp(i σ v_s)`` per slice, with ``v_s`` the parametrised
projected potential of :mod:`ptylive.gpu.potential`; the data are the
multislice far fields of :mod:`ptylive.gpu.multislice` on the same grid
(the reconstruction's own model, so noise-free data are exactly
reproducible), with optional Poisson noise at a given dose.

A partially coherent beam (``focal_spread_A > 0``: the chromatic focal spread, a Gaussian
distribution of defocus) is the incoherent sum over the probes of :func:`source_probes`, the
model of ``K`` probe modes (:mod:`ptylive.gpu.multislice`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ptylive.gpu.loss import model_intensity
from ptylive.gpu.multislice import forward
from ptylive.gpu.patches import extract_patches, window_starts
from ptylive.gpu.physics import interaction_constant_per_VA, real_space_pixel_size_A, wavelength_A
from ptylive.gpu.potential import perovskite_potential_slices
from ptylive.gpu.probe import ProbeOptics, make_probe
from ptylive.gpu.propagation import fresnel_propagator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSpec:
    """A simulated scan.

    Defaults: PbTiO3 [001] at 200 kV, 3 slices of half a unit cell (one atomic
    plane each), 48-px window at 0.26 Å, 20×16 positions 3 px apart, object
    105×93 px. At 4 ranks a tile (≈ 53×47 px) is smaller than the window, so
    halos and exchange regions are non-trivial; 30 iterations take seconds.
    """

    energy_eV: float = 200e3
    convergence_semiangle_mrad: float = 25.0
    defocus_A: float = 40.0
    c30_A: float = 0.0
    detector_px: int = 48
    upsampling: int = 1
    detector_pixel_mrad: float = 2.0
    n_slices: int = 3
    slice_thickness_A: float = 1.9525
    scan_shape: tuple[int, int] = (20, 16)
    scan_step_px: float = 3.0
    a_site: str = "Pb"
    b_site: str = "Ti"
    x_site: str = "O"
    lattice_A: float = 3.905
    dose_e_per_A2: float | None = None
    seed: int = 0
    focal_spread_A: float = 0.0  # standard deviation of the defocus; 0: a coherent beam
    focal_spread_samples: int = 3  # Gauss-Hermite nodes of the defocus distribution when focal_spread_A > 0

    @property
    def window_px(self) -> int:
        return self.detector_px * self.upsampling

    @property
    def pixel_size_A(self) -> float:
        return real_space_pixel_size_A(self.energy_eV, self.window_px, self.detector_pixel_mrad)


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` returns: a scan file's contents (see :mod:`ptylive.streaming.scanfile`).

    Attributes
    ----------
    metadata : dict[str, float]
        The scan file's root attributes: ``energy_eV``, ``convergence_semiangle_mrad``, ``defocus_A``,
        ``pixel_size_A``, ``detector_pixel_mrad``, ``slice_thickness_A``, ``n_slices``, ``upsampling``.
    intensities : (n, D, D) float32
        Far-field intensities, zero frequency at the centre; counts when a dose was given.
    positions_px : (n, 2) float64
        Probe centres (row, col) in object pixels.
    probe : (N, N) complex64
        The real-space probe of the nominal optics, ``N = D * upsampling`` (with a focal spread the
        data are the incoherent sum over :func:`source_probes`).
    object_truth : (S, H, W) complex64
        The transmission of each slice.
    """

    metadata: dict[str, float]
    intensities: npt.NDArray[np.float32]
    positions_px: npt.NDArray[np.float64]
    probe: npt.NDArray[np.complex64]
    object_truth: npt.NDArray[np.complex64]


def scan_positions(spec: SimulationSpec) -> np.ndarray:
    """Raster positions ``(n, 2)`` in object pixels; the first window starts at pixel 0."""
    rows = np.arange(spec.scan_shape[0]) * spec.scan_step_px
    cols = np.arange(spec.scan_shape[1]) * spec.scan_step_px
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    return grid + spec.window_px // 2 + 0.5


def source_probes(spec: SimulationSpec) -> np.ndarray:
    """The beam as incoherent probes: (N, N) coherent, or (K, N, N) over a Gaussian focal spread.

    With ``focal_spread_A = σ > 0`` the defocus is sampled at the ``K = focal_spread_samples``
    Gauss-Hermite nodes ``Δf + σ x_i`` of the normal distribution, and probe ``i`` carries the node's
    weight ``w_i`` (``Σ w_i = 1``) as its power: ``Σ_i Σ|P_i|² = 1``, and ``Σ_i w_i |Ψ(Δf + σ x_i)|²``
    is exact for intensities polynomial in the defocus up to degree ``2K − 1``.

    Returns
    -------
    (N, N) or (K, N, N) complex128
    """
    pixel = spec.pixel_size_A

    def probe_at(defocus_A: float) -> np.ndarray:
        optics = ProbeOptics(spec.energy_eV, spec.convergence_semiangle_mrad, defocus_A, spec.c30_A)
        return np.asarray(make_probe(optics, spec.window_px, pixel, dtype=np.complex128))

    if not spec.focal_spread_A > 0:
        return probe_at(spec.defocus_A)
    if spec.focal_spread_samples < 1:
        raise ValueError(f"focal_spread_samples must be >= 1, got {spec.focal_spread_samples}")
    nodes, weights = np.polynomial.hermite_e.hermegauss(spec.focal_spread_samples)
    weights = weights / weights.sum()
    return np.stack([np.sqrt(w) * probe_at(spec.defocus_A + spec.focal_spread_A * x)
                     for x, w in zip(nodes, weights, strict=True)])


def simulate(spec: SimulationSpec, batch_size: int = 64,
             on_batch: Callable[[int, int], None] | None = None) -> Simulation:
    """Simulate a scan.

    Parameters
    ----------
    spec : SimulationSpec
        The crystal, optics and raster.
    batch_size : int
        Positions propagated at once.
    on_batch : callable or None
        ``on_batch(done, total)`` after each batch: positions simulated so far, of all (progress).

    Returns
    -------
    Simulation
        Metadata, intensities (counts when ``spec.dose_e_per_A2`` is given), positions, probe and truth.
    """
    n = spec.window_px
    pixel = spec.pixel_size_A
    positions = scan_positions(spec)
    shape = (int(np.floor(positions[:, 0].max())) - n // 2 + n, int(np.floor(positions[:, 1].max())) - n // 2 + n)
    potential = perovskite_potential_slices(shape, pixel, spec.n_slices, spec.slice_thickness_A,
                                            lattice_A=spec.lattice_A, a_site=spec.a_site,
                                            b_site=spec.b_site, x_site=spec.x_site,
                                            origin_A=(-1.3, -0.7), dtype=np.float64)
    truth = np.exp(1j * interaction_constant_per_VA(spec.energy_eV) * potential)
    optics = ProbeOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.c30_A)
    probe = make_probe(optics, n, pixel, dtype=np.complex128)
    beam = source_probes(spec)
    propagator = fresnel_propagator(np, n, pixel, wavelength_A(spec.energy_eV), spec.slice_thickness_A,
                                    dtype=np.complex128)
    starts, shifts = window_starts(positions, n)
    intensities = np.empty((len(positions), spec.detector_px, spec.detector_px), np.float32)
    for b in range(0, len(positions), batch_size):
        sl = slice(b, b + batch_size)
        field = forward(beam, shifts[sl], extract_patches(truth, starts[sl], n), propagator, spec.detector_px)
        intensities[sl] = np.abs(field) ** 2 if field.ndim == 3 else model_intensity(field)
        if on_batch is not None:
            on_batch(min(b + batch_size, len(positions)), len(positions))
    if spec.dose_e_per_A2 is not None:
        step_A = spec.scan_step_px * pixel
        electrons = spec.dose_e_per_A2 * step_A**2
        rng = np.random.default_rng(spec.seed)
        intensities = rng.poisson(intensities * electrons).astype(np.float32)
    metadata: dict[str, float] = {
        "energy_eV": spec.energy_eV, "convergence_semiangle_mrad": spec.convergence_semiangle_mrad,
        "defocus_A": spec.defocus_A, "pixel_size_A": pixel, "detector_pixel_mrad": spec.detector_pixel_mrad,
        "slice_thickness_A": spec.slice_thickness_A, "n_slices": spec.n_slices,
        "upsampling": spec.upsampling,
    }
    logger.info("simulated %d positions, object %s x %d slices, window %d px at %.4f A",
                len(positions), shape, spec.n_slices, n, pixel)
    return Simulation(metadata=metadata, intensities=intensities, positions_px=positions,
                      probe=probe.astype(np.complex64), object_truth=truth.astype(np.complex64))
