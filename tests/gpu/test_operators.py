"""Adjoint tests ⟨F m, d⟩ = ⟨m, F* d⟩ for every linear operator, and physics constants."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.physics import interaction_constant_per_VA, wavelength_A
from ptylive.gpu.probe import ProbeOptics, aperture_amplitude, fourier_shift, make_probe
from ptylive.gpu.propagation import farfield, farfield_adjoint, fresnel_propagator, propagate

RNG = np.random.default_rng(7)
# Relative error of a complex128 inner product of ~1e3 terms after a few FFTs.
ADJOINT_RTOL = 1e-12


def random_complex(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)


def inner(a: np.ndarray, b: np.ndarray) -> complex:
    return complex(np.vdot(a, b))


def test_wavelength_and_sigma_match_kirkland_tables() -> None:
    # Kirkland (2010) Table 2.2: 100 kV 0.03701 Å, 200 kV 0.02508 Å, 300 kV 0.01969 Å.
    assert wavelength_A(100e3) == pytest.approx(0.03701, abs=1e-5)
    assert wavelength_A(200e3) == pytest.approx(0.02508, abs=1e-5)
    assert wavelength_A(300e3) == pytest.approx(0.01969, abs=1e-5)
    # σ(200 kV) = 0.00072884 rad/(V·Å), σ(300 kV) = 0.00065262.
    assert interaction_constant_per_VA(200e3) == pytest.approx(7.2884e-4, rel=2e-4)
    assert interaction_constant_per_VA(300e3) == pytest.approx(6.5262e-4, rel=2e-4)


def test_bad_energy_is_named() -> None:
    with pytest.raises(ValueError, match="energy_eV"):
        wavelength_A(-1.0)


def test_propagator_adjoint() -> None:
    h = fresnel_propagator(np, 24, 0.3, 0.025, 7.0, dtype=np.complex128)
    m, d = random_complex(3, 24, 24), random_complex(3, 24, 24)
    fm = propagate(m.copy(), h)
    fd = propagate(d.copy(), h.conj())
    assert abs(inner(fm, d) - inner(m, fd)) <= ADJOINT_RTOL * abs(inner(fm, d))


def test_propagator_composes_and_is_unitary() -> None:
    h1 = fresnel_propagator(np, 16, 0.3, 0.025, 2.0, dtype=np.complex128)
    h2 = fresnel_propagator(np, 16, 0.3, 0.025, 3.0, dtype=np.complex128)
    h3 = fresnel_propagator(np, 16, 0.3, 0.025, 5.0, dtype=np.complex128)
    m = random_complex(2, 16, 16)
    np.testing.assert_allclose(propagate(propagate(m.copy(), h1), h2), propagate(m.copy(), h3), atol=1e-12)
    assert np.linalg.norm(propagate(m.copy(), h3)) == pytest.approx(np.linalg.norm(m), rel=1e-12)


def test_shift_adjoint_and_integer_shift_is_roll() -> None:
    shifts = RNG.uniform(-1, 1, size=(4, 2))
    m, d = random_complex(4, 20, 20), random_complex(4, 20, 20)
    fm = fourier_shift(m, shifts)
    fd = fourier_shift(d, -shifts)
    assert abs(inner(fm, d) - inner(m, fd)) <= ADJOINT_RTOL * abs(inner(fm, d))
    rolled = fourier_shift(m[:1], np.array([[2.0, -3.0]]))
    np.testing.assert_allclose(rolled[0], np.roll(m[0], (2, -3), axis=(0, 1)), atol=1e-12)


def test_zero_shifts_copy_the_wave_without_an_fft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shift exactly zero (or -0.0, the adjoint's): the wave itself, broadcast, and no transform."""
    import ptylive.gpu.probe as probe_module

    probe, waves = random_complex(1, 20, 20)[0], random_complex(3, 20, 20)
    shifted = fourier_shift(probe, np.array([[0.1, 0.0], [0.0, 0.0], [0.0, -0.3]]))  # not all zero: ramps
    np.testing.assert_allclose(shifted[1], probe, atol=1e-12)

    def no_fft(*_: object, **__: object) -> None:
        raise AssertionError("an FFT was run for zero shifts")

    monkeypatch.setattr(probe_module, "fft2", no_fft)
    monkeypatch.setattr(probe_module, "ifft2", no_fft)
    zeros = np.zeros((3, 2))
    np.testing.assert_array_equal(fourier_shift(probe, zeros), np.broadcast_to(probe, (3, 20, 20)))
    np.testing.assert_array_equal(fourier_shift(waves, -zeros), waves)


@pytest.mark.parametrize("window, detector", [(16, 16), (24, 12), (32, 16)])
def test_farfield_adjoint(window: int, detector: int) -> None:
    m, d = random_complex(3, window, window), random_complex(3, detector, detector)
    fm = farfield(m.copy(), detector)
    fd = farfield_adjoint(d, window, out=np.empty((3, window, window), complex))
    assert abs(inner(fm, d) - inner(m, fd)) <= ADJOINT_RTOL * abs(inner(fm, d))


