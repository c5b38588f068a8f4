"""One owner rule: owner_for places a frame with its index's worker; the router and the series book use it.

The table below is two workers side by side (tile boundary at column 20), a 1×6 raster 4 px apart, 8 px
windows, and a margin of one step (4 px) on each extended tile::

    columns      0    4    8   12   16   20   24   28   32   36   40
    tiles        ├──────── tile 0 ────────┼──────── tile 1 ────────┤
    extended 0   ├────────────────────────────┤ 24
    extended 1                       16 ├─────────────────────────┤
    frames                 0    1    2  │ 3    4    5     (centres at 8.5, 12.5, ... 28.5)
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from ptylive.gpu.patches import window_starts
from ptylive.streaming.ownership import NotPlaceable, OwnerTable, Placement, owner_for
from ptylive.streaming.protocol import Frame, SeriesStart
from ptylive.streaming.router import Router
from ptylive.streaming.series import SeriesRegistry
from ptylive.streaming.series_book import SeriesBook

PIXEL_A = 0.5
START = SeriesStart(series_id="own", scan_shape=(1, 6), scan_step_A=(2.0, 2.0), detector_shape=(2, 2),
                    dtype="uint16", energy_eV=200e3, convergence_semiangle_mrad=25.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)


@pytest.fixture
def table() -> OwnerTable:
    positions_px = np.array([[10.5, 8.5 + 4 * k] for k in range(6)])
    return OwnerTable(owner=np.array([0, 0, 0, 1, 1, 1]), extended=np.array([[0, 20, 0, 24], [0, 20, 16, 40]]),
                      positions_px=positions_px, pixel_size_A=PIXEL_A, offset_px=np.zeros(2), window_px=8)


def at_px(row_px: float, col_px: float) -> tuple[float, float]:
    """A header position (Å) of the object pixel (row, col) (offset 0)."""
    return row_px * PIXEL_A, col_px * PIXEL_A


def frame(index: int, position_A: tuple[float, float] | None = None) -> Frame:
    return Frame("own", index, np.zeros((2, 2), np.uint16), position_A)


def test_a_frame_without_header_position_is_placed_at_its_nominal_window(table: OwnerTable) -> None:
    assert owner_for(table, 1) == Placement(0, (6, 8), (0.5, 0.5))
    assert owner_for(table, 4).worker == 1


def test_the_header_position_moves_the_window_but_not_the_owner(table: OwnerTable) -> None:
    """Frame 2 (group 0) with its header position in tile 1 (column 20.75) stays with worker 0, window there."""
    placement = owner_for(table, 2, at_px(10.25, 20.75))
    assert placement == Placement(0, (6, 16), (0.25, 0.75))
    starts, shifts = window_starts(np.array([[10.25, 20.75]]), 8)  # the engine's own window convention
    assert placement.start_px == tuple(starts[0]) and placement.shift_px == tuple(shifts[0])


def test_a_window_outside_the_owners_extended_tile_is_not_placeable(table: OwnerTable) -> None:
    with pytest.raises(NotPlaceable, match=r"frame 2 at \(5.0, 10.5\) Å: its window rows \[6, 14\) cols \[17, 25\) "
                                           r"leaves worker 0's extended tile rows \[0, 20\) cols \[0, 24\)"):
        owner_for(table, 2, at_px(10.0, 21.0))
    with pytest.raises(ValueError, match="frame_index 6 outside"):
        owner_for(table, 6, at_px(10.0, 12.0))


def test_a_table_with_owners_it_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match=r"owners must lie in \[0, 2\)"):
        OwnerTable(np.array([0, 2]), np.zeros((2, 4), np.int64), np.zeros((2, 2)), 1.0, np.zeros(2), 8)
    with pytest.raises(ValueError, match="positions_px"):
        OwnerTable(np.array([0, 1]), np.zeros((2, 4), np.int64), np.zeros((3, 2)), 1.0, np.zeros(2), 8)


def test_the_router_routes_by_the_table_and_counts_only_routed_frames(table: OwnerTable) -> None:
    router = Router(table, 2)
    assert router.route_all(START).tolist() == [0, 0, 0, 1, 1, 1]
    assert router.route(START, frame(2, at_px(10.25, 20.75))) == 0  # a bare position rule would say 1
    assert router.owner(START, frame(5)) == 1 and router.frames_routed.tolist() == [1, 0]
    with pytest.raises(NotPlaceable):
        router.route(START, frame(2, at_px(10.0, 21.0)))
    assert router.frames_routed.tolist() == [1, 0]


def book_with(table: OwnerTable) -> SeriesBook:
    book = SeriesBook(lambda start: Router(table, 2), SeriesRegistry(), 2)
    assert book.start(START)
    return book


def test_the_book_rejects_an_unplaceable_frame_before_it_counts_as_received(table: OwnerTable) -> None:
    book = book_with(table)
    assert book.route(frame(2, at_px(10.0, 21.0))) is None
    assert book.route(frame(2, at_px(10.25, 20.75))) == 0  # the same index, placeable: still welcome
    progress = book.find("own", arrays=True)
    assert progress is not None and progress.received == 1 and progress.coverage is not None
    assert progress.coverage.tolist() == [False, False, True, False, False, False]
    registry, _, routing_errors = book.snapshot()
    assert registry["current"]["rejected"]["position_outside"] == 1 and routing_errors == 0
    assert book.route(frame(9, at_px(10.0, 12.0))) is None  # the index, not the position, is what is wrong
    registry, _, routing_errors = book.snapshot()
    assert registry["current"]["rejected"]["index_out_of_range"] == 1 and routing_errors == 0


def test_book_reads_are_copies_taken_under_its_lock(table: OwnerTable) -> None:
    """While the ingest thread accepts frames, every read is one consistent moment: received == coverage."""
    start = SeriesStart(**{**START.__dict__, "series_id": "many", "scan_shape": (1, 6000)})
    owners = np.repeat([0, 1], 3000)
    wide = OwnerTable(owners, np.array([[0, 20, 0, 40], [0, 20, 0, 40]]), np.tile([10.5, 20.5], (6000, 1)),
                      PIXEL_A, np.zeros(2), 8)
    book = SeriesBook(lambda s: Router(wide, 2), SeriesRegistry(), 2)
    assert book.start(start)
    first = book.find("many", arrays=True)

    def accept_all() -> None:
        for k in range(6000):
            book.route(Frame("many", k, np.zeros((2, 2), np.uint16)))

    feeder = threading.Thread(target=accept_all)
    feeder.start()
    reads = 0
    while feeder.is_alive() or reads == 0:
        progress = book.latest(arrays=True)
        assert progress is not None and progress.coverage is not None and progress.received_s is not None
        assert int(progress.coverage.sum()) == progress.received == int(np.isfinite(progress.received_s).sum())
        reads += 1
    feeder.join()
    assert first is not None and first.received == 0 and not first.coverage.any()  # an old copy stays old
    final = book.find("many")
    assert final is not None and final.received == 6000 and final.coverage is None  # no arrays unless asked


@pytest.mark.chaos
def test_a_duplicate_start_is_counted_and_never_reaches_admission(table: OwnerTable) -> None:
    """Same id, another geometry: counted as duplicate_id, the admission hook is not called, the first stays."""
    admitted: list[SeriesStart] = []

    def admit(start: SeriesStart) -> str | None:
        admitted.append(start)
        return None

    book = SeriesBook(lambda start: Router(table, 2), SeriesRegistry(), 2, admit=admit)
    assert book.start(START)
    other = dataclasses.replace(START, scan_shape=(10, 10), positions_A=None)
    assert not book.start(other)
    assert admitted == [START]
    assert book.registry.starts["duplicate_id"] == 1
    progress = book.find(START.series_id)
    assert progress is not None and progress.start == START
