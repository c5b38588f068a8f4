"""Independent data: scans abTEM simulated (tests/data/abtem), reconstructed at default settings.

Nothing here is ptylive's own forward model: frozen phonons, a finer simulation grid, a cropped and
binned detector, Poisson noise, and no probe in the file (it is built from the optics attributes and
refined). Every setting is the default (position correction included: it is on by default, so the exact
positions of the thick case are corrected too and must stay good). Thresholds are issue 11's:
projected-phase correlation with the truth after sub-pixel registration >= 0.85 on the thick crystal
(phonon and static) and >= 0.9 on the perturbed scan, whose rms position error the correction must cut
at least 3x, and the final loss of 4 ranks async within 5 % of 1 rank sync after the same iterations.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pytest

from tests.abtem_cases import case_path, score_result
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

ITERATIONS = "20"
RUNS = [(1, "sync"), (4, "async")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``scored(case, ranks, mode, *extra, iterations=ITERATIONS)``: the case reconstructed at the defaults, but
    for the ``extra`` options (once per module), and scored."""
    done: dict[tuple[str, ...], dict[str, Any]] = {}

    def run(case: str, ranks: int, mode: str, *extra: str, iterations: str = ITERATIONS) -> dict[str, Any]:
        key = (case, ranks, mode, iterations, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp("abtem") / f"{case}-{ranks}-{mode}.h5"
            result = run_cli("reconstruct", str(case_path(case)), "--ranks", str(ranks), "--mode", mode,
                             "--iterations", iterations, "--out", str(out), "--quiet", *extra)
            assert result.returncode == 0, result.stderr
            with h5py.File(out, "r") as f:
                chosen = str(f.attrs["loss_function"])
            done[key] = {**score_result(out, case), "loss_function": chosen}
        return done[key]

    return run


@pytest.mark.parametrize("ranks, mode", RUNS)
def test_thick_srtio3_with_frozen_phonons_at_1e5(scored: Any, ranks: int, mode: str) -> None:
    """62 Å of SrTiO3 (32 file slices), 4 phonon configurations, 1e5 e/Å²: the kind of case whose strong phase
    made the async engine diverge (NaN from the second iteration)."""
    score = scored("srtio3_thick_d1e5", ranks, mode)
    assert score["finite"] and score["loss_function"] == "amplitude"  # loss = "auto" on a strong scatterer
    assert score["correlation"] >= 0.85, score
    first, last = score["loss_first_last"]
    assert np.isfinite([first, last]).all() and last < first


@pytest.mark.parametrize("ranks, mode", RUNS)
def test_static_thick_srtio3_keeps_its_depth(scored: Any, ranks: int, mode: str) -> None:
    """The thick crystal with every atom at its lattice site (one configuration), 1e5 e/Å²: without the
    missing-cone filter the phase gathered in the middle slices and the correlation stayed at 0.41 whatever the
    iterations (0.28 after 100). With it (on by default) 30 iterations reached 0.957 (1 rank sync); the
    threshold is issue 11's for a thick crystal, at 30 iterations because the filter's fit is still improving at
    20 (0.87 / 0.86 there: too close to 0.85 to tell a regression from the approach)."""
    score = scored("srtio3_static", ranks, mode, iterations="30")
    assert score["finite"] and score["loss_function"] == "amplitude"
    assert score["correlation"] >= 0.85, score
    first, last = score["loss_first_last"]
    assert np.isfinite([first, last]).all() and last < first


@pytest.mark.parametrize("ranks, mode", RUNS)
def test_an_unknown_probe_is_refined_without_distorting_the_scan(scored: Any, ranks: int, mode: str) -> None:
    """31 Å of SrTiO3 whose true probe has 30 Å more defocus than the file says, C12 = 30 Å and C30 = 5 µm (none
    of it in the file), exact positions. The probe is refined from the optics' one. When the global position
    fit took scale and shear too, it absorbed the probe's error instead (the exact positions sheared 3.7 %,
    0.16 Å rms; correlation 0.870 / 0.840); the rotation-only fit measured 0.963 (1 rank sync, deterministic)
    and 0.928-0.963 over seven 4-rank async runs (their timing differs), 0.06-0.08 Å (30 iterations).
    Thresholds: issue 11's 0.9 (as for the perturbed scan) in sync, its 0.85 for thick crystals in async
    (the spread of the runs), and in both the exact positions kept within half a pixel (0.18 Å pixels)."""
    score = scored("srtio3_aberrated", ranks, mode, iterations="30")
    assert score["finite"]
    assert score["correlation"] >= (0.9 if mode == "sync" else 0.85), score
    assert score["position_rms_after_A"] <= 0.5 * 0.18305, score
    first, last = score["loss_first_last"]
    assert last < first


@pytest.mark.parametrize("ranks, mode", RUNS)
def test_perturbed_scan_positions_are_corrected(scored: Any, ranks: int, mode: str) -> None:
    """The file holds the nominal raster; the data were taken at positions rotated, scaled and jittered."""
    score = scored("srtio3_perturbed", ranks, mode)
    assert score["finite"]
    assert score["position_rms_before_A"] >= 0.3  # the errors are real
    assert score["position_rms_after_A"] <= score["position_rms_before_A"] / 3, score
    assert score["correlation"] >= 0.9, score


@pytest.mark.parametrize("case", ["srtio3_thick_d1e5", "srtio3_perturbed"])
def test_async_final_loss_is_within_five_percent_of_sync(scored: Any, case: str) -> None:
    sync, asynchronous = (scored(case, ranks, mode)["loss_first_last"][1] for ranks, mode in RUNS)
    assert abs(asynchronous / sync - 1) <= 0.05, (sync, asynchronous)


@pytest.mark.parametrize("ranks, mode", RUNS)
def test_deep_lead_perovskite_with_half_the_slices(scored: Any, ranks: int, mode: str) -> None:
    """78 Å in 40 file slices, 128-px detector, 25 mrad, Pb columns (the strongest phase of the cases),
    reconstructed with 20 slices: ``--slices`` keeps the file's total thickness (3.905 Å each), as issue
    11's held-back case was run."""
    score = scored("pbtio3_deep", ranks, mode, "--slices", "20")
    assert score["finite"]
    assert score["n_slices"] == 20 and score["slice_thickness_A"] == pytest.approx(2 * 1.9525)
    assert score["correlation"] >= 0.85, score
    first, last = score["loss_first_last"]
    assert np.isfinite([first, last]).all() and last < first


def test_auto_loss_takes_poisson_on_low_dose_graphene_and_fits_it_better(scored: Any) -> None:
    """Bilayer graphene at 1e4 e/Å², a weak scatterer (0.1 % of its counts beyond the bright-field disk):
    ``loss = "auto"`` (the default) takes the Poisson likelihood, and the image is better than the amplitude
    loss's at the same iterations, 1 rank sync (deterministic: the difference is not run-to-run noise)."""
    auto = scored("graphene_lowdose_d1e4", 1, "sync")
    amplitude = scored("graphene_lowdose_d1e4", 1, "sync", "--loss", "amplitude")
    assert auto["loss_function"] == "poisson" and amplitude["loss_function"] == "amplitude"
    assert auto["finite"] and amplitude["finite"]
    assert auto["correlation"] > amplitude["correlation"], (auto, amplitude)
