"""Tests for ptylive.gpu.potential (Kirkland projected potentials, perovskite slices)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate
from scipy.ndimage import maximum_filter

from ptylive.gpu.potential import (
    BOHR_RADIUS_A,
    ELECTRON_CHARGE_VA,
    KIRKLAND_PARAMS,
    SYMBOL_TO_Z,
    element_z,
    perovskite_potential_slices,
    projected_potential_VA,
)

A0E = BOHR_RADIUS_A * ELECTRON_CHARGE_VA
LATT = 3.905
PX = LATT / 40  # commensurate: one unit cell = 40 px, atoms on pixel centres
ORIGIN = (10 * PX, 10 * PX)  # crystal origin at pixel (10, 10)


def _abcd(z):
    p = np.asarray(KIRKLAND_PARAMS[z])
    return p[0:6:2], p[1:6:2], p[6:12:2], p[7:12:2]


def _v3d(z, r):
    """Kirkland's 3-D atomic potential V(r) in V (Kirkland 2010, Appendix C)."""
    a, b, c, d = _abcd(z)
    return (2 * np.pi**2 * A0E * np.sum(a / r * np.exp(-2 * np.pi * r * np.sqrt(b)))
            + 2 * np.pi**2.5 * A0E * np.sum(c * d**-1.5 * np.exp(-np.pi**2 * r**2 / d)))


def test_table_has_required_elements_and_symbols():
    for sym, z in {"O": 8, "Ti": 22, "Sr": 38, "Ba": 56, "Pb": 82}.items():
        assert SYMBOL_TO_Z[sym] == z and len(KIRKLAND_PARAMS[z]) == 12
        assert element_z(sym) == z and element_z(z) == z
    np.testing.assert_array_equal(
        projected_potential_VA("Pb", [0.3, 1.0]), projected_potential_VA(82, [0.3, 1.0])
    )


@pytest.mark.parametrize("z", [8, 22, 38, 56, 82])
def test_plane_integral_matches_closed_form(z):
    # int v_z d^2r = 4pi^2 a0e sum a_i/(2pi b_i) + 2pi^2 a0e sum (c_i/d_i)(d_i/pi)
    #              = 2 pi a0 e f_e(0),  f_e(0) = sum a_i/b_i + c_i
    a, b, c, d = _abcd(z)
    exact = 2 * np.pi * A0E * (np.sum(a / b) + np.sum(c))

    def f(u):  # integrand in u = ln r
        return projected_potential_VA(z, np.exp(u), r_min_A=1e-12) * 2 * np.pi * np.exp(2 * u)

    num, err = integrate.quad(f, np.log(1e-9), np.log(500.0), limit=400, epsabs=0, epsrel=1e-10)
    assert err < 1e-6 * exact
    assert num == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("z", [8, 22, 82])
@pytest.mark.parametrize("r", [0.05, 0.3, 1.0, 2.5])
def test_projection_of_3d_potential(z, r):
    # independent route: integrate Kirkland's 3-D V(r) along the beam
    num, _ = integrate.quad(lambda t: _v3d(z, np.hypot(r, t)), -np.inf, np.inf,
                            limit=400, epsrel=1e-10)
    assert float(projected_potential_VA(z, r)) == pytest.approx(num, rel=1e-6)


def test_heavier_atoms_scatter_more():
    # Within ~1.1 A of the column. (Kirkland's neutral Ti has a longer tail than Pb:
    # v_Ti > v_Pb beyond ~1.15 A, so the ordering is only a near-core statement.)
    r = np.array([0.02, 0.1, 0.3, 0.6, 1.0, 1.1])
    pb, ti, o = (projected_potential_VA(s, r) for s in ("Pb", "Ti", "O"))
    assert np.all(pb > ti) and np.all(ti > o) and np.all(o > 0)
    assert np.all(np.diff(pb) < 0)  # monotone decreasing in r
    assert projected_potential_VA("O", np.zeros((2, 3))).shape == (2, 3)


def _sites(frac_pairs, cells=2):
    """Pixel coordinates (row, col) of columns at fractional (y, x) in a cells x cells field."""
    out = set()
    for fy, fx in frac_pairs:
        for i in range(cells):
            for j in range(cells):
                out.add((int(round(10 + (i + fy) * 40)), int(round(10 + (j + fx) * 40))))
    return out


A_SITES = _sites([(0, 0)])
B_SITES = _sites([(0.5, 0.5)])  # B + one X share this column
X_SITES = _sites([(0.5, 0.0), (0.0, 0.5)])  # pure X columns


def _peaks(img, frac=0.05):
    mx = maximum_filter(img, size=5, mode="nearest")
    rr, cc = np.nonzero((img == mx) & (img > frac * img.max()))
    return set(zip(rr.tolist(), cc.tolist(), strict=True))


def test_perovskite_columns_2x2():
    v = perovskite_potential_slices((80, 80), PX, 2, LATT / 2, lattice_A=LATT, origin_A=ORIGIN)
    assert v.shape == (2, 80, 80) and v.dtype == np.float32
    proj = v.sum(axis=0)
    assert tuple(np.unravel_index(np.argmax(proj), proj.shape)) in A_SITES
    assert _peaks(proj) == A_SITES | B_SITES | X_SITES and len(A_SITES | B_SITES | X_SITES) == 16
    a_v = min(proj[s] for s in A_SITES)
    b_v = [proj[s] for s in B_SITES]
    x_v = [proj[s] for s in X_SITES]
    inter = proj[20, 20]  # (1/4, 1/4) of the cell: no column
    assert a_v > max(b_v) and min(b_v) > max(x_v) and min(x_v) > inter
    # periodic crystal fully tiled: equivalent sites agree
    assert np.ptp([proj[s] for s in A_SITES]) < 1e-4 * a_v
    assert np.ptp(x_v) < 1e-4 * max(x_v)


