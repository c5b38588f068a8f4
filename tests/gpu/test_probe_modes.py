"""Incoherent probe modes: gradients, the mode sum, K = 1 against one probe, the first guess and the
orthogonalisation (:mod:`ptylive.gpu.multislice`, :mod:`ptylive.gpu.loss`, :mod:`ptylive.gpu.probe_modes`)."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.daemon.engine.iteration import step_probe
from ptylive.gpu.loss import amplitude_loss, loss_function, model_intensity, poisson_loss
from ptylive.gpu.multislice import forward, loss_and_gradient
from ptylive.gpu.patches import extract_patches, window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.probe import ProbeOptics, make_probe
from ptylive.gpu.probe_modes import MODE_POWER_FRACTION, initial_modes, mode_powers, orthogonalise_modes
from ptylive.gpu.propagation import fresnel_propagator
from ptylive.gpu.simulate import SimulationSpec, scan_positions, simulate, source_probes
from tests.gpu.test_gradient import EPS, RTOL
from tests.gpu.test_gradient import make_problem as one_probe_problem

# Float64 rounding of a few hundred operations on O(1) numbers: 1e-16 each, 1e-12 leaves room.
ROUNDING = 1e-12


def make_problem(seed: int, n_modes: int, n_slices: int, window: int, detector: int, loss: str) -> dict:
    """test_gradient.py's problem with a (K, N, N) probe."""
    return one_probe_problem(seed, n_slices, window, detector, loss, n_modes=n_modes)


def loss_at(problem: dict, **changed: np.ndarray) -> float:
    return loss_and_gradient(**{**problem, **changed}).loss


def central_difference(problem: dict, name: str, direction: np.ndarray) -> float:
    plus = loss_at(problem, **{name: problem[name] + EPS * direction})
    minus = loss_at(problem, **{name: problem[name] - EPS * direction})
    return (plus - minus) / (2 * EPS)


def complex_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


CASES = [(2, 3, 16, 16, "amplitude"), (3, 2, 16, 8, "amplitude"), (2, 2, 16, 16, "poisson"),
         (3, 1, 12, 6, "poisson")]


@pytest.mark.parametrize("n_modes, n_slices, window, detector, loss", CASES)
def test_object_gradient_of_modes_matches_central_differences(n_modes: int, n_slices: int, window: int,
                                                             detector: int, loss: str) -> None:
    problem = make_problem(1, n_modes, n_slices, window, detector, loss)
    result = loss_and_gradient(**problem)
    rng = np.random.default_rng(2)
    for s in range(n_slices):  # each slice separately, so a wrong slice index cannot hide
        direction = np.zeros_like(problem["patches"])
        direction[s] = complex_normal(rng, direction[s].shape)
        analytic = float(np.real(np.vdot(result.object_gradient, direction)))
        numeric = central_difference(problem, "patches", direction)
        assert abs(numeric - analytic) <= RTOL * abs(analytic), (s, numeric, analytic)


@pytest.mark.parametrize("n_modes, n_slices, window, detector, loss", CASES)
def test_every_mode_gradient_matches_central_differences(n_modes: int, n_slices: int, window: int,
                                                         detector: int, loss: str) -> None:
    problem = make_problem(3, n_modes, n_slices, window, detector, loss)
    result = loss_and_gradient(**problem, want_probe_gradient=True)
    assert result.probe_gradient.shape == problem["probe"].shape
    rng = np.random.default_rng(4)
    for k in range(n_modes):  # each mode separately, so a wrong mode index cannot hide
        direction = np.zeros_like(problem["probe"])
        direction[k] = complex_normal(rng, direction[k].shape)
        analytic = float(np.real(np.vdot(result.probe_gradient, direction)))
        numeric = central_difference(problem, "probe", direction)
        assert abs(numeric - analytic) <= RTOL * abs(analytic), (k, numeric, analytic)


@pytest.mark.parametrize("n_modes, n_slices, window, detector, loss", CASES)
def test_position_gradient_of_modes_matches_central_differences(n_modes: int, n_slices: int, window: int,
                                                               detector: int, loss: str) -> None:
    problem = make_problem(5, n_modes, n_slices, window, detector, loss)
    result = loss_and_gradient(**problem, want_position_gradient=True)
    for b in range(len(problem["shifts_px"])):
        for axis in range(2):
            direction = np.zeros_like(problem["shifts_px"])
            direction[b, axis] = 1.0
            numeric = central_difference(problem, "shifts_px", direction)
            analytic = float(result.position_gradient[b, axis])
            assert abs(numeric - analytic) <= RTOL * abs(analytic), (b, axis, numeric, analytic)
    assert np.all(result.position_curvature > 0)


