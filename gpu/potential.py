"""Parametrised projected atomic potentials and a perovskite [001] specimen.

The projected potential of a neutral atom follows Kirkland's parametrisation
(E. J. Kirkland, *Advanced Computing in Electron Microscopy*, 2nd ed.,
Springer 2010, Appendix C; 3 Lorentzians + 3 Gaussians):

    v_z(r) = 4 pi^2 a0 e  sum_i a_i K0(2 pi r sqrt(b_i))
           + 2 pi^2 a0 e  sum_i (c_i / d_i) exp(-pi^2 r^2 / d_i)

with a0 = 0.5292 A (Bohr radius) and e = 14.4 V A, giving v_z in V A.

Source of the parameter values: Kirkland's ``fparams.dat`` table, as shipped by
abTEM in ``abtem/parametrizations/data/kirkland.json`` (github.com/abTEM/abTEM,
commit 7554b9e9fba88139e13d8da84fe6ed976f5c5c97, layout [a(3), b(3), c(3),
d(3)]), cross-checked digit by digit against the hard-coded ``fparams[Z][0..11]``
table of Kirkland's C library (order a1 b1 a2 b2 a3 b3 c1 d1 c2 d2 c3 d3, the
order used below) as embedded in EMAN's ``pdb2mrc.C``. a_i in A^-1, b_i in
A^-2, c_i in A, d_i in A^2 (electron scattering factor convention
f_e(q) = sum a_i/(q^2 + b_i) + c_i exp(-d_i q^2), q in 1/A).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.special import k0

logger = logging.getLogger(__name__)

__all__ = ["BOHR_RADIUS_A", "ELECTRON_CHARGE_VA", "KIRKLAND_PARAMS", "SYMBOL_TO_Z", "element_z",
           "kirkland_abcd", "projected_potential_VA", "perovskite_potential_slices"]

BOHR_RADIUS_A = 0.5292
ELECTRON_CHARGE_VA = 14.4

#: Kirkland (2010) Appendix C, Z -> (a1, b1, a2, b2, a3, b3, c1, d1, c2, d2, c3, d3).
KIRKLAND_PARAMS: dict[int, tuple[float, ...]] = {
    8: (3.39969204e-001, 3.81570280e-001, 3.07570172e-001, 3.81571436e-001,
        1.30369072e-001, 1.91919745e+001, 8.83326058e-002, 7.60635525e-001,
        1.96586700e-001, 2.07401094e+000, 9.96220028e-004, 3.03266869e-002),
    20: (3.66902871e-001, 6.14274129e-002, 8.66378999e-001, 5.70881727e-001,
         6.67203300e-001, 7.82965639e+000, 4.87743636e-001, 1.32531318e+000,
         1.82406314e+000, 2.10056032e+001, 2.20248453e-002, 9.11853450e-002),
    22: (3.62383267e-001, 7.54707114e-002, 9.84232966e-001, 4.97757309e-001,
         7.41715642e-001, 8.17659391e+000, 3.62555269e-001, 9.55524906e-001,
         1.49159390e+000, 1.62221677e+001, 1.61659509e-002, 7.33140839e-002),
    25: (3.26697613e-001, 8.88813083e-002, 7.17297000e-001, 1.11300198e+001,
         1.33212464e+000, 5.82141104e-001, 2.80801702e-001, 6.71583145e-001,
         1.15499241e+000, 1.26825395e+001, 1.11984488e-002, 5.32334467e-002),
    26: (3.13454847e-001, 8.99325756e-002, 6.89290016e-001, 1.30366038e+001,
         1.47141531e+000, 6.33345291e-001, 1.03298688e+000, 1.16783425e+001,
         2.58280285e-001, 6.09116446e-001, 1.03460690e-002, 4.81610627e-002),
    38: (1.37373086e-002, 1.87469061e-002, 1.97548672e+000, 6.36079230e+000,
         1.59261029e+000, 2.21992482e-001, 1.73263882e-001, 2.01624958e-001,
         4.66280378e+000, 2.53027803e+001, 1.61265063e-003, 1.53610568e-002),
    40: (2.64365505e+000, 2.20202699e+000, 5.54225147e-001, 1.78260107e+002,
         7.61376625e-001, 7.67218745e-002, 6.02946891e-003, 1.55143296e-002,
         9.91630530e-002, 1.76175995e-001, 9.56782020e-001, 1.54330682e+000),
    56: (3.19434243e+000, 9.27352241e+000, 1.98289586e+000, 2.28741632e-001,
         1.55121052e-001, 3.82000231e-002, 6.73222354e-002, 7.30961745e-002,
         4.48474211e+000, 2.95703565e+001, 5.42674414e-001, 4.08647015e-001),
    57: (2.05036425e+000, 2.20348417e-001, 1.42114311e-001, 3.96438056e-002,
         3.23538151e+000, 9.56979169e+000, 6.34683429e-002, 6.92443091e-002,
         3.97960586e+000, 2.53178406e+001, 5.20116711e-001, 3.83614098e-001),
    82: (1.00795975e+000, 1.17268427e-001, 3.09796153e+000, 8.80453235e-001,
         3.61296864e+000, 1.47325812e+001, 2.62401476e-001, 1.43491014e-001,
         4.05621995e-001, 1.04103506e+000, 1.31812509e-002, 2.39575415e-002),
}

SYMBOL_TO_Z: dict[str, int] = {
    "O": 8, "Ca": 20, "Ti": 22, "Mn": 25, "Fe": 26,
    "Sr": 38, "Zr": 40, "Ba": 56, "La": 57, "Pb": 82,
}

#: Default lower clamp on r (A) for :func:`projected_potential_VA`.
DEFAULT_R_MIN_A = 1e-3


def element_z(element: int | str) -> int:
    """Return the atomic number for a symbol (``"Pb"``) or Z, checking it is tabulated.

    Raises
    ------
    ValueError
        If the symbol or Z has no Kirkland parameters in :data:`KIRKLAND_PARAMS`.
    """
    if isinstance(element, str):
        z = SYMBOL_TO_Z.get(element.strip().capitalize())
        if z is None:
            raise ValueError(f"unknown element symbol {element!r}; known: {sorted(SYMBOL_TO_Z)}")
        return z
    if isinstance(element, (bool, np.bool_)) or not isinstance(element, (int, np.integer)):
        raise ValueError(f"element must be a symbol or an int Z, got {element!r}")
    if int(element) not in KIRKLAND_PARAMS:
        raise ValueError(
            f"no Kirkland parameters for Z={int(element)}; known Z: {sorted(KIRKLAND_PARAMS)}"
        )
    return int(element)


def kirkland_abcd(element: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return Kirkland's (a, b, c, d), each shape (3,): A^-1, A^-2, A, A^2."""
    p = np.asarray(KIRKLAND_PARAMS[element_z(element)], dtype=np.float64)
    return p[0:6:2], p[1:6:2], p[6:12:2], p[7:12:2]


