"""The daemon's one owner rule end to end without sockets: rank 0's router (as admission builds it) and the
worker's frame store agree on every frame, so a frame counted as received is a frame some worker keeps.

The verified loss this guards against: a frame whose header position lay in another worker's tile was routed
to that worker by its position, counted as received, and dropped there as ``not_in_group``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.daemon.engine.decomposition import probe_owner
from ptylive.daemon.engine.geometry import SeriesGeometry, header_margin_px, series_geometry
from ptylive.daemon.engine.positions import PositionCorrection
from ptylive.daemon.service.config import ReconstructionConfig, loopback_config
from ptylive.daemon.service.supervisor import Admission
from ptylive.daemon.worker.frames import FrameStore
from ptylive.daemon.worker.refine import StreamRun, take_new_windows
from ptylive.streaming.ownership import NotPlaceable, owner_for
from ptylive.streaming.protocol import Frame, SeriesStart
from ptylive.streaming.router import Router
from ptylive.streaming.series import RegistryConfig, SeriesRegistry
from ptylive.streaming.series_book import SeriesBook

START = SeriesStart(series_id="owned", scan_shape=(6, 8), scan_step_A=(1.0, 1.0), detector_shape=(32, 32),
                    dtype="float32", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)


@pytest.fixture(scope="module")
def geometry() -> SeriesGeometry:
    return series_geometry(START, 2, 1)


def crossing_frame(start: SeriesStart, geometry: SeriesGeometry) -> tuple[int, tuple[float, float]]:
    """A frame of worker 0's group and a header position (Å), less than one scan step from its nominal one, whose
    window centre lies in worker 1's tile (of ``geometry``, two workers)."""
    margin = header_margin_px(start, geometry.pixel_size_A)
    for index in np.flatnonzero(geometry.owner == 0):
        for axis in (0, 1):
            for step_px in np.arange(0.25, margin, 0.25):
                moved = geometry.positions_px[index].copy()
                moved[axis] += step_px
                tile = probe_owner(geometry.object_shape, moved[None], geometry.window_px, 2)[0]
                row_A, col_A = (moved - geometry.offset_px) * geometry.pixel_size_A
                position_A = (float(row_A), float(col_A))
                try:
                    owner_for(geometry.owners, int(index), position_A)
                except NotPlaceable:
                    continue
                if tile == 1:
                    return int(index), position_A
    raise AssertionError("no frame of group 0 can cross into tile 1 within a scan step")


def pixels(value: float = 1.0) -> np.ndarray:
    return np.full((32, 32), value, np.float32)


def test_a_frame_whose_header_position_lies_in_another_tile_is_stored_and_used_by_its_owner(
        geometry: SeriesGeometry, tmp_path: Path) -> None:
    index, position_A = crossing_frame(START, geometry)
    admission = Admission(loopback_config(tmp_path, 2, ReconstructionConfig()))
    assert admission(START) is None
    book = SeriesBook(admission.router, SeriesRegistry(), 2)
    assert book.start(START)
    frame = Frame(START.series_id, index, pixels(), position_A)

    worker = book.route(frame)
    assert worker == 0  # its group's worker, though the header position lies in tile 1
    progress = book.find(START.series_id)
    assert progress is not None and progress.received == 1

    store = FrameStore.allocate(geometry, worker, "amplitude", np, np.float32)
    assert store.add(frame) and not any(store.rejected.values())
    row = int(np.flatnonzero(store.global_index == index)[0])
    placement = owner_for(geometry.owners, index, position_A)
    extended = geometry.domains[worker].extended
    assert tuple(store.starts[row]) == (placement.start_px[0] - extended.row0, placement.start_px[1] - extended.col0)
    assert (store.starts[row] >= 0).all() and (store.starts[row] + geometry.window_px <= extended.shape).all()
    store.set_scale(2.0)
    assert store.converted[row]  # the rows an iteration uses (refine: usable = store.converted)

    by_tile = FrameStore.allocate(geometry, 1, "amplitude", np, np.float32)  # where position routing sent it
    assert not by_tile.add(frame) and by_tile.rejected["not_in_group"] == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 47), st.floats(-2.5, 2.5), st.floats(-2.5, 2.5))