def test_one_mode_is_bit_for_bit_the_one_probe_path() -> None:
    for loss in ("amplitude", "poisson"):
        problem = make_problem(7, 1, 2, 16, 8, loss)
        single = dict(problem, probe=problem["probe"][0])
        with_mode = loss_and_gradient(**problem, want_probe_gradient=True, want_position_gradient=True)
        without = loss_and_gradient(**single, want_probe_gradient=True, want_position_gradient=True)
        assert with_mode.loss == without.loss
        np.testing.assert_array_equal(with_mode.object_gradient, without.object_gradient)
        np.testing.assert_array_equal(with_mode.illumination, without.illumination)
        np.testing.assert_array_equal(with_mode.probe_gradient, without.probe_gradient[None])
        np.testing.assert_array_equal(with_mode.position_gradient, without.position_gradient)
        np.testing.assert_array_equal(with_mode.position_curvature, without.position_curvature)
        args = (problem["shifts_px"], problem["patches"], problem["propagator"], 8)
        np.testing.assert_array_equal(forward(problem["probe"], *args), forward(single["probe"], *args)[None])


def test_mode_intensity_is_the_sum_of_single_probe_forwards() -> None:
    problem = make_problem(8, 3, 3, 16, 8, "amplitude")
    args = (problem["shifts_px"], problem["patches"], problem["propagator"], 8)
    fields = forward(problem["probe"], *args)
    assert fields.shape == (3, 3, 8, 8)
    separately = sum(np.abs(forward(mode, *args)) ** 2 for mode in problem["probe"])
    np.testing.assert_allclose(model_intensity(fields), separately, rtol=ROUNDING, atol=0)
    # and the illumination preconditioner is the modes' sum too: slice 0 sees Σ_k |shift(P_k)|², power 1
    result = loss_and_gradient(**problem)
    np.testing.assert_allclose(result.illumination[0].sum(axis=(-2, -1)), 1.0, rtol=ROUNDING)


def test_mode_summed_losses_of_one_mode_are_the_one_probe_losses() -> None:
    rng = np.random.default_rng(9)
    field = complex_normal(rng, (4, 8, 8)) / 8
    target = rng.uniform(0, 2.0 / 64, size=(4, 8, 8))
    for loss in (amplitude_loss, poisson_loss):  # the same functions take one probe's fields or K modes'
        value, gradient = loss(field[None], target)
        expected_value, expected_gradient = loss(field, target)
        assert value == expected_value
        np.testing.assert_array_equal(gradient[0], expected_gradient)
    assert loss_function("amplitude")(field, target)[0] == amplitude_loss(field, target)[0]
    assert loss_function("poisson")(field[None], target)[0] == poisson_loss(field, target)[0]


def optics_probe(window: int = 32) -> np.ndarray:
    return np.asarray(make_probe(ProbeOptics(200e3, 25.0, 40.0), window, 0.2, dtype=np.complex128))


def gram(modes: np.ndarray) -> np.ndarray:
    flat = modes.reshape(len(modes), -1)
    return flat.conj() @ flat.T


def test_first_guess_is_the_probe_plus_weak_orthogonal_modes() -> None:
    probe = optics_probe()
    modes = initial_modes(probe, 4)
    assert modes.shape == (4, *probe.shape) and modes.dtype == probe.dtype
    powers = mode_powers(modes)
    assert powers.sum() == pytest.approx(1.0, rel=ROUNDING)
    assert powers[0] == pytest.approx(1.0 - MODE_POWER_FRACTION, rel=ROUNDING)
    assert np.all(np.diff(powers) < 0)  # sorted, and distinct
    np.testing.assert_allclose(modes[0], np.sqrt(1.0 - MODE_POWER_FRACTION) * probe, rtol=0, atol=ROUNDING)
    off_diagonal = gram(modes) - np.diag(np.diag(gram(modes)))
    assert np.abs(off_diagonal).max() < ROUNDING
    np.testing.assert_array_equal(initial_modes(probe, 1), probe[None])


