"""Part 1b of ``ptylive bench engine`` measures what it says: the engine's default iteration and, apart, the
missing-cone filter inside it (the numbers themselves are the benchmark's, not a test's)."""

from __future__ import annotations

from ptylive.daemon.engine.options import EngineOptions
from ptylive.tools.bench_iteration import iteration_case, iteration_problem


def test_the_problem_has_the_engines_default_filter_and_can_switch_it_off() -> None:
    assert EngineOptions().missing_cone > 0
    assert iteration_problem(4).cone is not None
    assert iteration_problem(4, missing_cone=0.0).cone is None
    assert iteration_problem(1).cone is None  # one slice: nothing to filter along the depth


def test_the_filter_is_timed_inside_the_iteration() -> None:
    on = iteration_case(iteration_problem(4), iterations=2)
    off = iteration_case(iteration_problem(4, missing_cone=0.0), iterations=2)
    assert on["samples"] == off["samples"] == 2
    assert 0 < on["cone_s"] < on["iteration_s"] and on["cone_ratio"] > 0
    assert off["cone_s"] < 1e-3 * off["iteration_s"]  # the call returns at once without a filter
    assert on["ffts"] == off["ffts"] > 0  # the filter's transforms are numpy's, not among the replayed ones
