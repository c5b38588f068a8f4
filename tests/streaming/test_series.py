"""Series bookkeeping: every classification path, counters that add up, coverage, start/end policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.streaming.protocol import REJECT_REASONS, Frame, SeriesEnd, SeriesStart
from ptylive.streaming.series import (
    ALL_REJECT_REASONS,
    INGEST_REJECT_REASONS,
    RegistryConfig,
    SeriesRegistry,
    SeriesState,
)


def make_start(series_id: str = "s1", scan_shape: tuple[int, int] = (3, 4), dtype: str = "uint16",
               detector_shape: tuple[int, int] = (4, 4), positions_A: np.ndarray | None = None) -> SeriesStart:
    return SeriesStart(series_id=series_id, scan_shape=scan_shape, scan_step_A=(0.5, 0.5),
                       detector_shape=detector_shape, dtype=dtype, energy_eV=200e3, convergence_semiangle_mrad=25.0,
                       defocus_A=40.0, detector_pixel_mrad=2.0, positions_A=positions_A)


def make_frame(series_id: str = "s1", index: int = 0, shape: tuple[int, int] = (4, 4), dtype: str = "uint16",
               position_A: tuple[float, float] | None = None, fill: float = 1) -> Frame:
    return Frame(series_id, index, np.full(shape, fill, dtype=dtype), position_A)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def registry(**config: object) -> SeriesRegistry:
    return SeriesRegistry(RegistryConfig(**config), clock=Clock())  # type: ignore[arg-type]


def assert_counters_add_up(reg: SeriesRegistry) -> None:
    ingest_rejected = sum(reg.rejected[r] for r in INGEST_REJECT_REASONS)
    assert reg.accepted + reg.duplicates + ingest_rejected == reg.frames_offered
    states = [s for s in (reg.current, *reg.queued, *reg.finished) if s is not None]
    for state in states:
        assert state.received + state.duplicated + sum(state.rejected.values()) == state.offered
        assert state.received == int(state.coverage.sum()) and state.missing == state.n_expected - state.received
        assert all(state.rejected[r] == 0 for r in REJECT_REASONS)
    json.dumps(reg.snapshot())  # always serialisable


# --- every classification path, one concrete example each -----------------------------------------------

def test_accepted_then_duplicate() -> None:
    reg = registry()
    assert reg.start(make_start())[0] == "current"
    first = reg.accept_frame(make_frame(index=5))
    assert first.outcome == "accepted" and first.accepted and first.reason is None and first.frame_index == 5
    again = reg.accept_frame(make_frame(index=5))
    assert again.outcome == "duplicate" and not again.accepted
    state = reg.current
    assert state is not None and (state.received, state.duplicated, state.missing) == (1, 1, 11)
    assert_counters_add_up(reg)


FLOAT = {"dtype": "float32"}
REJECTIONS = [
    # (start changes, frame changes, reason)
    ({}, {"series_id": "nobody"}, "unknown_series"),
    ({}, {"index": 12}, "index_out_of_range"),
    ({}, {"index": -1}, "index_out_of_range"),
    ({}, {"shape": (4, 5)}, "shape_mismatch"),
    ({}, {"dtype": "uint8"}, "dtype_mismatch"),
    (FLOAT, {"dtype": "float32", "fill": np.nan}, "non_finite"),
    (FLOAT, {"dtype": "float32", "fill": -np.inf}, "non_finite"),
    ({}, {"position_A": (float("nan"), 0.0)}, "position_outside"),
    ({}, {"position_A": (0.0, float("inf"))}, "position_outside"),
]


@pytest.mark.parametrize("start_changes, frame_changes, reason", REJECTIONS,
                         ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(REJECTIONS)])
def test_each_rejection_names_its_reason(start_changes: dict, frame_changes: dict, reason: str) -> None:
    reg = registry()
    reg.start(make_start(**start_changes))
    verdict = reg.accept_frame(make_frame(**frame_changes))
    assert verdict.outcome == "rejected" and verdict.reason == reason
    assert reg.rejected[reason] == 1 and reg.accepted == 0
    state = reg.current
    assert state is not None and state.received == 0 and not state.coverage.any()
    assert state.rejected[reason] == (0 if reason == "unknown_series" else 1)
    assert_counters_add_up(reg)


def test_every_ingest_reason_is_exercised() -> None:
    covered = {r for _, _, r in REJECTIONS} | {"finished_series", "refused_series"}  # tests below
    assert covered == set(INGEST_REJECT_REASONS)
    assert set(ALL_REJECT_REASONS) == set(REJECT_REASONS) | set(INGEST_REJECT_REASONS)


def test_frames_after_the_end_are_finished_series_and_counted_on_that_series() -> None:
    reg = registry()
    reg.start(make_start())
    reg.accept_frame(make_frame(index=0))
    ended = reg.end(SeriesEnd("s1", n_frames=12))
    assert ended is not None and ended.ended and ended.sender_n_frames == 12 and ended.end_cause == "series_end"
    assert ended.missing == 11 and reg.current is None  # a short series still ends normally
    verdict = reg.accept_frame(make_frame(index=1))
    assert verdict.reason == "finished_series" and ended.rejected["finished_series"] == 1
    assert reg.end(SeriesEnd("s1", 12)) is None and reg.ends_unknown == 1
    assert_counters_add_up(reg)


def test_frames_of_a_series_beyond_the_history_count_as_unknown() -> None:
    reg = registry(history=2)
    for name in ("a", "b", "c"):
        reg.start(make_start(name))
        reg.end(SeriesEnd(name, 0))
    assert [s.series_id for s in reg.finished] == ["b", "c"]
    assert reg.accept_frame(make_frame("a")).reason == "unknown_series"
    assert reg.accept_frame(make_frame("b")).reason == "finished_series"


def test_a_rejected_copy_does_not_block_a_good_one() -> None:
    reg = registry()
    reg.start(make_start())
    assert reg.accept_frame(make_frame(index=3, shape=(2, 2))).reason == "shape_mismatch"
    assert reg.accept_frame(make_frame(index=3)).outcome == "accepted"


def test_non_finite_check_can_be_disabled_and_ignores_integer_frames() -> None:
    reg = registry(check_finite=False)
    reg.start(make_start(dtype="float64"))
    assert reg.accept_frame(make_frame(dtype="float64", fill=np.nan)).accepted


def test_non_native_byte_order_is_a_dtype_mismatch() -> None:
    reg = registry()
    reg.start(make_start())
    swapped = np.zeros((4, 4), dtype=np.dtype("uint16").newbyteorder())
    assert reg.accept_frame(Frame("s1", 0, swapped)).reason == "dtype_mismatch"


def test_header_position_that_is_finite_is_accepted() -> None:
    reg = registry()
    reg.start(make_start())
    assert reg.accept_frame(make_frame(position_A=(1e6, -3.0))).accepted


def test_protocol_errors_are_counted_globally_only() -> None:
    reg = registry()
    reg.start(make_start())
    for reason in REJECT_REASONS:
        reg.record_protocol_error(reason)
    reg.record_protocol_error("payload_size")
    snap = reg.snapshot()
    assert snap["protocol_errors"] == len(REJECT_REASONS) + 1 and snap["rejected"]["payload_size"] == 2
    assert snap["frames"] == {"offered": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
    with pytest.raises(ValueError, match="shape_mismatch"):
        reg.record_protocol_error("shape_mismatch")  # an ingest reason is not a protocol reason
    assert_counters_add_up(reg)


# --- start / end policies --------------------------------------------------------------------------------

def test_queue_policy_waits_for_the_end_and_accepts_frames_of_queued_series() -> None:
    reg = registry(on_new_start="queue", max_queued=1)
    reg.start(make_start("a"))
    outcome, queued = reg.start(make_start("b"))
    assert outcome == "queued" and queued is not None and reg.current is not None and reg.current.series_id == "a"
    assert reg.start(make_start("c")) == ("queue_full", None)
    assert reg.start(make_start("a")) == ("duplicate_id", None)
    assert reg.accept_frame(make_frame("b", 2)).accepted
    reg.end(SeriesEnd("a", 0))
    assert reg.current is queued and not reg.queued and queued.received == 1
    assert reg.snapshot()["starts"] == {"current": 1, "queued": 1, "duplicate_id": 1, "queue_full": 1, "refused": 0}


def test_ending_a_queued_series_leaves_the_current_one() -> None:
    reg = registry()
    reg.start(make_start("a"))
    reg.start(make_start("b"))
    assert reg.end(SeriesEnd("b", 0)) is not None
    assert reg.current is not None and reg.current.series_id == "a" and not reg.queued


def test_finish_now_policy_supersedes_the_active_series() -> None:
    reg = registry(on_new_start="finish_now")
    _, first = reg.start(make_start("a"))
    outcome, second = reg.start(make_start("b"))
    assert outcome == "current" and reg.current is second
    assert first is not None and first.ended and first.end_cause == "superseded" and first.sender_n_frames is None
    assert reg.finished[-1] is first
    assert reg.accept_frame(make_frame("a")).reason == "finished_series"


def test_a_refused_series_rejects_its_frames_and_leaves_the_current_one_alone() -> None:
    reg = registry()
    reg.start(make_start("a"))
    refused = reg.refuse(make_start("big"), "frames need 9 GiB per worker, budget 8 GiB")
    assert refused.end_cause == "refused" and refused.ended and reg.starts["refused"] == 1
    assert reg.current is not None and reg.current.series_id == "a"
    verdict = reg.accept_frame(make_frame("big", index=0))
    assert verdict.reason == "refused_series" and refused.rejected["refused_series"] == 1
    assert reg.snapshot()["finished"][-1]["refusal"].startswith("frames need")
    assert_counters_add_up(reg)


def test_end_now_finalizes_a_live_series_with_its_cause() -> None:
    reg = registry()
    reg.start(make_start("a"))
    reg.start(make_start("b"))
    assert reg.end_now("nobody", "abort") is None and reg.ends_unknown == 0
    state = reg.end_now("a", "finalize")
    assert state is not None and state.end_cause == "finalize" and state.sender_n_frames is None
    assert reg.current is not None and reg.current.series_id == "b"  # the queued series moves up
    assert reg.accept_frame(make_frame("a")).reason == "finished_series"
    assert_counters_add_up(reg)


def test_bad_config_is_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="'later'"):
        RegistryConfig(on_new_start="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0"):
        RegistryConfig(history=0)
    with pytest.raises(TypeError):
        RegistryConfig(unknown=1)  # type: ignore[call-arg]


# --- coverage, times and snapshot ------------------------------------------------------------------------

def test_coverage_image_of_a_raster() -> None:
    reg = registry()
    _, state = reg.start(make_start(scan_shape=(3, 4)))
    for index in (0, 5, 11):  # (0, 0), (1, 1), (2, 3)
        reg.accept_frame(make_frame(index=index))
    assert state is not None
    expected = np.zeros((3, 4), bool)
    expected[0, 0] = expected[1, 1] = expected[2, 3] = True
    np.testing.assert_array_equal(state.coverage_image(), expected)


def test_coverage_image_needs_a_raster() -> None:
    state = SeriesState(make_start(positions_A=np.zeros((5, 2))), started_s=0.0)
    assert state.n_expected == 5
    with pytest.raises(ValueError, match="5 positions"):
        state.coverage_image()


def test_snapshot_has_every_counter_and_is_json() -> None:
    reg = registry()
    reg.start(make_start())
    reg.accept_frame(make_frame(index=1))
    reg.accept_frame(make_frame(index=1))
    reg.accept_frame(make_frame(index=99))
    reg.end(SeriesEnd("s1", 3))
    snap = json.loads(json.dumps(reg.snapshot()))
    series = snap["finished"][0]
    assert (series["received"], series["duplicated"], series["missing"], series["n_expected"]) == (1, 1, 11, 12)
    assert series["rejected"]["index_out_of_range"] == 1 and set(series["rejected"]) == set(ALL_REJECT_REASONS)
    assert series["started_s"] == 101.0 and series["ended_s"] == 102.0 and series["ended"]
    assert series["sender_n_frames"] == 3 and series["coverage_fraction"] == pytest.approx(1 / 12)
    assert snap["current"] is None and snap["frames"] == {"offered": 3, "accepted": 1, "duplicates": 1, "rejected": 1}
    assert snap["config"]["on_new_start"] == "queue"


# --- counters add up under a generated stream --------------------------------------------------------------

SIZES = {"a": 6, "b": 4}  # "a": 2×3 raster of uint16 4×4 frames; "b": 1×4 raster of float32 4×4 frames
frames = st.tuples(
    st.sampled_from(["a", "b", "ghost"]), st.integers(-2, 8), st.sampled_from(["good", "shape", "dtype", "nan"]),
    st.sampled_from([None, (1.0, 2.0), (float("nan"), 0.0)]))
events = st.lists(st.one_of(frames, st.sampled_from(["end a", "end b"])), max_size=80)


def expected_reason(reg: SeriesRegistry, series_id: str, index: int, kind: str, position: tuple | None) -> str | None:
    """Reference model of the classification order; None for a frame that passes every check."""
    live = [s.series_id for s in (reg.current, *reg.queued) if s is not None]
    if series_id not in live:
        return "finished_series" if series_id in [s.series_id for s in reg.finished] else "unknown_series"
    if not 0 <= index < SIZES[series_id]:
        return "index_out_of_range"
    if kind == "shape":
        return "shape_mismatch"
    if kind == "dtype" or (kind == "nan" and series_id == "a"):
        return "dtype_mismatch"
    if kind == "nan":
        return "non_finite"
    return "position_outside" if position is not None and not np.isfinite(position).all() else None


@settings(max_examples=200, deadline=None)
@given(events, st.sampled_from(["queue", "finish_now"]))
def test_counters_add_up_under_any_stream(stream: list, policy: str) -> None:
    reg = registry(on_new_start=policy)
    reg.start(make_start("a", (2, 3)))
    reg.start(make_start("b", (1, 4), dtype="float32"))
    outcomes = {"accepted": 0, "duplicate": 0, "rejected": 0}
    seen: dict[str, set[int]] = {"a": set(), "b": set()}
    for event in stream:
        if isinstance(event, str):
            reg.end(SeriesEnd(event.split()[1], 0))
            continue
        series_id, index, kind, position = event
        dtype = {"dtype": "int32", "nan": "float32"}.get(kind, "float32" if series_id == "b" else "uint16")
        frame = make_frame(series_id, index, (3, 4) if kind == "shape" else (4, 4), dtype, position,
                           np.nan if kind == "nan" else 1)
        reason = expected_reason(reg, series_id, index, kind, position)
        verdict = reg.accept_frame(frame)
        outcomes[verdict.outcome] += 1
        if reason is None:
            assert verdict.outcome == ("duplicate" if index in seen[series_id] else "accepted"), (event, verdict)
            seen[series_id].add(index)
        else:
            assert (verdict.outcome, verdict.reason) == ("rejected", reason), (event, verdict)
    n_frames = sum(not isinstance(e, str) for e in stream)
    assert sum(outcomes.values()) == n_frames == reg.frames_offered
    assert (outcomes["accepted"], outcomes["duplicate"]) == (reg.accepted, reg.duplicates)
    assert reg.accepted == sum(len(indices) for indices in seen.values())
    assert_counters_add_up(reg)


@pytest.mark.chaos
def test_a_finished_id_is_a_duplicate_and_a_refused_id_may_be_sent_again() -> None:
    """A series that ran keeps its id while it is in the history (rank 0 keys views and files by it); a refused
    series never ran, so its id may be sent again (say, once the operator made it fit the budget)."""
    reg = registry()
    reg.start(make_start("ran"))
    reg.end(SeriesEnd("ran", 0))
    assert reg.ran("ran") and reg.dropped_start("ran") == "duplicate_id"
    assert reg.start(make_start("ran")) == ("duplicate_id", None)
    assert reg.accept_frame(make_frame("ran")).reason == "refused_series"
    reg.refuse(make_start("too-big"), "needs 9 GiB")
    assert not reg.ran("too-big") and reg.dropped_start("too-big") is None
    outcome, state = reg.start(make_start("too-big"))
    assert outcome == "current" and state is not None and reg.accept_frame(make_frame("too-big")).accepted
    assert reg.dropped_start("elsewhere") is None and reg.dropped_start("elsewhere", used=True) == "duplicate_id"
    assert reg.snapshot()["starts"] == {"current": 2, "queued": 0, "duplicate_id": 1, "queue_full": 0,
                                        "refused": 1}
    assert_counters_add_up(reg)