def test_farfield_centres_zero_frequency_and_crops() -> None:
    flat = np.ones((1, 24, 24), complex)
    field = farfield(flat.copy(), 12)
    assert field.shape == (1, 12, 12)
    assert abs(field[0, 6, 6]) == pytest.approx(24.0)  # ortho: sum / sqrt(N²)
    assert np.abs(field).sum() == pytest.approx(24.0)
    np.testing.assert_allclose(farfield(flat.copy(), 24)[0], np.fft.fftshift(np.fft.fft2(flat[0], norm="ortho")))


def test_probe_is_normalised_centred_and_band_limited() -> None:
    optics = ProbeOptics(energy_eV=200e3, convergence_semiangle_mrad=20.0, defocus_A=0.0)
    probe = make_probe(optics, 64, 0.2, dtype=np.complex128)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0, rel=1e-12)
    assert np.unravel_index(np.argmax(np.abs(probe)), probe.shape) == (32, 32)
    spectrum = np.abs(np.fft.fft2(np.fft.ifftshift(probe)))
    k = np.fft.fftfreq(64, 0.2)
    dk = k[1]
    # A Fourier pixel whose whole square lies beyond the aperture (its nearest point farther than α/λ)
    # carries nothing; one wholly inside carries the full amplitude.
    nearest = np.maximum(np.abs(k) - dk / 2, 0.0)
    farthest = np.abs(k) + dk / 2
    k_max = 20e-3 / wavelength_A(200e3)
    outside = nearest[:, None] ** 2 + nearest[None, :] ** 2 > k_max**2
    inside = farthest[:, None] ** 2 + farthest[None, :] ** 2 <= k_max**2
    assert spectrum[outside].max() < 1e-12 * spectrum.max()
    np.testing.assert_allclose(spectrum[inside], spectrum.max(), rtol=1e-12)


def test_aperture_amplitude_is_the_root_of_the_area_inside() -> None:
    """Σ amplitude² is the aperture's area in pixels, within the sub-pixel sampling's error on the rim."""
    k = np.fft.fftfreq(64, 0.2)
    radius_px = 9.37
    amplitude = aperture_amplitude(k, radius_px * k[1], supersampling=16)
    assert amplitude.min() >= 0 and amplitude.max() == 1.0
    rim_error = 2 * np.pi * radius_px / 16  # at most ~1/s of a pixel per rim pixel crossed
    assert np.sum(amplitude**2) == pytest.approx(np.pi * radius_px**2, abs=rim_error)
    partial = (amplitude > 0) & (amplitude < 1)
    assert 0 < partial.sum() < 2 * 2 * np.pi * radius_px  # only the rim is partial


def test_defocus_sign_underfocused_probe_comes_to_focus_downstream() -> None:
    base = dict(energy_eV=200e3, convergence_semiangle_mrad=25.0)
    focused = make_probe(ProbeOptics(**base, defocus_A=0.0), 64, 0.2, dtype=np.complex128)
    under = make_probe(ProbeOptics(**base, defocus_A=100.0), 64, 0.2, dtype=np.complex128)
    over = make_probe(ProbeOptics(**base, defocus_A=-100.0), 64, 0.2, dtype=np.complex128)
    assert np.abs(under).max() < 0.5 * np.abs(focused).max()
    # Without C30, ±defocus give complex-conjugate spectra: mirror-image probes, same intensity.
    np.testing.assert_allclose(np.abs(under), np.abs(over), atol=1e-12)
    # Underfocus: the beam still converges at the specimen, so propagating the
    # underfocused probe forward by +100 Å (our Fresnel kernel) brings it to focus.
    h = fresnel_propagator(np, 64, 0.2, wavelength_A(200e3), 100.0, dtype=np.complex128)
    propagated = propagate(np.fft.ifftshift(under)[None].copy(), h)[0]
    np.testing.assert_allclose(np.fft.fftshift(propagated), focused, atol=1e-10)


def test_phase_correlation_compares_transmissions_modulo_two_pi() -> None:
    """Two slices that put 3.3 + 0.2 rad where the truth has 3.0 + 0.5: the same total, but angle() reads 3.3 as
    3.3 − 2π, so Σ angle differs by 2π at that pixel. It must not lower the score; a real error must."""
    from ptylive.gpu.quality import phase_correlation

    rng = np.random.default_rng(3)
    phase = rng.uniform(0.0, 1.5, size=(2, 24, 24))
    phase[:, 10, 10] = (3.0, 0.5)
    truth = np.exp(1j * phase)
    moved = phase.copy()
    moved[:, 10, 10] = (3.3, 0.2)
    positions = np.array([[2.0, 2.0], [21.0, 21.0]])
    assert np.angle(np.exp(1j * moved)).sum(axis=0)[10, 10] == pytest.approx(3.5 - 2 * np.pi)
    assert phase_correlation(np.exp(1j * moved), truth, positions) == pytest.approx(1.0, abs=1e-12)
    wrong = phase.copy()
    wrong[0, 10, 10] += 1.0  # a real error still counts
    assert phase_correlation(np.exp(1j * wrong), truth, positions) < 1 - 1e-3
