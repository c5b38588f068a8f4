"""Routing: position precedence, the raster/rotation convention, owners, counters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.streaming.protocol import Frame, SeriesStart
from ptylive.streaming.router import Router, position_A_of, raster_positions_A, scan_positions_A


def make_start(scan_shape: tuple[int, int] = (3, 4), step_A: tuple[float, float] = (0.5, 2.0),
               rotation_deg: float = 0.0, positions_A: np.ndarray | None = None) -> SeriesStart:
    return SeriesStart(series_id="s1", scan_shape=scan_shape, scan_step_A=step_A, detector_shape=(2, 2),
                       dtype="uint16", energy_eV=200e3, convergence_semiangle_mrad=25.0, defocus_A=40.0,
                       detector_pixel_mrad=2.0, scan_rotation_deg=rotation_deg, positions_A=positions_A)


def frame(index: int, position_A: tuple[float, float] | None = None, shape: tuple[int, int] = (2, 2)) -> Frame:
    return Frame("s1", index, np.zeros(shape, np.uint16), position_A)


def quadrant_owner(positions_A: np.ndarray) -> np.ndarray:
    """Four workers: rows split at 0.9 Å, columns at 3.0 Å (row-major worker index)."""
    return 2 * (positions_A[:, 0] >= 0.9).astype(np.int64) + (positions_A[:, 1] >= 3.0)


# --- positions: raster, rotation, precedence -------------------------------------------------------------

def test_raster_without_rotation_is_row_major() -> None:
    start = make_start()
    assert position_A_of(start, 0, None) == (0.0, 0.0)
    assert position_A_of(start, 3, None) == (0.0, 6.0)  # row 0, col 3
    assert position_A_of(start, 6, None) == (0.5, 4.0)  # row 1, col 2
    assert position_A_of(start, 11, None) == (1.0, 6.0)


def test_rotation_by_90_degrees_turns_the_col_axis_onto_the_row_axis() -> None:
    start = make_start(rotation_deg=90.0)
    assert position_A_of(start, 1, None) == (2.0, 0.0)  # one col step (2 Å) lands on +row, exactly
    assert position_A_of(start, 4, None) == (0.0, -0.5)  # one row step (0.5 Å) lands on -col
    assert position_A_of(make_start(rotation_deg=-90.0), 1, None) == (-2.0, 0.0)
    assert position_A_of(make_start(rotation_deg=180.0), 5, None) == (-0.5, -2.0)
    assert position_A_of(make_start(rotation_deg=450.0), 1, None) == (2.0, 0.0)


def test_small_rotation_turns_col_towards_plus_row() -> None:
    row_A, col_A = position_A_of(make_start(step_A=(1.0, 1.0), rotation_deg=30.0), 1, None)
    assert row_A == pytest.approx(0.5) and col_A == pytest.approx(math.sqrt(3) / 2)


@settings(max_examples=100, deadline=None)
@given(st.floats(-720, 720, allow_nan=False))
def test_rotation_preserves_distances_from_the_origin(rotation_deg: float) -> None:
    start = make_start(rotation_deg=rotation_deg)
    positions = raster_positions_A(start)
    unrotated = raster_positions_A(make_start())
    np.testing.assert_allclose(np.hypot(*positions.T), np.hypot(*unrotated.T), atol=1e-12)
    np.testing.assert_array_equal(positions[0], [0.0, 0.0])


def test_explicit_positions_win_over_the_raster_and_header_wins_over_both() -> None:
    explicit = np.array([[10.0, 20.0], [30.0, 40.0]])
    start = make_start(scan_shape=(1, 2), rotation_deg=30.0, positions_A=explicit)
    assert position_A_of(start, 1, None) == (30.0, 40.0)
    assert position_A_of(start, 1, (-1.0, -2.0)) == (-1.0, -2.0)
    assert position_A_of(make_start(), 7, (5.5, 6.5)) == (5.5, 6.5)
    np.testing.assert_array_equal(scan_positions_A(start), explicit)


def test_index_outside_the_scan_without_header_position_is_an_error() -> None:
    with pytest.raises(ValueError, match="frame_index 12 outside"):
        position_A_of(make_start(), 12, None)
    with pytest.raises(ValueError, match="frame_index 2 outside"):
        position_A_of(make_start(positions_A=np.zeros((2, 2))), 2, None)
    assert position_A_of(make_start(), 12, (0.0, 0.0)) == (0.0, 0.0)  # the header position needs no index


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.floats(0.1, 5), st.floats(0.1, 5), st.floats(-360, 360))
def test_vectorised_raster_equals_the_per_frame_position(rows: int, cols: int, step_row: float, step_col: float,
                                                        rotation_deg: float) -> None:
    start = make_start((rows, cols), (step_row, step_col), rotation_deg)
    positions = raster_positions_A(start)
    assert positions.shape == (rows * cols, 2) and positions.dtype == np.float64
    for k in range(rows * cols):
        assert tuple(positions[k]) == position_A_of(start, k, None)


# --- router --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation_deg", [0.0, 90.0, 17.0])
@pytest.mark.parametrize("cached", [False, True])
def test_route_all_agrees_with_route_for_every_frame(rotation_deg: float, cached: bool) -> None:
    start = make_start(scan_shape=(4, 5), rotation_deg=rotation_deg)
    router = Router(quadrant_owner, 4)
    table = router.route_all(start) if cached else Router(quadrant_owner, 4).route_all(start)
    assert table.shape == (20,) and np.issubdtype(table.dtype, np.integer)
    assert [router.route(start, frame(k)) for k in range(20)] == table.tolist()
    assert router.frames_routed.sum() == 20


def test_route_all_uses_explicit_positions() -> None:
    start = make_start(scan_shape=(1, 3), positions_A=np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 5.0]]))
    router = Router(quadrant_owner, 4)
    assert router.route_all(start).tolist() == [0, 2, 3]
    assert [router.route(start, frame(k)) for k in range(3)] == [0, 2, 3]


def test_header_position_overrides_the_cached_table() -> None:
    start = make_start()
    router = Router(quadrant_owner, 4)
    assert router.route_all(start)[0] == 0
    assert router.route(start, frame(0, position_A=(5.0, 5.0))) == 3


def test_counters_and_queue_depth_in_the_snapshot() -> None:
    start = make_start()
    router = Router(quadrant_owner, 4)
    router.route(start, frame(0))  # worker 0
    router.route(start, frame(1, shape=(3, 3)))  # (0, 2 Å): worker 0, 18 bytes
    router.route(start, frame(11))  # (1, 6 Å): worker 3
    router.queue_depth[3] = 7
    snap = json.loads(json.dumps(router.snapshot()))
    assert snap["frames_routed"] == 3 and snap["bytes_routed"] == 8 + 18 + 8
    assert snap["workers"][0] == {"worker": 0, "frames_routed": 2, "bytes_routed": 26, "queue_depth": 0}
    assert snap["workers"][3] == {"worker": 3, "frames_routed": 1, "bytes_routed": 8, "queue_depth": 7}
    router.route_all(start)
    assert router.snapshot()["frames_routed"] == 3  # planning does not count


def test_a_bad_owner_is_reported_with_the_offending_value() -> None:
    start = make_start()
    with pytest.raises(ValueError, match="worker 4"):
        Router(lambda p: np.full(len(p), 4), 4).route(start, frame(0))
    with pytest.raises(ValueError, match="integers"):
        Router(lambda p: np.zeros(len(p)), 4).route_all(start)
    with pytest.raises(ValueError, match=r"\(12,\)"):
        Router(lambda p: np.zeros(3, int), 4).route_all(start)
    with pytest.raises(ValueError, match="n_workers"):
        Router(quadrant_owner, 0)
    with pytest.raises(ValueError, match="frame_index 12"):
        router = Router(quadrant_owner, 4)
        router.route_all(start)
        router.route(start, frame(12))