def projected_potential_VA(
    Z: int | str, r_A: np.ndarray, *, r_min_A: float = DEFAULT_R_MIN_A
) -> np.ndarray:
    """Projected potential v_z(r) of one neutral atom (Kirkland 2010, Appendix C).

    Parameters
    ----------
    Z : int or str
        Atomic number or element symbol (must be in :data:`KIRKLAND_PARAMS`).
    r_A : array_like, any shape
        Radial distance from the atom column in A (must be >= 0, finite).
    r_min_A : float, keyword-only
        ``r`` is clamped to ``max(r, r_min_A)`` to regularise the logarithmic
        K0 singularity at r = 0 (default 1e-3 A; the specimen builder uses a
        tenth of a pixel).

    Returns
    -------
    numpy.ndarray, float64, same shape as ``r_A``
        Projected potential in V A.

    Raises
    ------
    ValueError
        Unknown element, negative/non-finite ``r_A`` or non-positive ``r_min_A``.
    """
    a, b, c, d = kirkland_abcd(Z)
    if not (np.isfinite(r_min_A) and r_min_A > 0):
        raise ValueError(f"r_min_A must be positive and finite, got {r_min_A!r}")
    r = np.asarray(r_A, dtype=np.float64)
    if r.size and not (np.all(np.isfinite(r)) and r.min() >= 0):
        raise ValueError(f"r_A must be finite and >= 0, got min {np.nanmin(r)!r}")
    r = np.maximum(r, r_min_A)[..., None]
    a0e = BOHR_RADIUS_A * ELECTRON_CHARGE_VA
    lor = 4.0 * np.pi**2 * a0e * np.sum(a * k0(2.0 * np.pi * r * np.sqrt(b)), axis=-1)
    gau = 2.0 * np.pi**2 * a0e * np.sum((c / d) * np.exp(-np.pi**2 * r**2 / d), axis=-1)
    return lor + gau


