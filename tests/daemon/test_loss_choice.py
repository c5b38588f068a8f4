"""``loss = "auto"``: the dark-field share of a mean pattern and the rule that picks the loss from it
(daemon/engine/loss_choice.py); offline ``validate`` applies it to the whole file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptylive.daemon.cli.offline import validate
from ptylive.daemon.engine.loss_choice import (
    DISK_EDGE,
    WEAK_SCATTERING_LIMIT,
    choose_loss,
    dark_field_fraction,
    dark_field_mask,
)
from ptylive.daemon.engine.options import EngineOptions
from tests.abtem_cases import case_path

PIXEL_MRAD, ALPHA_MRAD, D = 1.0, 10.0, 64


def test_the_dark_field_share_counts_exactly_the_pixels_beyond_the_disk_edge() -> None:
    mask = dark_field_mask(D, PIXEL_MRAD, ALPHA_MRAD)
    k = np.arange(D) - D // 2
    radius = np.hypot(k[:, None], k[None, :]) * PIXEL_MRAD
    np.testing.assert_array_equal(mask, radius > DISK_EDGE * ALPHA_MRAD)
    pattern = np.where(radius <= ALPHA_MRAD, 100.0, 0.0)  # a bright-field disk, nothing scattered
    assert dark_field_fraction(pattern, PIXEL_MRAD, ALPHA_MRAD) == 0.0
    pattern[D // 2, D // 2 + 20] = 5.0  # 20 mrad out: dark field
    pattern[D // 2, D // 2 + 10] += 7.0  # 10 mrad: inside the edge (1.1 α), still bright field
    assert dark_field_fraction(pattern, PIXEL_MRAD, ALPHA_MRAD) == pytest.approx(5.0 / pattern.sum(), rel=1e-12)
    assert dark_field_fraction(np.zeros((D, D)), PIXEL_MRAD, ALPHA_MRAD) == 0.0


@pytest.mark.parametrize("requested, fraction, counted, expected", [
    ("auto", 0.001, True, "poisson"),                        # graphene: a weak scatterer, counted
    ("auto", WEAK_SCATTERING_LIMIT, True, "amplitude"),      # the limit itself is not below it
    ("auto", 0.068, True, "amplitude"),                      # thick SrTiO3
    ("auto", 0.001, False, "amplitude"),                     # not counts: no Poisson noise to model
    ("amplitude", 0.001, True, "amplitude"),                 # a loss that is given is kept
    ("poisson", 0.5, False, "poisson"),
])
def test_the_rule(requested: str, fraction: float, counted: bool, expected: str) -> None:
    assert choose_loss(requested, fraction, counted) == expected


@pytest.mark.parametrize("case, expected", [("graphene_lowdose_d1e4", "poisson"),
                                            ("graphene_lowdose_d1e5", "poisson"),
                                            ("srtio3_thick_d1e4", "amplitude"),
                                            ("srtio3_static", "amplitude"),
                                            ("srtio3_perturbed", "amplitude"),
                                            ("pbtio3_deep", "amplitude")])
def test_offline_chooses_from_the_whole_file(tmp_path: Path, case: str, expected: str) -> None:
    """abTEM's cases (0.1 % beyond the disk for graphene, 4.7-6.9 % for the crystals; tests/data/abtem)."""
    job = validate(case_path(case), tmp_path / "out.h5", 1, None, None, None, "single", "numpy",
                   EngineOptions(loss="auto"), quiet=True)
    assert job.options.loss == expected
    given = validate(case_path(case), tmp_path / "out.h5", 1, None, None, None, "single", "numpy",
                     EngineOptions(loss="amplitude"), quiet=True)
    assert given.options.loss == "amplitude"


def test_reconstruct_says_which_loss_it_fits_and_why(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli("reconstruct", str(case_path("graphene_lowdose_d1e4")), "--iterations", "1",
                     "--out", str(tmp_path / "out.h5"))
    assert result.returncode == 0, result.stderr
    assert "poisson loss (0.10% of the counts beyond the bright-field disk)" in result.stderr, result.stderr
