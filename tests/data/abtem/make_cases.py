#!/usr/bin/env python
"""Independent test data for ptylive, simulated with abTEM (not with ptylive's own model).

Run with the python of a venv that has abTEM and h5py (not ptylive's venv)::

    python3 -m venv /work/abtem-venv && /work/abtem-venv/bin/pip install abtem h5py
    /work/abtem-venv/bin/python tests/data/abtem/make_cases.py            # every case
    /work/abtem-venv/bin/python tests/data/abtem/make_cases.py srtio3_perturbed
    /work/abtem-venv/bin/python tests/data/abtem/make_cases.py --crosscheck /tmp/xc.npz

It writes one scan file per case (and dose) next to itself, in ptylive's scan file format
(docs/scanfile.md) with h5py directly, plus scoring truth. README.md in this folder documents
the cases, the geometry and the conventions; what follows is the short version.

Geometry (every case)
---------------------
* The abTEM cell is a periodic supercell of lateral extent ``L`` (square, an integer number of
  unit cells). The reconstruction window is ``L / 3``: ``N = 64`` object pixels of
  ``pixel_size_A = L / (3 N)``.
* abTEM's far field is sampled at ``λ / L``. The detector keeps the central ``3N × 3N`` of those
  samples and sums them in 3×3 blocks (a real detector's pixel integrates intensity), so
  ``detector_pixel_mrad = 3 λ / L`` and ``pixel_size_A = λ / (N · Δθ)`` exactly (upsampling 1).
  The binning factor is odd, so the centre block is centred on zero frequency, which lands on
  detector pixel ``(N//2, N//2)``.
* The wave is simulated on ``M × M`` points over ``L`` (``M = 3 N × oversample`` = 432), i.e. at
  ``pixel_size_A / 2.25``: finer than the reconstruction pixel. abTEM's antialiasing aperture
  (2/3 of the simulation grid's Nyquist angle) lies outside the detector, corners included.
* Object pixel ``(r, c)`` of ptylive's grid sits at abTEM cell coordinates
  ``((r + o_r) p, (c + o_c) p)`` with integer offsets ``o`` (attribute ``truth_origin_px``):
  object pixel centres are at integer coordinates, and a probe at ``positions_px = (r, c)`` is an
  abTEM probe centred at that point (abTEM centres a probe on its scan position and samples the
  potential at ``x_i = i · Δ``, both checked).
* Truth: ``σ`` times abTEM's projected potential summed over all slices, averaged over the frozen
  phonon configurations, Fourier-cropped from the simulation grid to the reconstruction grid
  (exact band-limited resampling of the periodic cell, sample ``i`` at ``x = i p``), then cut to
  the object box of ptylive (the smallest box from pixel 0 holding every window of the nominal
  positions; where true positions differ, grown to hold their windows too).
  ``phase_truth_per_slice`` holds the same in depth groups of ``truth_slice_thickness_A``.
* Intensities: ``|FFT(exit wave)|²``, normalised so that the vacuum probe's whole far field sums
  to 1, averaged over phonon configurations, cropped and binned, then Poisson noise at
  ``dose · step²`` electrons per position (as abTEM's ``poisson_noise(dose_per_area=...)`` does for
  a scan of that step), stored as unsigned integer counts.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import abtem
import ase
import dask
import h5py
import numpy as np
from abtem.core.energy import energy2sigma, energy2wavelength

HERE = Path(__file__).resolve().parent
BINNING = 3  # detector pixel = 3x3 samples of abTEM's far field (odd: centred on zero frequency)


@dataclass(frozen=True)
class Case:
    """One simulated data set (one file per dose)."""

    name: str
    specimen: str  # "srtio3", "pbtio3" (the same cubic cell, Pb on the A site) or "graphene"
    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float  # abTEM's defocus = -C10 (positive: underfocus), = ptylive's defocus_A
    repeats_xy: tuple[int, int]  # supercell repeats (lateral)
    repeats_z: int  # unit cells along the beam (srtio3)
    scan_shape: tuple[int, int]
    step_A: float
    doses: tuple[float, ...]
    phonon_configs: int
    phonon_sigma_A: float
    seed: int
    detector_px: int = 64
    oversample: float = 2.25  # simulation grid = 3 N x oversample points over the cell (432 for N = 64)
    margin_px: float = 0.0  # extra object pixels before the first window (room for position errors)
    position_error_rms_A: float = 0.0  # random scan position errors (2-D rms)
    rotation_deg: float = 0.0  # global rotation of the true scan about its centre
    scale: float = 1.0  # global scale of the true scan about its centre
    group_slices: int = 4  # slices per depth group of phase_truth_per_slice
    # The true probe's aberrations beyond what the file says (an "unknown probe"): a defocus error (the true
    # defocus is defocus_A + this; the file holds defocus_A) and abTEM polar coefficients (e.g. C12, phi12, C30)
    defocus_error_A: float = 0.0
    probe_aberrations: tuple[tuple[str, float], ...] = ()
    committed: bool = True  # written by default and kept in tests/data/abtem/
    notes: str = ""

    def file_name(self, dose: float) -> str:
        if len(self.doses) == 1:
            return f"{self.name}.h5"
        return f"{self.name}_d{dose:.0e}".replace("e+0", "e").replace("e+", "e") + ".h5"


SRTIO3_A = 3.905

CASES = {
    "srtio3_thick": Case(
        name="srtio3_thick", specimen="srtio3", energy_eV=300e3, convergence_semiangle_mrad=20.0,
        defocus_A=+80.0, repeats_xy=(9, 9), repeats_z=16, scan_shape=(20, 20), step_A=0.40,
        doses=(1e4, 1e5, 1e6), phonon_configs=4, phonon_sigma_A=0.09, seed=20240601,
        notes="SrTiO3 [001], 16 unit cells (62.5 A) in 32 slices of a/2; underfocus (focus 80 A "
              "below the entrance surface)"),
    "srtio3_perturbed": Case(
        name="srtio3_perturbed", specimen="srtio3", energy_eV=300e3, convergence_semiangle_mrad=20.0,
        defocus_A=-60.0, repeats_xy=(9, 9), repeats_z=8, scan_shape=(20, 20), step_A=0.40,
        doses=(1e6,), phonon_configs=4, phonon_sigma_A=0.09, seed=20240602, margin_px=6.0,
        position_error_rms_A=0.35, rotation_deg=1.0, scale=1.015,
        notes="SrTiO3 [001], 8 unit cells (31.2 A) in 16 slices; overfocus; true positions = "
              "1.5 % scale and 1 deg rotation about the scan centre plus random errors (0.35 A rms)"),
    "graphene_lowdose": Case(
        name="graphene_lowdose", specimen="graphene", energy_eV=80e3, convergence_semiangle_mrad=25.0,
        defocus_A=-150.0, repeats_xy=(26, 15), repeats_z=1, scan_shape=(24, 24), step_A=0.60,
        doses=(1e4, 1e5), phonon_configs=4, phonon_sigma_A=0.08, seed=20240603, group_slices=1,
        notes="monolayer graphene with one Si substitution and one vacancy, 80 kV, overfocus"),
    # The thick crystal without thermal vibration (issue 11: "static and with frozen phonons"): one
    # configuration, every atom at its lattice site, so nothing in the data is incoherent.
    "srtio3_static": Case(
        name="srtio3_static", specimen="srtio3", energy_eV=300e3, convergence_semiangle_mrad=20.0,
        defocus_A=+80.0, repeats_xy=(9, 9), repeats_z=16, scan_shape=(20, 20), step_A=0.40,
        doses=(1e5,), phonon_configs=1, phonon_sigma_A=0.0, seed=20240605,
        notes="SrTiO3 [001], 16 unit cells (62.5 A) in 32 slices of a/2, static (no frozen phonons); "
              "underfocus"),
    # Close to issue 11's held-back description (about 80 A in 40 slices, 300 kV, 25 mrad, a 128-px
    # detector cropped from a finer grid, Poisson noise); reconstructed with half the slices in its test.
    "pbtio3_deep": Case(
        name="pbtio3_deep", specimen="pbtio3", energy_eV=300e3, convergence_semiangle_mrad=25.0,
        defocus_A=+100.0, repeats_xy=(12, 12), repeats_z=20, scan_shape=(16, 16), step_A=0.40,
        doses=(1e5,), phonon_configs=2, phonon_sigma_A=0.09, seed=20240604, detector_px=128,
        notes="cubic perovskite with Pb on the A site (PbTiO3 approximant, a = 3.905 A, no tetragonal "
              "distortion), 20 unit cells (78.1 A) in 40 slices of a/2; 128-px detector; underfocus"),
    # An unknown probe (issue 11: "unknown probe"): the true probe has 30 A more defocus than the file says,
    # two-fold astigmatism and some spherical aberration (about 2 rad and 0.6 rad at the aperture's edge);
    # the reconstruction builds its probe from the file's optics and must refine it.
    "srtio3_aberrated": Case(
        name="srtio3_aberrated", specimen="srtio3", energy_eV=300e3, convergence_semiangle_mrad=20.0,
        defocus_A=+60.0, repeats_xy=(9, 9), repeats_z=8, scan_shape=(20, 20), step_A=0.40,
        doses=(1e5,), phonon_configs=4, phonon_sigma_A=0.09, seed=20240606,
        defocus_error_A=30.0, probe_aberrations=(("C12", 30.0), ("phi12", 0.6), ("C30", 5e4)),
        notes="SrTiO3 [001], 8 unit cells (31.2 A) in 16 slices; underfocus; the true probe has 30 A more "
              "defocus than the file's, C12 = 30 A at 0.6 rad and C30 = 5 um, none of it in the file"),
}


# ----------------------------------------------------------------------------- specimens

def srtio3_atoms(case: Case) -> ase.Atoms:
    """SrTiO3 [001] supercell; atomic planes in the middle of the a/2 slices."""
    a = SRTIO3_A
    cell = ase.Atoms(
        "PbTiOOO" if case.specimen == "pbtio3" else "SrTiOOO",
        scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
        cell=[a, a, a], pbc=True)
    atoms = cell * (case.repeats_xy[0], case.repeats_xy[1], case.repeats_z)
    atoms.positions[:, 2] += a / 4  # planes at z = a/4 + k a/2: mid-slice, phonons never cross a boundary
    return atoms


def graphene_atoms(case: Case, defect_points_A: list[tuple[float, float]]) -> ase.Atoms:
    """Graphene in an orthogonal supercell strained (< 0.1 %) to a square cell; one Si, one vacancy.

    ``defect_points_A``: (x, y) points; the atom nearest the first becomes Si, the one nearest the
    second is removed.
    """
    a = 2.46
    b = a * math.sqrt(3)
    basis = [(0, 0), (a / 2, b / 6), (a / 2, b / 2), (0, 2 * b / 3)]
    nx, ny = case.repeats_xy
    side = 0.5 * (nx * a + ny * b)
    xy = np.array([(x + i * a, y + j * b) for i in range(nx) for j in range(ny) for x, y in basis])
    xy *= np.array([side / (nx * a), side / (ny * b)])
    thickness = 2.0
    atoms = ase.Atoms(["C"] * len(xy), positions=np.c_[xy, np.full(len(xy), thickness / 2)],
                      cell=[side, side, thickness], pbc=True)
    si = int(np.argmin(np.linalg.norm(xy - np.asarray(defect_points_A[0]), axis=1)))
    vacancy = int(np.argmin(np.linalg.norm(xy - np.asarray(defect_points_A[1]), axis=1)))
    numbers = atoms.get_atomic_numbers()
    numbers[si] = 14
    atoms.set_atomic_numbers(numbers)
    del atoms[vacancy]
    return atoms


# ----------------------------------------------------------------------------- geometry

@dataclass
class Geometry:
    wavelength_A: float
    cell_A: float  # lateral extent L of the (square) abTEM cell
    detector_px: int  # N
    pixel_size_A: float  # p = L / (3 N)
    detector_pixel_mrad: float  # 3 lambda / L in mrad
    sim_gpts: int  # M
    slice_thickness_A: float
    n_slices: int
    positions_px: np.ndarray  # nominal (n, 2)
    positions_true_px: np.ndarray
    object_shape: tuple[int, int]  # of the truth: ptylive's box of the nominal (and true) positions
    origin_px: tuple[int, int]  # object pixel (0, 0) = cell grid point origin_px (cell grid: 3N points)

    @property
    def grid_px(self) -> int:
        return BINNING * self.detector_px

    def to_cell_A(self, positions_px: np.ndarray) -> np.ndarray:
        return (np.asarray(positions_px) + np.asarray(self.origin_px)) * self.pixel_size_A


def object_shape_for(positions_px: np.ndarray, window_px: int) -> tuple[int, int]:
    """ptylive's object box (streaming/scanfile.py): smallest box from pixel 0 holding every window."""
    ends = np.floor(positions_px).astype(np.int64) - window_px // 2 + window_px
    return int(ends[:, 0].max()), int(ends[:, 1].max())


