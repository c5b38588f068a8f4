"""Relativistic electron optics constants.

Conventions follow Kirkland, *Advanced Computing in Electron Microscopy* (2010):
wavelength λ(E) in Å and interaction constant σ(E) in rad/(V·Å), so that a
projected potential v (V·Å) gives the transmission ``exp(i σ v)``.
"""

from __future__ import annotations

import math

ELECTRON_MASS_KG = 9.1093837015e-31
ELEMENTARY_CHARGE_C = 1.602176634e-19
PLANCK_JS = 6.62607015e-34
SPEED_OF_LIGHT_M_S = 299792458.0
ELECTRON_REST_ENERGY_EV = ELECTRON_MASS_KG * SPEED_OF_LIGHT_M_S**2 / ELEMENTARY_CHARGE_C


def _check_energy(energy_eV: float) -> None:
    if not (energy_eV > 0 and math.isfinite(energy_eV)):
        raise ValueError(f"energy_eV must be positive and finite, got {energy_eV!r}")


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength in Å for kinetic energy ``energy_eV``.

    λ = h / sqrt(2 m0 e E (1 + e E / (2 m0 c²))); 200 keV gives 0.02508 Å.
    """
    _check_energy(energy_eV)
    e_j = ELEMENTARY_CHARGE_C * energy_eV
    momentum = math.sqrt(2.0 * ELECTRON_MASS_KG * e_j * (1.0 + e_j / (2.0 * ELECTRON_MASS_KG * SPEED_OF_LIGHT_M_S**2)))
    return PLANCK_JS / momentum * 1e10


def interaction_constant_per_VA(energy_eV: float) -> float:
    """Interaction constant σ in rad/(V·Å): σ = 2π m e λ / h², relativistic mass m.

    Equivalent form: σ = (2π / (λ E)) (m0c² + E) / (2 m0c² + E), E in eV.
    200 keV gives 7.288e-4 rad/(V·Å).
    """
    lam = wavelength_A(energy_eV)
    rest = ELECTRON_REST_ENERGY_EV
    return 2.0 * math.pi / (lam * energy_eV) * (rest + energy_eV) / (2.0 * rest + energy_eV)


def real_space_pixel_size_A(energy_eV: float, window_px: int, detector_pixel_mrad: float) -> float:
    """Real-space pixel of an ``window_px``-wide window: λ / (N · Δθ)."""
    if window_px <= 0 or not detector_pixel_mrad > 0:
        raise ValueError(
            f"window_px and detector_pixel_mrad must be positive, got {window_px}, {detector_pixel_mrad}"
        )
    return wavelength_A(energy_eV) / (window_px * detector_pixel_mrad * 1e-3)
