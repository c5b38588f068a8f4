"""Position gradient and curvature of the multislice model (float64 finite differences), and the rules of
:mod:`ptylive.gpu.positions`: step, gain, affine fit from summed normal equations, blend."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.backend import empty_aligned
from ptylive.gpu.fft import fft2
from ptylive.gpu.loss import measured_target
from ptylive.gpu.multislice import (
    _shift_gradient,
    _shift_gradient_arrays,
    _slice_curvature_arrays,
    forward,
    loss_and_gradient,
    position_curvature,
)
from ptylive.gpu.patches import extract_patches, window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.positions import (
    GAIN_RANGE,
    Affine,
    adapt_gain,
    affine_normal_equations,
    blend_positions,
    informative,
    position_step,
    solve_affine,
)
from ptylive.gpu.probe import shift_ramps
from ptylive.gpu.propagation import fresnel_propagator
from ptylive.gpu.simulate import SimulationSpec, simulate

EPS = 1e-6  # as in test_gradient.py: truncation and rounding errors both near 1e-10 on an O(1) problem
RTOL = 1e-6


def make_problem(seed: int, n_slices: int, window: int, detector: int, loss: str) -> dict:
    rng = np.random.default_rng(seed)
    batch = 4
    probe = rng.standard_normal((window, window)) + 1j * rng.standard_normal((window, window))
    probe /= np.linalg.norm(probe)
    patches = np.exp(1j * 0.3 * rng.standard_normal((n_slices, batch, window, window)))
    patches *= 1.0 - 0.1 * rng.random(patches.shape)
    propagator = fresnel_propagator(np, window, 0.25, 0.025, 8.0, dtype=np.complex128)
    intensity = rng.uniform(0, 2.0 / detector**2, size=(batch, detector, detector))
    return dict(probe=probe, shifts_px=rng.uniform(0, 1, size=(batch, 2)), patches=patches,
                propagator=propagator, measured=measured_target(loss, intensity), loss=loss)


def loss_at(problem: dict, shifts: np.ndarray) -> float:
    return loss_and_gradient(**dict(problem, shifts_px=shifts)).loss


# (slices, window, detector, loss): several slices, and a detector smaller than the window (upsampled)
CASES = [(3, 16, 16, "amplitude"), (3, 16, 8, "amplitude"), (4, 16, 8, "poisson"), (2, 12, 12, "poisson"),
         (1, 12, 6, "amplitude")]


@pytest.mark.parametrize("n_slices, window, detector, loss", CASES)
def test_position_gradient_matches_central_differences(n_slices: int, window: int, detector: int,
                                                       loss: str) -> None:
    problem = make_problem(7, n_slices, window, detector, loss)
    gradient = loss_and_gradient(**problem, want_position_gradient=True).position_gradient
    assert gradient.shape == (4, 2) and gradient.dtype == np.float64
    shifts = problem["shifts_px"]
    for j in range(len(shifts)):  # every position and axis on its own, so a swapped axis or sign cannot hide
        for axis in range(2):
            step = np.zeros_like(shifts)
            step[j, axis] = EPS
            numeric = (loss_at(problem, shifts + step) - loss_at(problem, shifts - step)) / (2 * EPS)
            assert abs(numeric - gradient[j, axis]) <= RTOL * np.abs(gradient).max(), (j, axis, numeric)
    direction = np.random.default_rng(8).standard_normal(shifts.shape)
    numeric = (loss_at(problem, shifts + EPS * direction) - loss_at(problem, shifts - EPS * direction)) / (2 * EPS)
    analytic = float(np.sum(gradient * direction))
    assert abs(numeric - analytic) <= RTOL * abs(analytic)


def test_position_option_changes_no_other_result() -> None:
    problem = make_problem(9, 3, 16, 8, "amplitude")
    plain = loss_and_gradient(**problem, want_probe_gradient=True)
    full = loss_and_gradient(**problem, want_probe_gradient=True, want_position_gradient=True)
    assert plain.position_gradient is None and plain.position_curvature is None
    assert full.loss == plain.loss
    for name in ("object_gradient", "illumination", "probe_gradient"):
        np.testing.assert_array_equal(getattr(full, name), getattr(plain, name))
    assert full.position_curvature.shape == (4, 2) and (full.position_curvature > 0).all()


def test_single_precision_position_gradient_agrees_with_double() -> None:
    problem = make_problem(10, 2, 16, 8, "amplitude")
    double = loss_and_gradient(**problem, want_position_gradient=True).position_gradient
    single = {name: value.astype(np.complex64 if np.iscomplexobj(value) else np.float32)
              if isinstance(value, np.ndarray) else value for name, value in problem.items()}
    result = loss_and_gradient(**single, want_position_gradient=True).position_gradient
    assert result.dtype == np.float64
    assert np.abs(result - double).max() <= 1e-4 * np.abs(double).max()


def test_curvature_kernel_matches_its_array_expression() -> None:
    rng = np.random.default_rng(11)
    patches = np.exp(1j * rng.standard_normal((3, 5, 10, 10)))
    illumination = rng.random(patches.shape)
    dr = patches[:, :, 2:, 1:-1] - patches[:, :, :-2, 1:-1]
    dc = patches[:, :, 1:-1, 2:] - patches[:, :, 1:-1, :-2]
    inner = illumination[:, :, 1:-1, 1:-1]
    expected = 0.25 * np.stack([(inner * np.abs(dr) ** 2).sum(axis=(0, 2, 3)),
                                (inner * np.abs(dc) ** 2).sum(axis=(0, 2, 3))], axis=1)
    np.testing.assert_allclose(position_curvature(patches, illumination, "amplitude"), 2 * expected, rtol=1e-12)
    arrays = np.zeros_like(expected)
    for s in range(len(patches)):  # CuPy's path, run on numpy
        _slice_curvature_arrays(patches[s], illumination[s], arrays)
    np.testing.assert_allclose(arrays, expected, rtol=1e-12)
    np.testing.assert_allclose(position_curvature(patches, illumination, "poisson"), 4 * expected, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown loss"):
        position_curvature(patches, illumination, "gaussian")


def test_fused_shift_gradient_matches_the_array_path_cupy_takes() -> None:
    rng = np.random.default_rng(15)
    batch, n = 3, 12
    spectrum = empty_aligned(np, (batch, n, n), np.complex128)
    spectrum[...] = rng.standard_normal((batch, n, n)) + 1j * rng.standard_normal((batch, n, n))
    probe_spectrum = fft2(rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n)), normalise=False)
    row, col = shift_ramps(np, n, rng.uniform(0, 1, (batch, 2)), np.complex128)
    k = np.fft.fftfreq(n)
    fused = np.empty((batch, 2))
    _shift_gradient(spectrum, probe_spectrum, row, col, k, fused)
    np.testing.assert_allclose(_shift_gradient_arrays(np, spectrum.copy(), probe_spectrum, row, col, k), fused,
                               rtol=1e-12, atol=1e-12 * np.abs(fused).max())


@pytest.mark.parametrize("loss, upsampling", [("amplitude", 1), ("amplitude", 2), ("poisson", 1)])
def test_curvature_brackets_the_exact_second_derivative_on_pbtio3(loss: str, upsampling: int) -> None:
    """The step rule's premise: at the fit, the exact ∂²L/∂d² is 0.25-2.5 times h (median 0.5-1.5)."""
    spec = SimulationSpec(scan_shape=(4, 4), upsampling=upsampling, detector_px=48 // upsampling)
    sim = simulate(spec)
    n = spec.window_px
    truth, probe = sim.object_truth.astype(np.complex128), sim.probe.astype(np.complex128)
    propagator = fresnel_propagator(np, n, spec.pixel_size_A, wavelength_A(spec.energy_eV), spec.slice_thickness_A,
                                    dtype=np.complex128)
    starts, shifts = window_starts(sim.positions_px, n)
    patches = extract_patches(truth, starts, n)
    intensity = np.abs(forward(probe, shifts, patches, propagator, spec.detector_px)) ** 2
    args = dict(probe=probe, patches=patches, propagator=propagator, measured=measured_target(loss, intensity),
                loss=loss, want_position_gradient=True)
    curvature = loss_and_gradient(shifts_px=shifts, **args).position_curvature
    h = 1e-3
    exact = np.empty_like(curvature)
    for axis in range(2):
        step = np.zeros_like(shifts)
        step[:, axis] = h
        plus = loss_and_gradient(shifts_px=shifts + step, **args).position_gradient[:, axis]
        minus = loss_and_gradient(shifts_px=shifts - step, **args).position_gradient[:, axis]
        exact[:, axis] = (plus - minus) / (2 * h)
    ratio = exact / curvature
    assert 0.25 <= ratio.min() and ratio.max() <= 2.5, ratio
    assert 0.5 <= np.median(ratio) <= 1.5, np.median(ratio)


def test_step_is_scale_free_limited_and_never_applies_nonfinite_values() -> None:
    rng = np.random.default_rng(12)
    gradient = rng.standard_normal((50, 2))
    curvature = rng.uniform(0.5, 2.0, (50, 2))
    step = position_step(gradient, curvature, 0.1, max_move_px=0.3)
    scaled = position_step(1e6 * gradient, 1e6 * curvature, 1e5, max_move_px=0.3)  # another dose or detector scale
    np.testing.assert_allclose(scaled.moves_px, step.moves_px, rtol=1e-12)
    length = np.hypot(*step.moves_px.T)
    assert length.max() <= 0.3 + 1e-12 and step.limited.any() and not step.limited.all()
    free = ~step.limited
    np.testing.assert_allclose(step.moves_px[free], -0.5 * gradient[free] / curvature[free], rtol=1e-12)
    gain = rng.uniform(0.5, 2.0, (50, 2))
    np.testing.assert_allclose(position_step(gradient, curvature, 0.1, 1e9, gain=gain).moves_px,
                               -0.5 * gain * gradient / curvature, rtol=1e-12)
    gradient[3, 0], curvature[4, 1] = np.nan, np.inf
    bad = position_step(gradient, curvature, 0.1)
    assert bad.nonfinite[[3, 4]].all() and bad.nonfinite.sum() == 2
    assert (bad.moves_px[[3, 4]] == 0).all() and np.isfinite(bad.moves_px).all()


def test_floor_bounds_the_step_where_there_is_no_curvature() -> None:
    step = position_step(np.array([[1e-3, 0.0], [1e-3, 0.0]]), np.array([[0.0, 0.0], [1e-4, 1e-4]]), 1.0)
    np.testing.assert_allclose(step.moves_px[:, 0], [-0.5e-3, -0.5e-3])
    still = position_step(np.array([[1.0, 1.0]]), np.zeros((1, 2)), 0.0)
    assert (still.moves_px == 0).all()


def test_gain_grows_while_the_sign_holds_and_halves_when_it_flips() -> None:
    gain = np.array([[1.0, 1.0], [1.0, 4.0], [15.0, 0.3]])
    now = np.array([[1.0, -2.0], [0.0, 1.0], [3.0, -1.0]])
    before = np.array([[2.0, 5.0], [1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(adapt_gain(gain, now, before), [[1.5, 0.5], [1.0, 6.0], [GAIN_RANGE[1], GAIN_RANGE[0]]])
    np.testing.assert_allclose(adapt_gain(gain, np.full((3, 2), np.nan), before), gain)


def nominal_grid(rows: int = 9, cols: int = 7) -> np.ndarray:
    grid = np.stack(np.meshgrid(np.arange(rows) * 3.0, np.arange(cols) * 3.0, indexing="ij"), axis=-1).reshape(-1, 2)
    return grid + np.array([30.5, 40.5])


def rotation_scale(angle_rad: float, row_scale: float, col_scale: float) -> np.ndarray:
    rotation = np.array([[np.cos(angle_rad), -np.sin(angle_rad)], [np.sin(angle_rad), np.cos(angle_rad)]])
    return rotation @ np.diag([row_scale, col_scale])


def test_affine_fit_recovers_a_known_rotation_and_scale_exactly() -> None:
    nominal = nominal_grid()
    matrix = rotation_scale(np.deg2rad(2.0), 1.02, 0.99)
    offset = np.array([0.7, -1.3])
    corrected = nominal @ matrix.T + offset
    affine = solve_affine(affine_normal_equations(nominal, corrected))
    np.testing.assert_allclose(affine.matrix, matrix, atol=1e-12)
    np.testing.assert_allclose(affine.offset_px, offset, atol=1e-10)
    np.testing.assert_allclose(affine.apply(nominal), corrected, atol=1e-10)
    angle, row_scale, col_scale = affine.rotation_scale()
    assert angle == pytest.approx(np.deg2rad(2.0), abs=1e-12)
    assert (row_scale, col_scale) == pytest.approx((1.02, 0.99), abs=1e-12)
    # weights: positions of weight 0 do not pull the fit, whatever they say
    wild = corrected.copy()
    wild[:5] += 10.0
    weights = np.ones(len(nominal))
    weights[:5] = 0
    np.testing.assert_allclose(solve_affine(affine_normal_equations(nominal, wild, weights)).matrix, matrix, atol=1e-12)


def test_rank_split_normal_equations_give_the_same_affine_as_one_rank() -> None:
    rng = np.random.default_rng(13)
    nominal = nominal_grid(12, 11)
    corrected = nominal @ rotation_scale(0.01, 1.005, 1.0).T + rng.normal(0, 0.3, nominal.shape)
    weights = (rng.random(len(nominal)) > 0.2).astype(float)
    whole = solve_affine(affine_normal_equations(nominal, corrected, weights))
    for n_ranks in (2, 3, 7):
        owner = rng.integers(0, n_ranks, len(nominal))
        sums = sum(affine_normal_equations(nominal[owner == r], corrected[owner == r], weights[owner == r])
                   for r in range(n_ranks))
        split = solve_affine(sums)
        np.testing.assert_allclose(split.displacement, whole.displacement, rtol=0, atol=1e-13)
        np.testing.assert_allclose(split.offset_px, whole.offset_px, rtol=0, atol=1e-11)


def test_the_rotation_model_fits_a_rotation_and_ignores_scale_and_shear() -> None:
    """``model="rotation"``: ``B = ω J`` by least squares from the same sums (exact for a small rotation;
    ``ω = 0`` on a square raster for any symmetric ``B``: scale and shear, which the probe's defocus and
    astigmatism mimic. On an oblong raster least squares lets a shear leak into ω by the aspect.)"""
    nominal = nominal_grid(12, 11)
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    offset = np.array([0.7, -1.3])
    rotated = nominal + nominal @ (0.015 * turn).T + offset
    affine = solve_affine(affine_normal_equations(nominal, rotated), "rotation")
    np.testing.assert_allclose(affine.displacement, 0.015 * turn, atol=1e-13)
    np.testing.assert_allclose(affine.offset_px, offset, atol=1e-11)
    square = nominal_grid(10, 10)
    sheared = square + square @ np.array([[0.02, 0.037], [0.037, -0.03]]).T + offset
    assert np.abs(solve_affine(affine_normal_equations(square, sheared), "rotation").displacement).max() < 1e-13
    full = solve_affine(affine_normal_equations(square, sheared))
    np.testing.assert_allclose(full.displacement, [[0.02, 0.037], [0.037, -0.03]], atol=1e-12)
    # the rotation of a rank split is the one rank's (the same summed normal equations)
    rng = np.random.default_rng(3)
    noisy = rotated + rng.normal(0, 0.3, nominal.shape)
    whole = solve_affine(affine_normal_equations(nominal, noisy), "rotation")
    owner = rng.integers(0, 3, len(nominal))
    split = solve_affine(sum(affine_normal_equations(nominal[owner == r], noisy[owner == r]) for r in range(3)),
                         "rotation")
    np.testing.assert_allclose(split.displacement, whole.displacement, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="affine model"):
        solve_affine(affine_normal_equations(nominal, noisy), "similarity")


def test_degenerate_scans_give_finite_affines_that_move_nobody_off_the_line() -> None:
    assert solve_affine(affine_normal_equations(np.zeros((0, 2)), np.zeros((0, 2)))).displacement.tolist() == \
        [[0.0, 0.0], [0.0, 0.0]]
    line = np.stack([np.arange(10) * 3.0 + 20, np.full(10, 50.0)], axis=1)  # one scan row
    moved = line.copy()
    moved[:, 0] *= 1.01
    moved[:, 1] += 0.2
    affine = solve_affine(affine_normal_equations(line, moved))
    assert np.isfinite(affine.displacement).all()
    np.testing.assert_allclose(affine.apply(line), moved, atol=1e-9)
    blended = blend_positions(line, moved, np.zeros(10), affine, line.mean(axis=0))
    np.testing.assert_allclose(blended[:, 1], 50.0, atol=1e-9)  # the undetermined direction stays nominal
    with pytest.raises(ValueError, match="normal-equation sums"):
        solve_affine(np.full(15, np.nan))


def test_blend_pins_the_mean_keeps_informative_corrections_and_places_the_rest_by_the_affine() -> None:
    rng = np.random.default_rng(14)
    nominal = nominal_grid()
    matrix = rotation_scale(0.02, 1.01, 1.0)
    corrected = nominal @ matrix.T + np.array([0.4, -0.2]) + rng.normal(0, 0.3, nominal.shape)
    weights = (rng.random(len(nominal)) > 0.3).astype(float)
    affine = solve_affine(affine_normal_equations(nominal, corrected, weights))
    centre = nominal.mean(axis=0)
    blended = blend_positions(nominal, corrected, weights, affine, centre)
    np.testing.assert_allclose(blended.mean(axis=0), centre, atol=1e-12)  # no global drift
    pinned = nominal + (nominal - centre) @ affine.displacement.T
    keep = weights == 1
    shift = corrected[keep] - blended[keep]  # informative positions: their own correction less one translation
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
    np.testing.assert_allclose(blended[~keep], pinned[~keep], atol=1e-12)
    identity = Affine(np.zeros((2, 2)), np.zeros(2))
    np.testing.assert_allclose(blend_positions(nominal, nominal, np.ones(len(nominal)), identity, centre), nominal)


def test_informative_positions_are_those_at_or_above_the_floor() -> None:
    curvature = np.array([[1.0, 1.0], [0.05, 0.04], [0.0, 0.0], [np.nan, 1.0], [0.1, 0.1]])
    np.testing.assert_array_equal(informative(curvature, 0.1), [True, False, False, False, True])