def make_geometry(case: Case) -> Geometry:
    lam = energy2wavelength(case.energy_eV)
    if case.specimen in ("srtio3", "pbtio3"):
        cell = case.repeats_xy[0] * SRTIO3_A
        dz, n_slices = SRTIO3_A / 2, 2 * case.repeats_z
    else:
        cell = 0.5 * (case.repeats_xy[0] * 2.46 + case.repeats_xy[1] * 2.46 * math.sqrt(3))
        dz, n_slices = 2.0, 1
    n = case.detector_px
    pixel = cell / (BINNING * n)
    dtheta = BINNING * lam / cell
    step_px = case.step_A / pixel
    rows = np.arange(case.scan_shape[0]) * step_px
    cols = np.arange(case.scan_shape[1]) * step_px
    nominal = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    nominal = nominal + n // 2 + case.margin_px + np.array([0.37, 0.61])  # sub-pixel start
    rng = np.random.default_rng(case.seed + 7)
    centre = nominal.mean(axis=0)
    angle = math.radians(case.rotation_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    true = centre + case.scale * (nominal - centre) @ rotation.T
    if case.position_error_rms_A > 0:
        errors = rng.normal(size=nominal.shape)
        errors -= errors.mean(axis=0)
        errors *= case.position_error_rms_A / pixel / math.sqrt(np.mean(np.sum(errors**2, axis=1)))
        true = true + errors
    # truth box: ptylive's object box for the nominal positions, grown (never shifted: both start
    # at pixel 0) to hold the true positions' windows too, so a reconstruction from either fits
    shape = tuple(max(a, b) for a, b in zip(object_shape_for(nominal, n), object_shape_for(true, n), strict=True))
    if (np.floor(true).astype(int) - n // 2 < 0).any():
        raise ValueError("a true position's window starts before pixel 0: raise margin_px")
    grid = BINNING * n
    if max(shape) + 2 * case.margin_px > grid:
        raise ValueError(f"object {shape} does not fit the {grid}-px cell grid")
    origin = ((grid - shape[0]) // 2, (grid - shape[1]) // 2)
    sim_gpts = int(round(BINNING * n * case.oversample))
    check_antialias(lam, cell / sim_gpts, dtheta, n)
    return Geometry(lam, cell, n, pixel, dtheta * 1e3, sim_gpts, dz, n_slices, nominal, true, shape, origin)


def check_antialias(wavelength: float, sim_sampling_A: float, dtheta: float, n: int) -> None:
    """abTEM band-limits the wave to 2/3 of the grid's Nyquist angle: that must clear the detector's corners."""
    cutoff = abtem.config.get("antialias.cutoff") * wavelength / (2 * sim_sampling_A)
    corner = math.sqrt(2) * (n // 2 + 0.5) * dtheta
    if cutoff <= corner:
        raise ValueError(f"antialias cutoff {cutoff * 1e3:.1f} mrad inside the detector's corner "
                         f"{corner * 1e3:.1f} mrad: raise oversample")


# ----------------------------------------------------------------------------- simulation

def fourier_resample(image: np.ndarray, n_out: int) -> np.ndarray:
    """Band-limited resampling of a periodic (..., M, M) image to (..., n_out, n_out).

    Sample i of the output lies at the same point as sample i * M / n_out of the input (both grids
    start at the cell origin). The Nyquist row/column of the output is dropped (kept real).
    """
    m = image.shape[-1]
    spectrum = np.fft.fft2(image)
    k = np.fft.fftfreq(m, 1.0 / m).astype(int)
    keep = np.abs(k) < n_out / 2
    idx = np.flatnonzero(keep)
    out = np.zeros((*image.shape[:-2], n_out, n_out), complex)
    kk = k[idx] % n_out
    out[..., kk[:, None], kk[None, :]] = spectrum[..., idx[:, None], idx[None, :]]
    return np.fft.ifft2(out).real * (n_out / m) ** 2


def detector_frames(exit_waves: np.ndarray, n: int, binning: int, norm: float) -> np.ndarray:
    """|FFT|² of exit waves (B, M, M): central (binning·n)² samples summed in binning² blocks."""
    m = exit_waves.shape[-1]
    intensity = np.abs(np.fft.fft2(exit_waves)) ** 2 / norm
    intensity = np.fft.fftshift(intensity, axes=(-2, -1))  # zero frequency at m // 2
    start = m // 2 - binning * (n // 2) - binning // 2
    crop = intensity[:, start:start + binning * n, start:start + binning * n]
    return crop.reshape(len(crop), n, binning, n, binning).sum(axis=(2, 4))


def make_probe(case: Case, geom: Geometry, **kwargs) -> abtem.Probe:
    """The true probe: the file's optics plus the case's defocus error and aberrations (not in the file)."""
    extra = {"aberrations": dict(case.probe_aberrations)} if case.probe_aberrations else {}
    return abtem.Probe(energy=case.energy_eV, semiangle_cutoff=case.convergence_semiangle_mrad,
                       defocus=case.defocus_A + case.defocus_error_A, gpts=(geom.sim_gpts, geom.sim_gpts),
                       extent=(geom.cell_A, geom.cell_A), **extra, **kwargs)


def vacuum_norm(probe: abtem.Probe) -> float:
    wave = np.asarray(probe.build(scan=abtem.CustomScan([[0.0, 0.0]])).compute(progress_bar=False).array)
    return float(np.sum(np.abs(np.fft.fft2(wave.reshape(wave.shape[-2:]))) ** 2))


def simulate_case(case: Case, chunk: int = 50) -> dict:
    t0 = time.perf_counter()
    geom = make_geometry(case)
    if case.specimen in ("srtio3", "pbtio3"):
        atoms = srtio3_atoms(case)
    else:  # defects near the middle of the scanned field of view
        centre_px = geom.positions_px.mean(axis=0)
        si = geom.to_cell_A(centre_px + np.array([-6.0, -5.0]))
        vac = geom.to_cell_A(centre_px + np.array([7.0, 6.0]))
        atoms = graphene_atoms(case, [tuple(si), tuple(vac)])
    assert np.allclose(np.diag(atoms.cell)[:2], geom.cell_A), (atoms.cell, geom.cell_A)
    sigma = energy2sigma(case.energy_eV)
    probe = make_probe(case, geom)
    norm = vacuum_norm(probe)
    positions_A = geom.to_cell_A(geom.positions_true_px) % geom.cell_A
    n_pos, n, grid = len(positions_A), geom.detector_px, geom.grid_px
    groups = max(1, geom.n_slices // case.group_slices)
    intensities = np.zeros((n_pos, n, n), np.float64)
    truth_groups = np.zeros((groups, grid, grid), np.float64)
    # a static case (sigma 0) is its one configuration, the lattice itself
    phonons = [atoms] if case.phonon_sigma_A == 0 else abtem.FrozenPhonons(
        atoms, num_configs=case.phonon_configs, sigmas=case.phonon_sigma_A, seed=case.seed)
    for config, displaced in enumerate(phonons):
        potential = abtem.Potential(displaced, gpts=(geom.sim_gpts, geom.sim_gpts),
                                    slice_thickness=geom.slice_thickness_A, projection="infinite")
        built = potential.build().compute(progress_bar=False)
        slices = np.asarray(built.array, dtype=np.float64)
        assert slices.shape[0] == geom.n_slices, (slices.shape, geom.n_slices)
        grouped = slices.reshape(groups, -1, *slices.shape[-2:]).sum(axis=1)
        truth_groups += sigma * fourier_resample(grouped, grid) / case.phonon_configs
        for first in range(0, n_pos, chunk):
            scan = abtem.CustomScan(positions_A[first:first + chunk])
            exit_waves = probe.multislice(built, scan=scan).compute(progress_bar=False)
            waves = np.asarray(exit_waves.array).reshape(-1, geom.sim_gpts, geom.sim_gpts)
            intensities[first:first + chunk] += detector_frames(waves, n, BINNING, norm) / case.phonon_configs
        print(f"  {case.name}: phonon configuration {config + 1}/{case.phonon_configs} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    o_r, o_c = geom.origin_px
    h, w = geom.object_shape
    truth_groups = truth_groups[:, o_r:o_r + h, o_c:o_c + w]
    return {"case": case, "geometry": geom, "intensities": intensities, "truth_groups": truth_groups,
            "seconds": time.perf_counter() - t0, "n_atoms": len(atoms)}


def write_case(result: dict, out_dir: Path) -> list[Path]:
    case: Case = result["case"]
    geom: Geometry = result["geometry"]
    truth_groups = result["truth_groups"].astype(np.float32)
    written = []
    for i, dose in enumerate(case.doses):
        rng = np.random.default_rng([case.seed, i])
        electrons = dose * case.step_A**2
        counts = rng.poisson(result["intensities"] * electrons)
        dtype = np.uint16 if counts.max() < 2**16 else np.uint32
        path = out_dir / case.file_name(dose)
        with h5py.File(path, "w") as f:
            attrs = {
                "energy_eV": case.energy_eV,
                "convergence_semiangle_mrad": case.convergence_semiangle_mrad,
                "defocus_A": case.defocus_A,
                "pixel_size_A": geom.pixel_size_A,
                "detector_pixel_mrad": geom.detector_pixel_mrad,
                "slice_thickness_A": geom.slice_thickness_A,
                "n_slices": geom.n_slices,
                "upsampling": 1,
                "truth_slice_thickness_A": geom.slice_thickness_A * (geom.n_slices // len(truth_groups)),
                "truth_origin_px": np.asarray(geom.origin_px, np.int64),
                "thickness_A": geom.slice_thickness_A * geom.n_slices,
                "dose_e_per_A2": dose,
                "electrons_per_position": electrons,
                "scan_shape": np.asarray(case.scan_shape, np.int64),
                "scan_step_A": case.step_A,
                "frozen_phonon_configs": case.phonon_configs,
                "frozen_phonon_sigma_A": case.phonon_sigma_A,
                "position_error_rms_A": case.position_error_rms_A,
                "scan_rotation_deg": case.rotation_deg,
                "scan_scale": case.scale,
                "true_defocus_error_A": case.defocus_error_A,
                "true_probe_aberrations": ", ".join(f"{k} = {v:g}" for k, v in case.probe_aberrations) or "none",
                "simulation_cell_A": geom.cell_A,
                "simulation_gpts": geom.sim_gpts,
                "simulation_sampling_A": geom.cell_A / geom.sim_gpts,
                "detector_binning": BINNING,
                "case": case.name,
                "specimen": case.notes,
                "simulator": f"abTEM {abtem.__version__} (ase {ase.__version__}), "
                             "tests/data/abtem/make_cases.py",
                "seed": case.seed,
            }
            f.attrs.update(attrs)
            f.create_dataset("intensities", data=counts.astype(dtype), chunks=(1, geom.detector_px, geom.detector_px),
                             compression="gzip", compression_opts=9, shuffle=True)
            f.create_dataset("positions_px", data=geom.positions_px.astype(np.float64))
            if case.position_error_rms_A > 0 or case.rotation_deg or case.scale != 1.0:
                f.create_dataset("positions_true_px", data=geom.positions_true_px.astype(np.float64))
            f.create_dataset("projected_phase_truth", data=truth_groups.sum(axis=0),
                             compression="gzip", compression_opts=9, shuffle=True)
            f.create_dataset("phase_truth_per_slice", data=truth_groups,
                             compression="gzip", compression_opts=9, shuffle=True)
        rms = math.sqrt(np.mean(np.sum((geom.positions_true_px - geom.positions_px) ** 2, axis=1))) * geom.pixel_size_A
        shown = path.relative_to(HERE.parents[2]) if path.is_relative_to(HERE.parents[2]) else path
        print(f"wrote {shown}"
              f"  {path.stat().st_size / 1e6:.2f} MB  {len(counts)} x {geom.detector_px}^2 {np.dtype(dtype).name}"
              f"  dose {dose:.0e} e/A^2 ({electrons:.3g} e/position, max count {counts.max()})"
              f"  object {geom.object_shape}  pixel {geom.pixel_size_A:.5f} A"
              f"  dtheta {geom.detector_pixel_mrad:.5f} mrad"
              f"  slices {geom.n_slices} x {geom.slice_thickness_A:.4f} A  truth groups {len(truth_groups)}"
              f"  true-nominal rms {rms:.3f} A", flush=True)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- cross-check inputs

def crosscheck(out: Path) -> None:
    """abTEM's side of the forward-model cross-check (compared by crosscheck.py in ptylive's venv).

    Every test uses a single probe position and abTEM's default (Lobato) potentials:
      vacuum_*   : cell = window (64 px at the srtio3_thick pixel), simulated 3x finer, hard
                   aperture; real-space probe (complex, Fourier-resampled to the window) and the
                   far field, for defocus +80 and -80 A.
      thin_*     : one slice of random light and heavy atoms (no symmetry), same cell, probe at a
                   sub-pixel position; abTEM's far field and the potential on ptylive's grid.
      multi_*    : four such slices 10 A apart (propagation matters).
      binned_*   : the production geometry (cell = 3 windows, 2.25x finer simulation, soft aperture,
                   3x3 binning) with a thin object.
    """
    base = CASES["srtio3_thick"]
    data: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(5)
    for label, cell_windows, oversample, soft, n_layers in (
            ("vacuum", 1, 3, False, 0), ("thin", 1, 3, False, 1), ("multi", 1, 3, False, 4),
            ("binned", 3, 2.25, True, 1), ("crystal", 3, 2.25, True, 2)):
        n = base.detector_px
        case = replace(base, oversample=oversample)
        geom = make_geometry(case)
        window_A = n * geom.pixel_size_A
        cell = window_A * cell_windows
        m = int(round(n * cell_windows * oversample))
        check_antialias(geom.wavelength_A, cell / m, geom.detector_pixel_mrad * 1e-3, n)
        binning = cell_windows
        position_px = np.array([n // 2 + 0.3, n // 2 + 0.65]) + (n if cell_windows == 3 else 0)
        position_A = position_px * geom.pixel_size_A
        layers = []
        if label == "crystal":  # the first unit cell of srtio3_thick: SrO and TiO2 planes
            atoms = srtio3_atoms(replace(case, repeats_z=1))
            dz = SRTIO3_A / 2
            built = abtem.Potential(atoms, gpts=(m, m), slice_thickness=dz,
                                    projection="infinite").build().compute(progress_bar=False)
            data[f"{label}_potential"] = fourier_resample(np.asarray(built.array, np.float64), n * cell_windows)
            data[f"{label}_dz"] = np.array(dz)
        elif n_layers:
            dz = 10.0
            numbers, positions = [], []
            for layer in range(n_layers):
                k = 9 * cell_windows**2  # about one atom per 15 A^2
                xy = rng.uniform(0, cell, size=(k, 2))
                numbers += list(rng.choice([6, 8, 14, 22, 38], size=k))
                positions += [(x, y, dz * layer + dz / 2) for x, y in xy]
            atoms = ase.Atoms(numbers=numbers, positions=positions, cell=[cell, cell, dz * n_layers], pbc=True)
            potential = abtem.Potential(atoms, gpts=(m, m), slice_thickness=dz, projection="infinite")
            built = potential.build().compute(progress_bar=False)
            slices = np.asarray(built.array, np.float64)
            layers = fourier_resample(slices, n * cell_windows)
            data[f"{label}_potential"] = layers
            data[f"{label}_dz"] = np.array(dz)
        for defocus in (80.0, -80.0):
            probe = abtem.Probe(energy=base.energy_eV, semiangle_cutoff=base.convergence_semiangle_mrad,
                                defocus=defocus, gpts=(m, m), extent=(cell, cell), soft=soft)
            norm = vacuum_norm(probe)
            key = f"{label}_{'p' if defocus > 0 else 'm'}"
            scan = abtem.CustomScan([position_A])
            if n_layers:
                waves = probe.multislice(built, scan=scan).compute(progress_bar=False)
            else:
                waves = probe.build(scan=scan).compute(progress_bar=False)
            wave = np.asarray(waves.array).reshape(1, m, m)
            data[f"{key}_pattern"] = detector_frames(wave, n, binning, norm)[0]
            vacuum = np.asarray(probe.build(scan=scan).compute(progress_bar=False).array).reshape(1, m, m)
            data[f"{key}_vacuum"] = detector_frames(vacuum, n, binning, norm)[0]
            if label == "vacuum":
                spectrum = np.fft.fft2(wave[0])
                k = np.fft.fftfreq(m, 1.0 / m).astype(int)
                idx = np.flatnonzero(np.abs(k) < n / 2)
                small = np.zeros((n, n), complex)
                small[np.ix_(k[idx] % n, k[idx] % n)] = spectrum[np.ix_(idx, idx)]
                data[f"{key}_probe"] = np.fft.ifft2(small)
        data[f"{label}_position_px"] = position_px
        data[f"{label}_binning"] = np.array(binning)
    data["energy_eV"] = np.array(base.energy_eV)
    data["convergence_semiangle_mrad"] = np.array(base.convergence_semiangle_mrad)
    data["pixel_size_A"] = np.array(make_geometry(base).pixel_size_A)
    data["detector_px"] = np.array(base.detector_px)
    data["sigma"] = np.array(energy2sigma(base.energy_eV))
    np.savez_compressed(out, **data)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"cases to write (default: the committed ones of {', '.join(CASES)})")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    parser.add_argument("--threads", type=int, default=2, help="FFT threads (default 2)")
    parser.add_argument("--crosscheck", type=Path, help="write the abTEM side of the cross-check to this .npz")
    args = parser.parse_args()
    abtem.config.set({"device": "cpu", "fft": "fftw", "fftw.threads": args.threads,
                      "fftw.planning_effort": "FFTW_ESTIMATE", "precision": "float32",
                      "diagnostics.progress_bar": False})
    dask.config.set(scheduler="synchronous")
    if args.crosscheck:
        crosscheck(args.crosscheck)
        return
    names = args.cases or [name for name, case in CASES.items() if case.committed]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    print(f"abTEM {abtem.__version__}, ase {ase.__version__}, numpy {np.__version__}, h5py {h5py.__version__}")
    for name in names:
        result = simulate_case(CASES[name])
        write_case(result, args.out)
        print(f"  {name}: {result['n_atoms']} atoms, {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