def test_a_frame_counted_as_received_is_always_kept_by_the_worker_it_went_to(
        index: int, drow_A: float, dcol_A: float) -> None:
    geometry = series_geometry(START, 2, 1)
    nominal_A = (geometry.positions_px[index] - geometry.offset_px) * geometry.pixel_size_A
    position_A = (float(nominal_A[0] + drow_A), float(nominal_A[1] + dcol_A))
    book = SeriesBook(lambda start: Router(geometry.owners, 2), SeriesRegistry(), 2)
    assert book.start(START)
    frame = Frame(START.series_id, index, pixels(), position_A)
    worker = book.route(frame)
    progress = book.find(START.series_id)
    assert progress is not None
    if worker is None:  # refused at the ingest, before it counted
        assert progress.received == 0
        with pytest.raises(NotPlaceable):
            owner_for(geometry.owners, index, position_A)
    else:
        assert progress.received == 1
        store = FrameStore.allocate(geometry, worker, "amplitude", np, np.float32)
        assert store.add(frame), store.rejected


@pytest.mark.chaos
def test_an_impossible_start_is_refused_from_arithmetic_at_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """4096 × 4096 positions of 64² frames: 128 GiB of frames per worker. Refused before any geometry is built (it
    once took the ingest thread 30 s and 2.45 GB); the refusal names the need and the budget."""
    import dataclasses

    import ptylive.daemon.service.supervisor as supervisor

    def no_geometry(*_: object) -> None:
        raise AssertionError("the geometry was built for a start the arithmetic refuses")

    monkeypatch.setattr(supervisor, "series_geometry", no_geometry)
    admission = Admission(loopback_config(tmp_path, 2, ReconstructionConfig()))
    huge = dataclasses.replace(START, series_id="huge", scan_shape=(4096, 4096), positions_A=None,
                               detector_shape=(64, 64))
    refusal = admission(huge)
    assert refusal is not None and "128.00 GiB per worker" in refusal and "budget" in refusal
    assert admission.lookup("huge") is None


@pytest.mark.chaos
def test_admission_remembers_a_bounded_number_of_series(tmp_path: Path) -> None:
    """Only the series rank 0 can still need (current, queued, shown as finished) keep their geometry."""
    import dataclasses

    admission = Admission(loopback_config(tmp_path, 2, ReconstructionConfig()))
    ids = [f"a-{k}" for k in range(admission.capacity + 5)]
    for series_id in ids:
        assert admission(dataclasses.replace(START, series_id=series_id)) is None
    assert admission.lookup(ids[0]) is None and admission.lookup(ids[4]) is None
    assert all(admission.lookup(series_id) is not None for series_id in ids[5:])


@pytest.mark.chaos
def test_starts_beyond_a_full_queue_never_reach_admission_nor_evict_a_live_series(tmp_path: Path) -> None:
    """The current series never ends; 100 more starts than the queue holds. Admission (whose record of
    geometries is bounded) is asked only for the series that can run, so theirs stay known to the collector."""
    import dataclasses

    config = loopback_config(tmp_path, 2, ReconstructionConfig())
    admission = Admission(config)
    registry = SeriesRegistry(RegistryConfig(max_queued=config.ingest.max_queued_series))
    book = SeriesBook(admission.router, registry, 2, admission)
    ids = [f"s-{k}" for k in range(config.ingest.max_queued_series + 1 + admission.capacity + 100)]
    forwarded = [book.start(dataclasses.replace(START, series_id=series_id)) for series_id in ids]
    live = 1 + config.ingest.max_queued_series
    assert forwarded == [True] * live + [False] * (len(ids) - live)
    assert registry.starts["queue_full"] == len(ids) - live and len(registry.queued) == live - 1
    assert all(admission.lookup(series_id) is not None for series_id in ids[:live])
    assert all(admission.lookup(series_id) is None for series_id in ids[live:])