def density_matrix(modes: np.ndarray) -> np.ndarray:
    flat = modes.reshape(len(modes), -1)
    return flat.T @ flat.conj()


def test_orthogonalisation_keeps_the_density_matrix_and_sorts_by_power() -> None:
    rng = np.random.default_rng(10)
    modes = complex_normal(rng, (3, 8, 8)) * np.array([1.0, 0.5, 0.7])[:, None, None]
    modes /= np.linalg.norm(modes)
    result = orthogonalise_modes(modes)
    np.testing.assert_allclose(density_matrix(result), density_matrix(modes), rtol=0, atol=ROUNDING)
    powers = mode_powers(result)
    assert np.all(np.diff(powers) < 0)
    assert powers.sum() == pytest.approx(1.0, rel=ROUNDING)
    g = gram(result)
    assert np.abs(g - np.diag(np.diag(g))).max() < ROUNDING
    # orthogonal sorted modes come back as they were (phases fixed), and the same input gives the same bits
    np.testing.assert_allclose(orthogonalise_modes(result), result, rtol=0, atol=ROUNDING)
    np.testing.assert_array_equal(orthogonalise_modes(modes), result)


def test_orthogonalisation_in_single_precision_keeps_the_dtype() -> None:
    modes = initial_modes(optics_probe(16).astype(np.complex64), 3)
    result = orthogonalise_modes(modes)
    assert result.dtype == np.complex64
    np.testing.assert_allclose(result, modes, rtol=0, atol=1e-6 * np.abs(modes).max())  # float32 rounding


def test_a_probe_step_keeps_the_total_power_and_leaves_orthogonal_modes() -> None:
    rng = np.random.default_rng(11)
    modes = initial_modes(optics_probe(16), 3)
    step = 0.02 * complex_normal(rng, modes.shape) / 16
    stepped, again = modes.copy(), modes.copy()
    step_probe(stepped, step)
    step_probe(again, step)
    np.testing.assert_array_equal(stepped, again)  # deterministic
    assert mode_powers(stepped).sum() == pytest.approx(1.0, rel=ROUNDING)
    g = gram(stepped)
    assert np.abs(g - np.diag(np.diag(g))).max() < ROUNDING
    assert np.all(np.diff(mode_powers(stepped)) < 0)
    # the step itself is in the density matrix: the same as stepping then renormalising without mixing
    plain = modes - step
    plain *= np.sqrt(1.0 / mode_powers(plain).sum())
    np.testing.assert_allclose(density_matrix(stepped), density_matrix(plain), rtol=0, atol=ROUNDING)


def test_a_focal_spread_is_an_incoherent_sum_of_defocused_probes() -> None:
    coherent = SimulationSpec(detector_px=16, detector_pixel_mrad=4.0, n_slices=1, scan_shape=(2, 2))
    np.testing.assert_array_equal(source_probes(coherent),
                                  make_probe(ProbeOptics(200e3, 25.0, 40.0), 16, coherent.pixel_size_A,
                                             dtype=np.complex128))
    spec = SimulationSpec(detector_px=16, detector_pixel_mrad=4.0, n_slices=1, scan_shape=(2, 2), focal_spread_A=50.0)
    beam = source_probes(spec)
    assert beam.shape == (3, 16, 16)
    assert mode_powers(beam).sum() == pytest.approx(1.0, rel=ROUNDING)
    # Gauss-Hermite weights of three nodes: 1/6, 2/3, 1/6 at defocus −√3σ, 0, +√3σ
    np.testing.assert_allclose(mode_powers(beam), [1 / 6, 2 / 3, 1 / 6], rtol=ROUNDING)
    sim = simulate(spec)
    starts, shifts = window_starts(scan_positions(spec), 16)
    patches = extract_patches(sim.object_truth.astype(np.complex128), starts, 16)
    propagator = fresnel_propagator(np, 16, spec.pixel_size_A, wavelength_A(spec.energy_eV), spec.slice_thickness_A,
                                    np.complex128)
    separately = sum(np.abs(forward(p, shifts, patches, propagator, 16)) ** 2 for p in beam)
    # float32 storage of the data and the truth: 6e-8 relative
    np.testing.assert_allclose(sim.intensities, separately, rtol=1e-5, atol=1e-6 * separately.max())
