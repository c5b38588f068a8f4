"""``ptylive bench quality``: the ptylive side on a tiny simulated scan, and the peers' grid mapping.

The peers themselves (py4DSTEM, PtyRAD) are never installed here: they live in venvs of their own
that only the benchmark creates, outside CI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ptylive.tools import bench_quality

ITERATIONS = 2


def _peer_common() -> ModuleType:
    """``tools/peers/_common.py`` (a script folder, not a package: the adapters run in other venvs)."""
    path = Path(bench_quality.__file__).resolve().parent / "peers" / "_common.py"
    name = "peers_common_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi
@pytest.mark.slow
def test_ptylive_side_reports_every_field(small_scan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_quality.main(cases=[small_scan], ranks=2, iterations=ITERATIONS, peers="none", as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iterations"] == ITERATIONS and report["ranks"] == 2 and report["peers"] == []
    assert report["machine"]["cores"] >= 1 and report["machine"]["ptylive"]
    (case,) = report["cases"]
    assert case["case"] == "small" and case["probe_in_file"] and not case["true_positions"]
    assert [(r["code"], r["run"]) for r in case["rows"]] == [("ptylive", "1 rank sync"), ("ptylive", "2 ranks async")]
    for row in case["rows"]:
        assert "error" not in row, row
        assert row["finite"] is True
        assert 0.2 < row["correlation"] <= 1.0, row["correlation"]
        assert len(row["per_slice"]) == 3 and all(-1.0 <= c <= 1.0 for c in row["per_slice"])
        assert len(row["shift_px"]) == 2 and all(abs(s) <= 8.0 for s in row["shift_px"])
        assert row["iterations"] == row["iterations_run"] == ITERATIONS
        assert row["n_slices"] == 3 and row["slice_thickness_A"] > 0
        assert 0 < row["seconds_per_iteration"] and 0 < row["loop_s"] < row["wall_s"]
        assert math.isfinite(row["final_loss"]) and row["final_loss"] > 0
        assert row["position_rms_before_A"] == 0.0 == row["position_rms_after_A"]
    table = bench_quality.format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("| case | code | run | it | corr | per-slice corr")
    assert len(lines) == 2 + 2 and "| small | ptylive | 2 ranks async | 2 |" in table
    assert f"{case['rows'][0]['correlation']:.3f}" in lines[2]


def test_unknown_peer_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        bench_quality.main(cases=[Path("unused.h5")], peers="py4dstem,ptychoshelves")


def test_peer_object_lands_on_ptylive_grid() -> None:
    """Peer pixel (r + 5, c + 3) is ptylive pixel (r, c): a crop; a fraction of a pixel is a Fourier shift."""
    common = _peer_common()
    rng = np.random.default_rng(0)
    peer = rng.standard_normal((2, 40, 36))
    out = common.to_ptylive_grid(peer, np.array([5.0, 3.0]), (30, 28))
    assert out.shape == (2, 30, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out, peer[:, 5:35, 3:31], atol=1e-6)
    partly_outside = common.to_ptylive_grid(peer, np.array([-2.0, 0.0]), (30, 28))
    assert np.all(partly_outside[:, :2] == 0)
    np.testing.assert_allclose(partly_outside[:, 2:], peer[:, :28, :28], atol=1e-6)
    smooth = np.cos(2 * np.pi * np.arange(32) / 32)[None, :, None] * np.ones((1, 32, 32))
    half = common.to_ptylive_grid(smooth, np.array([0.5, 0.0]), (32, 32))
    np.testing.assert_allclose(half[0, :, 0], np.cos(2 * np.pi * (np.arange(32) + 0.5) / 32), atol=1e-5)


def test_checkpoints_cover_iterations_and_time_budget() -> None:
    """K iterations are always run; past K the peer goes on until the budget is spent."""
    common = _peer_common()
    calls = []

    def step() -> float:
        calls.append(1)
        return 1.0 / len(calls)

    done = common.run_with_checkpoints(step, lambda: len(calls), iterations=3, budget_s=0.0)
    assert len(calls) == 3 and done.at_iterations[0] == 3 and done.at_time is None
    assert len(done.iteration_seconds) == 3 and done.iteration_seconds == sorted(done.iteration_seconds)
    assert done.iteration_seconds[-1] == done.seconds
    calls.clear()
    done = common.run_with_checkpoints(step, lambda: len(calls), iterations=2, budget_s=1e9)
    assert len(calls) == 2 + common.MAX_EXTRA_ITERATIONS and done.at_time[1] == len(calls)
    assert done.losses[-1] == pytest.approx(1.0 / len(calls))


def test_the_cli_passes_extra_ptylive_flags_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ptylive bench quality --ptylive-args=--correct-positions`` reaches the benchmark's ``ptylive_args``."""
    import importlib.metadata

    from ptylive.daemon.cli import commands
    from ptylive.daemon.cli.main import build_parser

    seen: dict[str, object] = {}

    class Point:
        name = "quality"

        @staticmethod
        def load() -> object:
            return lambda **options: seen.update(options) or 0

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Point()])
    args = build_parser().parse_args(["bench", "quality", "--peers", "none", "--ptylive-args=--correct-positions"])
    assert commands.bench(args, []) == 0
    assert seen["ptylive_args"] == "--correct-positions" and seen["peers"] == "none"