def test_a_header_position_reaches_the_running_tile_and_its_correction(geometry: SeriesGeometry) -> None:
    """The tile keeps its own windows (position correction moves them): a row takes the store's window, sub-pixel
    shift included, and its nominal position when it is first iterated. The shift once never arrived (the tile
    had copied every shift at set-up)."""
    index, position_A = crossing_frame(START, geometry)
    store = FrameStore.allocate(geometry, 0, "amplitude", np, np.float32)
    nominal = store.positions_px.copy()
    state = SimpleNamespace(starts=store.starts.copy(), shifts=store.shifts.astype(np.float32),
                            positions=PositionCorrection.start(nominal, 0))
    run = cast(StreamRun, SimpleNamespace(state=state, store=store, placed=np.zeros(len(nominal), bool),
                                          resumed_px=None))
    assert store.add(Frame(START.series_id, index, pixels(), position_A))
    row = int(np.flatnonzero(store.global_index == index)[0])
    header_px = np.asarray(position_A) / geometry.pixel_size_A + geometry.offset_px
    np.testing.assert_allclose(store.positions_px[row], header_px, atol=1e-9)
    assert not np.allclose(state.shifts[row], store.shifts[row])  # the tile has not seen it yet

    usable = np.zeros(len(nominal), bool)
    usable[row] = True
    take_new_windows(run, usable)
    np.testing.assert_array_equal(state.starts[row], store.starts[row])
    np.testing.assert_array_equal(state.shifts[row], store.shifts[row])
    np.testing.assert_allclose(state.positions.nominal_px[row], header_px, atol=1e-9)
    np.testing.assert_allclose(state.positions.state.positions_px[row], header_px, atol=1e-9)
    assert run.placed[row] and run.placed.sum() == 1

    state.starts[row] += 1  # position correction moved the window: a later pass must not take it back
    take_new_windows(run, usable)
    np.testing.assert_array_equal(state.starts[row], store.starts[row] + 1)


def test_a_start_over_the_budget_is_told_what_recomputed_waves_would_need_and_admitted_with_them(
        tmp_path: Path) -> None:
    """A 40-slice series between its two plans (stored waves, recomputed waves): the refusal gives the need with
    ``recompute_waves = true`` too, and the same start asking for it in its overrides is admitted."""
    import dataclasses

    from ptylive.daemon.engine.exchange.sync import common_round_slices
    from ptylive.daemon.engine.memory_plan import rank_memory

    deep = ReconstructionConfig(n_slices=40, slice_thickness_A=1.0)
    config = loopback_config(tmp_path, 2, deep)
    start = dataclasses.replace(START, scan_shape=(16, 16), detector_shape=(64, 64))
    geometry = series_geometry(start, 2, 1)
    rounds = common_round_slices(geometry.domains, 40, "single")
    stored, recomputed = (max(rank_memory(d, 40, geometry.window_px, geometry.detector_px, deep.batch_size, "single",
                                          "async", deep.updates_per_iteration, 1, round_slices=rounds,
                                          recompute_waves=recompute).total for d in geometry.domains)
                          for recompute in (False, True))
    assert recomputed < 0.8 * stored  # the waves are most of it
    workers = dataclasses.replace(config.workers, memory_budget_bytes=(stored + recomputed) // 2)
    admission = Admission(dataclasses.replace(config, workers=workers))
    refusal = admission(dataclasses.replace(start, series_id="stored"))
    assert refusal is not None and f"(with recompute_waves = true: {recomputed / 2**30:.2f} GiB)" in refusal
    assert admission(dataclasses.replace(start, series_id="recomputed", overrides={"recompute_waves": True})) is None