def _positive(name: str, value: float) -> float:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (real and np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _column_image(z: int, rows_A: np.ndarray, cols_A: np.ndarray, shape: tuple[int, int],
                  p: float, cutoff: float) -> np.ndarray:
    """Sum of truncated atom potentials (V A) at pixel positions ``rows_A/p``, ``cols_A/p``."""
    ny, nx = shape
    h = int(math.ceil(cutoff / p))
    off = np.arange(-h, h + 1)
    yy, xx = np.meshgrid(rows_A / p, cols_A / p, indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1)  # (n_atoms, 2) in pixels
    cen = np.rint(pos).astype(np.int64)
    pi_ = cen[:, 0, None, None] + off[None, :, None]  # (n, W, 1)
    pj_ = cen[:, 1, None, None] + off[None, None, :]  # (n, 1, W)
    r = p * np.hypot(pi_ - pos[:, 0, None, None], pj_ - pos[:, 1, None, None])  # (n, W, W)
    ii = np.broadcast_to(pi_, r.shape)
    jj = np.broadcast_to(pj_, r.shape)
    keep = (r < cutoff) & (ii >= 0) & (ii < ny) & (jj >= 0) & (jj < nx)
    v = projected_potential_VA(z, r[keep], r_min_A=0.1 * p)
    v -= projected_potential_VA(z, np.array(cutoff))
    flat = ii[keep] * nx + jj[keep]
    return np.bincount(flat, weights=v, minlength=ny * nx).reshape(ny, nx)


def perovskite_potential_slices(
    shape_px: tuple[int, int],
    pixel_size_A: float,
    n_slices: int,
    slice_thickness_A: float,
    lattice_A: float = 3.905,
    a_site: str = "Pb",
    b_site: str = "Ti",
    x_site: str = "O",
    origin_A: tuple[float, float] = (0.0, 0.0),
    cutoff_A: float = 3.0,
    dtype=np.float32,
) -> np.ndarray:
    """Projected potential slices of a cubic ABX3 perovskite viewed down [001].

    Atoms (fractional x, y, z): A (0,0,0); B (1/2,1/2,1/2); X (1/2,1/2,0),
    (1/2,0,1/2), (0,1/2,1/2). Pixel (i, j) has its centre at crystal position
    (y, x) = (i p - origin_A[0], j p - origin_A[1]) A, i.e. an atom at (y, x)
    sits at pixel coordinate ((y + oy)/p, (x + ox)/p). The specimen spans
    z in [0, n_slices * slice_thickness_A); an atom at depth z goes in slice
    floor(z / slice_thickness_A). The crystal is tiled (not wrapped) over the
    field, including atoms outside it whose tails reach in. Each atom's
    potential is evaluated on pixels with r < cutoff_A as v(r) - v(cutoff_A),
    with r clamped to >= a tenth of a pixel.

    Parameters
    ----------
    shape_px : (rows, cols) ints > 0
    pixel_size_A : float > 0, pixel size p in A.
    n_slices : int > 0
    slice_thickness_A : float > 0, A.
    lattice_A : float > 0, cubic lattice constant in A (default SrTiO3-like 3.905).
    a_site, b_site, x_site : str, element symbols (or Z) for A, B, X.
    origin_A : (oy, ox) floats, A.
    cutoff_A : float > 0, radial cutoff in A.
    dtype : numpy float dtype of the result.

    Returns
    -------
    numpy.ndarray, shape (n_slices, rows, cols), ``dtype``
        Projected potential of each slice in V A.

    Raises
    ------
    ValueError
        Unknown element symbol, non-positive sizes/counts, non-finite origin or
        non-float ``dtype``; the message names the offending value.
    """
    if len(tuple(shape_px)) != 2 or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape_px
    ):
        raise ValueError(f"shape_px must be two positive ints, got {shape_px!r}")
    ny, nx = (int(s) for s in shape_px)
    p = _positive("pixel_size_A", pixel_size_A)
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices <= 0:
        raise ValueError(f"n_slices must be a positive int, got {n_slices!r}")
    dz = _positive("slice_thickness_A", slice_thickness_A)
    a = _positive("lattice_A", lattice_A)
    cutoff = _positive("cutoff_A", cutoff_A)
    if len(tuple(origin_A)) != 2 or not np.all(np.isfinite(np.asarray(origin_A, dtype=float))):
        raise ValueError(f"origin_A must be two finite floats, got {origin_A!r}")
    oy, ox = (float(o) for o in origin_A)
    za, zb, zx = element_z(a_site), element_z(b_site), element_z(x_site)
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")

    thickness = n_slices * dz
    basis = [(za, 0.0, 0.0, 0.0), (zb, 0.5, 0.5, 0.5), (zx, 0.5, 0.5, 0.0),
             (zx, 0.5, 0.0, 0.5), (zx, 0.0, 0.5, 0.5)]
    out = np.zeros((n_slices, ny, nx), dtype=np.float64)
    images: dict[tuple[int, float, float], np.ndarray] = {}
    eps = 1e-9 * a
    for z, fx, fy, fz in basis:
        # per-slice number of repeats of this basis atom along the beam
        depths = (np.arange(int(math.ceil(thickness / a)) + 1) + fz) * a
        depths = depths[depths < thickness - eps]
        if depths.size == 0:
            continue
        idx = np.minimum(np.floor(depths / dz + 1e-9).astype(np.int64), n_slices - 1)
        counts = np.bincount(idx, minlength=n_slices)
        key = (z, fx, fy)
        if key not in images:
            # lattice translations whose column lies within cutoff of the field
            def lattice_range(frac: float, o: float, n: int) -> np.ndarray:
                lo = math.floor((-o - cutoff) / a - frac)
                hi = math.ceil(((n - 1) * p - o + cutoff) / a - frac)
                return (np.arange(lo, hi + 1) + frac) * a + o  # pixel-frame position in A
            images[key] = _column_image(z, lattice_range(fy, oy, ny), lattice_range(fx, ox, nx),
                                        (ny, nx), p, cutoff)
        out += counts[:, None, None] * images[key][None]
    logger.debug("perovskite slices: shape=%s p=%.4g A, %d slices of %.4g A, %s%s%s3 a=%.4g A",
                 (n_slices, ny, nx), p, n_slices, dz, a_site, b_site, x_site, a)
    return out.astype(dtype, copy=False)
