"""Cases and scores of ``ptylive bench quality``: the independent scorer applied to any code's output.

A case is a scan file with a known truth:

* an abTEM case (``tests/data/abtem/*.h5``): ``projected_phase_truth``, ``phase_truth_per_slice`` and,
  where the probe really was elsewhere, ``positions_true_px``;
* a ``ptylive simulate`` file (for plumbing and tests): the truth is ``object_truth``, the projected
  phase ``Σ_s angle(object_truth_s)`` and one depth group per slice.

Every code is scored by the one scorer of the abTEM cases, ``tests/abtem_cases.py`` (projected-phase
correlation after sub-pixel registration, per-slice correlation, rms position error). The scorer lives
in the source checkout, not in the installed package, so it is loaded from there by path: the benchmark
needs a checkout (its default cases are there too).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]
SCORER_PATH = REPOSITORY / "tests" / "abtem_cases.py"
CASES_DIR = REPOSITORY / "tests" / "data" / "abtem"


def scorer() -> ModuleType:
    """The module ``tests/abtem_cases.py`` of the checkout (loaded once, by path)."""
    name = "ptylive_bench_abtem_cases"
    if name in sys.modules:
        return sys.modules[name]
    if not SCORER_PATH.is_file():
        raise FileNotFoundError(f"the scorer {SCORER_PATH} is missing: ptylive bench quality runs from a "
                                "source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(name, SCORER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def default_case_files() -> list[Path]:
    """Every ``tests/data/abtem/*.h5`` of the checkout, sorted."""
    return sorted(CASES_DIR.glob("*.h5"))


def load_case(path: Path) -> Any:
    """The scorer's ``AbtemCase`` for an abTEM case file or a ``ptylive simulate`` file.

    Raises
    ------
    ValueError
        When the file holds neither ``projected_phase_truth`` nor ``object_truth``.
    """
    module = scorer()
    with h5py.File(path, "r") as f:
        if "projected_phase_truth" in f:
            kind = "abtem"
        elif "object_truth" in f:
            kind = "simulate"
        else:
            raise ValueError(f"{path}: no truth to score against (expected 'projected_phase_truth' of an abTEM "
                             "case or 'object_truth' of ptylive simulate)")
    if kind == "abtem":
        return module.load_case(path)
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if np.ndim(v) == 0 and hasattr(v, "item") else v) for k, v in f.attrs.items()}
        truth = np.asarray(f["object_truth"][...])
        positions = np.asarray(f["positions_px"][...], np.float64)
        detector_px = int(f["intensities"].shape[-1])
    phases = np.angle(truth).astype(np.float64)
    attrs.setdefault("n_slices", phases.shape[0])
    attrs.setdefault("slice_thickness_A", 1.0)
    attrs["truth_slice_thickness_A"] = float(attrs["slice_thickness_A"])
    known = {"name": path.stem, "path": path, "attrs": attrs, "positions_px": positions,
             "positions_true_px": positions.copy(), "projected_phase_truth": phases.sum(axis=0),
             "phase_truth_per_slice": phases, "detector_px": detector_px}
    fields = {field.name for field in dataclasses.fields(module.AbtemCase)}
    if fields - set(known):
        raise ValueError(f"the scorer's AbtemCase wants {sorted(fields - set(known))}, which a simulate file lacks")
    return module.AbtemCase(**{name: value for name, value in known.items() if name in fields})


def file_has_probe(path: Path) -> bool:
    """Whether the scan file carries a probe (``probe`` dataset: the true probe of a simulation)."""
    with h5py.File(path, "r") as f:
        return "probe" in f


def has_true_positions(case: Any) -> bool:
    """Whether the case's true positions differ from the nominal ones in the file."""
    return not np.array_equal(case.positions_px, case.positions_true_px)


def score_result_file(result: Path, case: Any) -> dict[str, Any]:
    """Scores of a ``ptylive reconstruct`` output, by the scorer's own ``score_result``."""
    return dict(scorer().score_result(result, case))


def score_phases(phases: npt.NDArray[np.floating], slice_thickness_A: float, case: Any,
                 positions_px: npt.NDArray[np.floating] | None = None) -> dict[str, Any]:
    """Scores of a peer's per-slice phases on ptylive's object grid.

    Parameters
    ----------
    phases : (S, H, W) float
        Phase of each slice's transmission, on the case's object grid (pixel (0, 0) is ptylive's).
    slice_thickness_A : float
        Thickness of the peer's slices.
    case : AbtemCase
    positions_px : (n, 2) float, optional
        The peer's final positions on the same grid (default: the nominal positions, uncorrected).

    Returns
    -------
    dict
        The keys of the scorer's ``score_result`` that apply (correlation, shift_px, per_slice, finite,
        position_rms_before_A, position_rms_after_A).
    """
    module = scorer()
    phases = np.asarray(phases, np.float64)
    shape = (min(phases.shape[-2], case.object_shape[0]), min(phases.shape[-1], case.object_shape[1]))
    phases = phases[:, :shape[0], :shape[1]]
    truth, _ = module.crop_truth(case, shape)
    finite = bool(np.isfinite(phases).all())
    correlation, shift = module.phase_correlation(phases.sum(axis=0), truth, case.positions_px)
    per_slice = (module.per_slice_correlation(np.exp(1j * phases), slice_thickness_A, case, shift)
                 if np.isfinite(shift).all() else [float("nan")] * len(case.phase_truth_per_slice))
    after = case.positions_px if positions_px is None else np.asarray(positions_px, np.float64)
    return {
        "correlation": float(correlation),
        "shift_px": [float(x) for x in shift],
        "per_slice": [float(x) for x in per_slice],
        "finite": finite,
        "position_rms_before_A": module.rms_position_error(case.positions_px, case.positions_true_px)
        * case.pixel_size_A,
        "position_rms_after_A": module.rms_position_error(after, case.positions_true_px) * case.pixel_size_A,
    }
