"""Which loss fits a data set: ``loss = "auto"`` resolved from the data (docs/physics.md, Losses).

The Poisson likelihood is the noise model of counted electrons; the amplitude loss is its variance-stabilised
approximation, whose penalty at a pixel is bounded by the pixel's count. Measured on the abTEM cases, the choice
follows how strongly the specimen scatters, not the dose:

- a weak scatterer (thin, light elements: graphene, 0.1 % of the counts beyond the bright-field disk) keeps its
  signal in few dark-field counts, which the Poisson loss follows and the amplitude loss does not
  (graphene 1e4 e/Å²: 0.820 against 0.755; 1e5: 0.911 against 0.885);
- a strong scatterer (thick or heavy crystals: 4.7-6.9 % beyond the disk, much of it thermal diffuse scattering
  that one coherent object does not model) makes the Poisson loss chase those counts (SrTiO3 1e4 / 1e5 / 1e6:
  0.961 / 0.966 / 0.954 against 0.984 / 0.989 / 0.978).

So ``auto`` takes Poisson for counted data whose mean pattern has less than :data:`WEAK_SCATTERING_LIMIT` of its
counts beyond 1.1 α (the disk's edge with a margin for its blur), amplitude otherwise. The limit lies between the
measured groups, a factor 5-10 from each (our own 3-slice PbTiO3 simulations: 2.1 %, amplitude).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module

logger = logging.getLogger(__name__)

AUTO = "auto"
#: Share of a mean pattern's counts beyond 1.1 α below which a specimen counts as a weak scatterer.
WEAK_SCATTERING_LIMIT = 0.01
#: The bright-field disk's edge, in units of α, beyond which counts are dark field.
DISK_EDGE = 1.1


def dark_field_mask(detector_px: int, detector_pixel_mrad: float, convergence_semiangle_mrad: float,
                    xp: Any = np) -> Any:
    """(D, D) bool: the pixels beyond ``DISK_EDGE`` α from the zero-frequency pixel (D//2, D//2)."""
    axis = (xp.arange(detector_px) - detector_px // 2) * detector_pixel_mrad
    radius = xp.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)
    return radius > DISK_EDGE * convergence_semiangle_mrad


def dark_field_fraction(pattern: Any, detector_pixel_mrad: float, convergence_semiangle_mrad: float) -> float:
    """Share of the counts of ``pattern`` ((D, D), a sum or mean of frames) beyond the bright-field disk; 0 for an
    empty pattern."""
    xp = get_array_module(pattern)
    mask = dark_field_mask(pattern.shape[-1], detector_pixel_mrad, convergence_semiangle_mrad, xp)
    total = float(xp.sum(pattern))
    return float(xp.sum(pattern[mask])) / total if total > 0 else 0.0


def choose_loss(requested: str, fraction: float, counted: bool) -> str:
    """The loss to fit with: ``requested`` unless it is ``"auto"`` (see the module docstring)."""
    if requested != AUTO:
        return requested
    chosen = "poisson" if counted and fraction < WEAK_SCATTERING_LIMIT else "amplitude"
    logger.info("loss %s (auto: %.2f %% of the counts beyond the bright-field disk, %s %.0f %%; %s data)", chosen,
                100 * fraction, "below" if fraction < WEAK_SCATTERING_LIMIT else "not below",
                100 * WEAK_SCATTERING_LIMIT, "counted" if counted else "not counted")
    return chosen