def test_slice_assignment_half_cell():
    v = perovskite_potential_slices((80, 80), PX, 2, LATT / 2, lattice_A=LATT, origin_A=ORIGIN,
                                    a_site="Sr", b_site="Ti", x_site="O")
    assert _peaks(v[0]) == A_SITES | B_SITES  # Sr (0,0,0) and O (1/2,1/2,0)
    assert _peaks(v[1]) == B_SITES | X_SITES  # Ti (1/2,1/2,1/2), O (1/2,0,1/2), O (0,1/2,1/2)
    b = next(iter(B_SITES))
    assert v[1][b] > v[0][b]  # Ti on that column in slice 1, O in slice 0
    assert v[0][b] == pytest.approx(v[1][next(iter(X_SITES))], rel=0.05)  # both a lone O column
    # a single half-cell slice keeps only the z = 0 atoms (z >= thickness skipped)
    one = perovskite_potential_slices((80, 80), PX, 1, LATT / 2, lattice_A=LATT, origin_A=ORIGIN,
                                      a_site="Sr")
    np.testing.assert_allclose(one[0], v[0], rtol=1e-6)


def test_projected_sum_independent_of_slicing():
    kw = dict(lattice_A=LATT, origin_A=(0.3, -0.7))
    ref = perovskite_potential_slices((64, 48), 0.13, 4, LATT / 2, **kw).sum(axis=0)
    for n, dz in [(2, LATT), (1, 2 * LATT), (8, LATT / 4), (3, 2 * LATT / 3)]:
        got = perovskite_potential_slices((64, 48), 0.13, n, dz, **kw).sum(axis=0)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)


def test_field_total_matches_truncated_atom_sums():
    # Field = 2x2 whole cells of an infinitely tiled crystal, so the pixel sum equals
    # 4 cells x the sum over the 5 basis atoms of one isolated on-pixel atom's truncated
    # potential, sum_{r<rc} [v(max(r, p/10)) - v(rc)]. This fails if any tiles are missing.
    rc = 3.0
    v = perovskite_potential_slices((80, 80), PX, 1, LATT, lattice_A=LATT, origin_A=ORIGIN,
                                    cutoff_A=rc)
    total = float(v.astype(np.float64).sum()) * PX**2
    off = np.arange(-40, 41) * PX
    r = np.hypot(off[:, None], off[None, :])
    r = r[r < rc]
    disc = {}
    for z in (82, 22, 8):
        vz = projected_potential_VA(z, r, r_min_A=0.1 * PX) - projected_potential_VA(z, rc)
        disc[z] = float(np.sum(vz)) * PX**2
    assert total == pytest.approx(4 * (disc[82] + disc[22] + 3 * disc[8]), rel=1e-5)

    # The same against the continuous integral: the discrete sum comes out a few % high
    # because the centre pixel samples the log singularity at r = p/10.
    def cont(z):
        def f(s):
            vz = projected_potential_VA(z, s, r_min_A=1e-12) - projected_potential_VA(z, rc)
            return vz * 2 * np.pi * s

        return integrate.quad(f, 0, rc, points=[1e-3, 0.1], limit=400)[0]

    for z in (82, 22, 8):
        assert 1.0 < disc[z] / cont(z) < 1.05


def test_origin_shift_moves_image_by_one_pixel():
    base = perovskite_potential_slices((50, 60), 0.11, 2, LATT / 2, origin_A=(0.4, 0.9))
    shifted = perovskite_potential_slices((50, 60), 0.11, 2, LATT / 2, origin_A=(0.4 + 0.11, 0.9))
    np.testing.assert_allclose(shifted[:, 1:, :], base[:, :-1, :], rtol=1e-5, atol=1e-3)
    same = perovskite_potential_slices((50, 60), 0.11, 2, LATT / 2,
                                       origin_A=(0.4 + LATT, 0.9 - LATT))
    np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a_site="Xx"), "Xx"),
        (dict(b_site=200), "200"),
        (dict(shape_px=(0, 16)), r"shape_px.*\(0, 16\)"),
        (dict(shape_px=(16,)), "shape_px"),
        (dict(pixel_size_A=-0.1), r"pixel_size_A.*-0\.1"),
        (dict(n_slices=0), "n_slices.*0"),
        (dict(n_slices=2.5), "n_slices.*2.5"),
        (dict(slice_thickness_A=0.0), "slice_thickness_A.*0.0"),
        (dict(lattice_A=float("nan")), "lattice_A.*nan"),
        (dict(cutoff_A=-3.0), r"cutoff_A.*-3\.0"),
        (dict(origin_A=(0.0, float("inf"))), "origin_A"),
        (dict(dtype=np.int32), "dtype"),
    ],
)
def test_builder_rejects_bad_inputs(kwargs, match):
    args = dict(shape_px=(16, 16), pixel_size_A=0.2, n_slices=2, slice_thickness_A=2.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        perovskite_potential_slices(**args)


def test_potential_rejects_bad_inputs():
    with pytest.raises(ValueError, match="Qq"):
        projected_potential_VA("Qq", 1.0)
    with pytest.raises(ValueError, match="Z=1"):
        projected_potential_VA(1, 1.0)
    with pytest.raises(ValueError, match="-0.5"):
        projected_potential_VA("O", [0.1, -0.5])
    with pytest.raises(ValueError, match="r_min_A"):
        projected_potential_VA("O", 0.1, r_min_A=0.0)
