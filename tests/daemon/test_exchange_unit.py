"""Halo exchange without mpiexec: pack/unpack, then two ranks in one process on a fake communicator.

The two extended tiles overlap in a region offset in both directions, so a wrong slice (rows for
columns, tile for extended tile, the other rank's offsets) shows up as a wrong sum::

        col 0        3           9       12
    row 0 ┌─ rank 0 extended ───┐
          │          ┌──────────┼─────────┐ row 1
          │          │ region   │ rank 1  │
          │          │ 0 ↔ 1    │ extended│
    row 7 └──────────┼──────────┘         │
                     └────────────────────┘ row 8

Values are small integers (held exactly in float64), so every expected sum is exact whatever the
order of additions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import Box, RankDomain, decompose
from ptylive.daemon.engine.exchange.asynchronous import AsyncExchanger
from ptylive.daemon.engine.exchange.sync import SyncExchanger, add_pairs, common_round_slices, pack, unpack
from tests.daemon import fake_mpi
from tests.daemon.fake_mpi import FakeComm, FakeWorld, run_ranks

N_SLICES = 2
REGION = Box(1, 7, 3, 9)
EXTENDED = (Box(0, 7, 0, 9), Box(1, 8, 3, 12))
DOMAINS = (RankDomain(0, Box(0, 8, 0, 6), EXTENDED[0], np.arange(3), ((1, REGION),)),
           RankDomain(1, Box(0, 8, 6, 12), EXTENDED[1], np.arange(3, 6), ((0, REGION),)))


@pytest.fixture(autouse=True)
def no_real_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi.install(monkeypatch)


def overlap(rank: int, volume: np.ndarray) -> np.ndarray:
    """The region's view inside ``rank``'s extended-tile array ``(S, He, We)``."""
    return volume[(slice(None), *REGION.relative_to(EXTENDED[rank]))]


def integers(rng: np.random.Generator, shape: tuple[int, ...], complex_: bool = False) -> np.ndarray:
    real = rng.integers(-8, 9, shape).astype(np.float64)
    return real + 1j * rng.integers(-8, 9, shape) if complex_ else real


def extended_shape(rank: int) -> tuple[int, int, int]:
    return (N_SLICES, *EXTENDED[rank].shape)


# pack / unpack / add_pairs ---------------------------------------------------------------------------

def test_pack_then_unpack_gives_back_header_and_blocks_as_views() -> None:
    rng = np.random.default_rng(1)
    volume = integers(rng, (2, 5, 6), complex_=True)
    complex_block = volume[:, 1:4, 2:5]  # a region of a bigger array, as the exchangers pass it
    real_block = integers(rng, complex_block.shape)
    buffer = np.full(3 + 3 * complex_block.size, np.nan)
    pack(complex_block, real_block, buffer, header=(7.0, 1.0, 2.0))
    np.testing.assert_array_equal(buffer[:3], [7.0, 1.0, 2.0])
    pairs, real = unpack(buffer, complex_block.shape, n_head=3)
    np.testing.assert_array_equal(pairs[..., 0] + 1j * pairs[..., 1], complex_block)
    np.testing.assert_array_equal(real, real_block)
    assert np.shares_memory(pairs, buffer) and np.shares_memory(real, buffer)
    assert not np.isnan(buffer).any()  # every element written


def test_pack_keeps_the_buffer_precision() -> None:
    block = np.array([[1.5 + 2.25j, -3.0 - 0.5j]], np.complex64)
    buffer = np.empty(3 * block.size, np.float32)
    pack(block, np.array([[4.0, 5.0]], np.float32), buffer)
    np.testing.assert_array_equal(buffer, np.array([1.5, 2.25, -3.0, -0.5, 4.0, 5.0], np.float32))


def test_add_pairs_adds_real_and_imaginary_parts_in_place() -> None:
    rng = np.random.default_rng(2)
    target = integers(rng, (2, 3, 4), complex_=True)
    before, pairs = target.copy(), integers(rng, (2, 3, 4, 2))
    view = target[:, 1:, :]
    add_pairs(view, pairs[:, 1:, :])
    expected = before.copy()
    expected[:, 1:, :] += pairs[:, 1:, :, 0] + 1j * pairs[:, 1:, :, 1]
    np.testing.assert_array_equal(target, expected)


# SyncExchanger --------------------------------------------------------------------------------------

def test_sync_exchange_adds_exactly_the_neighbours_overlap_contribution() -> None:
    rng = np.random.default_rng(3)
    gradients = [integers(rng, extended_shape(r), complex_=True) for r in (0, 1)]
    illuminations = [integers(rng, extended_shape(r)) for r in (0, 1)]
    world = FakeWorld(2)

    def rank(comm: FakeComm) -> tuple[np.ndarray, np.ndarray, Any]:
        r = comm.Get_rank()
        exchanger = SyncExchanger(comm, DOMAINS[r], N_SLICES, np.float64, N_SLICES)
        gradient, illumination = gradients[r].copy(), illuminations[r].copy()
        total_gradient, total_illumination = exchanger.reduce_gradients(gradient, illumination)
        assert total_gradient is gradient and total_illumination is illumination  # in place
        return gradient, illumination, exchanger.stats

    results = run_ranks(world, rank)
    for r, (gradient, illumination, stats) in enumerate(results):
        other = 1 - r
        expected_gradient, expected_illumination = gradients[r].copy(), illuminations[r].copy()
        overlap(r, expected_gradient)[...] += overlap(other, gradients[other])
        overlap(r, expected_illumination)[...] += overlap(other, illuminations[other])
        np.testing.assert_array_equal(gradient, expected_gradient)
        np.testing.assert_array_equal(illumination, expected_illumination)
        assert (stats.messages_sent, stats.bytes_sent) == (1, 3 * N_SLICES * REGION.size * 8)
    np.testing.assert_array_equal(overlap(0, results[0][0]), overlap(1, results[1][0]))  # both copies agree
    assert world.unmatched() == {"sends": 0, "recvs": 0}
    assert [m[:2] for m in world.messages] in ([(0, 1), (1, 0)], [(1, 0), (0, 1)])


def test_sync_exchange_in_rounds_of_slices_gives_the_same_totals_with_round_sized_buffers() -> None:
    n_slices = 5
    rng = np.random.default_rng(13)
    gradients = [integers(rng, (n_slices, *EXTENDED[r].shape), complex_=True) for r in (0, 1)]
    illuminations = [integers(rng, (n_slices, *EXTENDED[r].shape)) for r in (0, 1)]

    def rank(comm: FakeComm, round_bytes: int) -> tuple[np.ndarray, np.ndarray, Any, int]:
        r = comm.Get_rank()
        exchanger = SyncExchanger(comm, DOMAINS[r], n_slices, np.float64,
                                  common_round_slices(DOMAINS, n_slices, "double", round_bytes))
        assert all(b.size == 3 * exchanger.round_slices * REGION.size for b in exchanger.send + exchanger.recv)
        gradient, illumination = exchanger.reduce_gradients(gradients[r].copy(), illuminations[r].copy())
        return gradient, illumination, exchanger.stats, exchanger.round_slices

    one_round = run_ranks(FakeWorld(2), lambda comm: rank(comm, 2**30))
    per_slice = 3 * 8 * REGION.size
    rounds = run_ranks(FakeWorld(2), lambda comm: rank(comm, 2 * per_slice))  # 2 slices a round: 2 + 2 + 1
    for (g1, i1, stats1, slices1), (g2, i2, stats2, slices2) in zip(one_round, rounds, strict=True):
        assert (slices1, slices2) == (n_slices, 2)
        np.testing.assert_array_equal(g2, g1)
        np.testing.assert_array_equal(i2, i1)
        assert (stats1.messages_sent, stats2.messages_sent) == (1, 3)
        assert stats1.bytes_sent == stats2.bytes_sent == n_slices * per_slice


def test_a_two_by_two_split_in_rounds_adds_every_ranks_contribution_once() -> None:
    """Four ranks whose regions differ in area and overlap one another at the corners, exchanged in rounds of a
    few slices: every voxel ends with the sum over the ranks whose extended tiles hold it, exactly.

    With a slice count per region (each region's own ``slices_per_round``), a region of 3-slice rounds packed
    slice 3 after one of 4-slice rounds had added its neighbour's there, so a corner voxel got a third rank's
    contribution twice; this test failed then (the thick SrTiO3 case ran sync at 4 ranks to loss 24.0 vs 17.8).
    """
    n_slices, shape, window = 7, (40, 52), 16
    rows, cols = np.meshgrid(np.arange(8.0, 32.5, 3.0), np.arange(8.0, 44.5, 3.0), indexing="ij")
    domains = decompose(shape, np.stack([rows.ravel(), cols.ravel()], axis=1), window, 4)
    areas = sorted({box.size for d in domains for _, box in d.neighbours})
    assert len(areas) > 1  # regions of several sizes, as on the abTEM cases
    smallest_region = 3 * 8 * areas[0]
    round_bytes = 2 * smallest_region  # 2 slices of the smallest region, fewer of the larger ones
    assert len({max(1, round_bytes // (3 * 8 * a)) for a in areas}) > 1  # counts per region would differ
    rounds = common_round_slices(domains, n_slices, "double", round_bytes)
    assert 1 <= rounds < n_slices
    rng = np.random.default_rng(21)
    gradients = [integers(rng, (n_slices, *d.extended.shape), complex_=True) for d in domains]
    illuminations = [integers(rng, (n_slices, *d.extended.shape)) for d in domains]
    total_gradient = np.zeros((n_slices, *shape), complex)
    total_illumination = np.zeros((n_slices, *shape))
    for d, g, i in zip(domains, gradients, illuminations, strict=True):
        where = (slice(None), slice(d.extended.row0, d.extended.row1), slice(d.extended.col0, d.extended.col1))
        total_gradient[where] += g
        total_illumination[where] += i

    def rank(comm: FakeComm) -> tuple[np.ndarray, np.ndarray]:
        r = comm.Get_rank()
        exchanger = SyncExchanger(comm, domains[r], n_slices, np.float64, rounds)
        for b, (_, box) in zip(exchanger.send, domains[r].neighbours, strict=True):  # within budget, or one slice
            assert b.size == 3 * rounds * box.size and (b.size <= round_bytes // 8 or rounds == 1)
        return exchanger.reduce_gradients(gradients[r].copy(), illuminations[r].copy())

    for d, (gradient, illumination) in zip(domains, run_ranks(FakeWorld(4), rank), strict=True):
        where = (slice(None), slice(d.extended.row0, d.extended.row1), slice(d.extended.col0, d.extended.col1))
        np.testing.assert_array_equal(gradient, total_gradient[where])
        np.testing.assert_array_equal(illumination, total_illumination[where])


def test_sync_collectives_sum_and_max_over_ranks() -> None:
    def rank(comm: FakeComm) -> tuple[np.ndarray, np.ndarray]:
        exchanger = SyncExchanger(comm, DOMAINS[comm.Get_rank()], N_SLICES, np.float64, N_SLICES)
        values = np.array([1.0 + comm.Get_rank(), 10.0 - 4 * comm.Get_rank()])
        return exchanger.allreduce_sum(values), exchanger.allreduce_max(values)

    for sums, maxes in run_ranks(FakeWorld(2), rank):
        np.testing.assert_array_equal(sums, [3.0, 16.0])
        np.testing.assert_array_equal(maxes, [2.0, 10.0])


# AsyncExchanger -------------------------------------------------------------------------------------

def make_async(world: FakeWorld, max_staleness: int = 4) -> list[AsyncExchanger]:
    """Two ranks' exchangers; no amplitude constraint (these tests check the exchange's arithmetic)."""
    return [AsyncExchanger(world.comm(r), DOMAINS[r], N_SLICES, np.float64, np.complex128, max_staleness,
                           n_minibatches=2, max_amplitude=None, round_slices=N_SLICES) for r in (0, 1)]


def test_async_exchange_delivers_accumulated_updates_to_the_overlap_only() -> None:
    """Rank 0 pushes five updates while rank 1 progresses now and then; sends wait for a free link."""
    rng = np.random.default_rng(4)
    world = FakeWorld(2)
    sender, receiver = make_async(world)
    updates = [integers(rng, extended_shape(0), complex_=True) for _ in range(5)]
    lights = [integers(rng, extended_shape(0)) for _ in range(5)]
    sent_volume, volume = np.zeros(extended_shape(0), complex), np.zeros(extended_shape(1), complex)

    sender.push(updates[0], lights[0], step=0, minibatch=0)  # receiver's Irecv is posted: delivered
    receiver.progress(volume, step=0)
    np.testing.assert_array_equal(overlap(1, volume), overlap(0, updates[0]))
    np.testing.assert_array_equal(receiver.neighbour_illumination[0][0], overlap(0, lights[0]))
    sender.push(updates[1], lights[1], step=1, minibatch=1)  # delivered into the re-posted Irecv
    sender.push(updates[2], lights[2], step=2, minibatch=0)  # sent, but no Irecv yet: in flight
    sender.push(updates[3], lights[3], step=3, minibatch=1)  # link busy: accumulated
    sender.push(updates[4], lights[4], step=4, minibatch=0)  # accumulated with the previous one
    assert sender.stats.messages_sent == 3 and sender.pending == [True]
    receiver.progress(volume, step=4)  # takes the 2nd, then the 3rd (its Irecv re-posted in between)
    np.testing.assert_array_equal(overlap(1, volume), overlap(0, updates[0] + updates[1] + updates[2]))
    sender.progress(sent_volume, step=4)  # the link is free again: updates 3 + 4 go as one message
    assert sender.stats.messages_sent == 4 and sender.pending == [False]
    receiver.progress(volume, step=4)

    np.testing.assert_array_equal(overlap(1, volume), overlap(0, np.sum(updates, axis=0)))
    outside = volume.copy()
    overlap(1, outside)[...] = 0
    assert not outside.any()  # nothing lands outside the overlap
    assert not sent_volume.any()  # a rank applies its own updates itself, never through the exchange
    np.testing.assert_array_equal(receiver.neighbour_illumination[0][0], overlap(0, lights[4]))  # latest of mb 0
    np.testing.assert_array_equal(receiver.neighbour_illumination[0][1], overlap(0, lights[1]))
    assert receiver.stats.staleness == [0, 3, 2, 0] and receiver.last_received == [4]
    assert sender.stats.bytes_sent == 4 * sender.async_send[0].nbytes
    own = integers(rng, extended_shape(1))
    total = receiver.total_illumination(own, 0)
    expected = own.copy()
    overlap(1, expected)[...] += overlap(0, lights[4])
    np.testing.assert_array_equal(total, expected)
    assert total is not own


def test_async_ranks_end_with_the_same_overlap_after_finish() -> None:
    """Both ranks push, progress and bound staleness in threads; ``finish`` leaves every copy equal."""
    rng = np.random.default_rng(5)
    world = FakeWorld(2)
    exchangers = make_async(world, max_staleness=1)
    steps = 8
    updates = [[integers(rng, extended_shape(r), complex_=True) for _ in range(steps)] for r in (0, 1)]

    def rank(comm: FakeComm) -> np.ndarray:
        r = comm.Get_rank()
        exchanger, volume = exchangers[r], np.zeros(extended_shape(r), complex)
        for step, update in enumerate(updates[r]):
            exchanger.enforce_staleness(volume, step)
            volume += update  # own update first, as the engine does
            exchanger.push(update, np.abs(update), step, step % 2)
            exchanger.progress(volume, step)
        exchanger.finish(volume, steps)
        return volume

    volumes = run_ranks(world, rank)
    for r, volume in enumerate(volumes):
        expected = np.sum(updates[r], axis=0)
        overlap(r, expected)[...] += overlap(1 - r, np.sum(updates[1 - r], axis=0))
        np.testing.assert_array_equal(volume, expected)
        assert exchangers[r].finished == [True] and exchangers[r].recv_requests == [None]
    np.testing.assert_array_equal(overlap(0, volumes[0]), overlap(1, volumes[1]))
    assert world.unmatched() == {"sends": 0, "recvs": 0}  # finish drained every message, posted no new Irecv


def test_async_exchange_in_rounds_of_slices_ends_with_the_same_sums() -> None:
    """Five slices sent two at a time (three messages a flush): updates pushed during a flush go in the next
    one, every message lands where its header says, and ``finish`` leaves every copy equal."""
    n_slices, per_slice = 5, 3 * 8 * REGION.size
    rng = np.random.default_rng(9)
    world = FakeWorld(2)
    exchangers = [AsyncExchanger(world.comm(r), DOMAINS[r], n_slices, np.float64, np.complex128, max_staleness=1,
                                 n_minibatches=2, max_amplitude=None,
                                 round_slices=common_round_slices(DOMAINS, n_slices, "double", 2 * per_slice))
                   for r in (0, 1)]
    assert [e.round_slices for e in exchangers] == [2, 2]
    assert all(e.async_send[0].size == 4 + 2 * per_slice // 8 for e in exchangers)  # one round, not the depth
    steps = 6
    shapes = [(n_slices, *EXTENDED[r].shape) for r in (0, 1)]
    updates = [[integers(rng, shapes[r], complex_=True) for _ in range(steps)] for r in (0, 1)]
    lights = [[integers(rng, shapes[r]) for _ in range(steps)] for r in (0, 1)]

    def rank(comm: FakeComm) -> np.ndarray:
        r = comm.Get_rank()
        exchanger, volume = exchangers[r], np.zeros(shapes[r], complex)
        for step, update in enumerate(updates[r]):
            exchanger.enforce_staleness(volume, step)
            volume += update
            exchanger.push(update, lights[r][step], step, step % 2)
            exchanger.progress(volume, step)
        exchanger.finish(volume, steps)
        return volume

    volumes = run_ranks(world, rank)
    region = [(slice(None), *REGION.relative_to(EXTENDED[r])) for r in (0, 1)]
    for r, volume in enumerate(volumes):
        expected = np.sum(updates[r], axis=0)
        expected[region[r]] += np.sum(updates[1 - r], axis=0)[region[1 - r]]
        np.testing.assert_array_equal(volume, expected)
        assert exchangers[r].finished == [True] and exchangers[r].cursor == [None]
        # the latest illumination of each mini-batch, slice by slice (every round of the final flush carries it)
        np.testing.assert_array_equal(exchangers[r].neighbour_illumination[0][(steps - 1) % 2],
                                      lights[1 - r][steps - 1][region[1 - r]])
    assert world.unmatched() == {"sends": 0, "recvs": 0}
    assert exchangers[0].stats.messages_sent % 3 == 0  # whole flushes of three rounds


def test_async_first_update_keeps_the_neighbours_illumination_of_the_blocking_reduction() -> None:
    rng = np.random.default_rng(6)
    world = FakeWorld(2)
    exchangers = make_async(world)
    gradients = [integers(rng, extended_shape(r), complex_=True) for r in (0, 1)]
    lights = [integers(rng, extended_shape(r)) for r in (0, 1)]

    def rank(comm: FakeComm) -> None:
        r = comm.Get_rank()
        exchangers[r].reduce_gradients(gradients[r].copy(), lights[r].copy())
        exchangers[r].remember_neighbour_illumination(minibatch=1, step=0)

    run_ranks(world, rank)
    for r in (0, 1):
        np.testing.assert_array_equal(exchangers[r].neighbour_illumination[0][1], overlap(1 - r, lights[1 - r]))
        assert not exchangers[r].neighbour_illumination[0][0].any() and exchangers[r].last_received == [0]


def test_async_probe_reduction_sums_every_rank() -> None:
    world = FakeWorld(2)
    exchangers = make_async(world)

    def rank(comm: FakeComm) -> np.ndarray | None:
        exchanger = exchangers[comm.Get_rank()]
        assert exchanger.finish_probe_reduction() is None  # nothing posted yet
        exchanger.start_probe_reduction(np.full((2, 2), 1.0 + comm.Get_rank(), complex))
        with pytest.raises(RuntimeError, match="still outstanding"):
            exchanger.start_probe_reduction(np.zeros((2, 2), complex))
        return exchanger.finish_probe_reduction()

    for total in run_ranks(world, rank):
        assert total is not None
        np.testing.assert_array_equal(total, np.full((2, 2), 3.0 + 0j))


def test_async_refuses_a_staleness_bound_below_one() -> None:
    with pytest.raises(ValueError, match="max_staleness must be >= 1, got 0"):
        make_async(FakeWorld(2), max_staleness=0)


def test_fake_world_catches_a_send_buffer_changed_in_flight() -> None:
    """The fake is strict where the exchangers rely on MPI's rules (so the tests above can fail)."""
    world = FakeWorld(2, timeout_s=0.5)
    buffer = np.zeros(3)
    request = world.comm(0).Isend(buffer, dest=1, tag=1)
    assert not request.Test()  # rendezvous: not complete before its receive is posted
    buffer[0] = 1.0
    with pytest.raises(RuntimeError, match="changed while the send was in flight"):
        world.comm(1).Irecv(np.empty(3), source=0, tag=1)
    with pytest.raises(TimeoutError):
        world.comm(1).Irecv(np.empty(3), source=0, tag=2).Wait()


def test_a_received_update_is_constrained_where_it_lands() -> None:
    """With ``max_amplitude`` set, a neighbour's update cannot raise |O| above it (it arrives after the
    receiver's own constraint); directions are kept, other voxels untouched."""
    rng = np.random.default_rng(8)
    world = FakeWorld(2)
    sender, receiver = (AsyncExchanger(world.comm(r), DOMAINS[r], N_SLICES, np.float64, np.complex128,
                                       n_minibatches=2, max_amplitude=1.0, round_slices=N_SLICES) for r in (0, 1))
    update = 3.0 * integers(rng, extended_shape(0), complex_=True)
    volume = np.full(extended_shape(1), 0.6 + 0.0j)
    sender.push(update, integers(rng, extended_shape(0)), step=0, minibatch=0)
    receiver.progress(volume, step=0)
    landed = overlap(1, volume)
    unconstrained = 0.6 + overlap(0, update)
    assert np.abs(landed).max() <= 1.0 + 1e-12 and (np.abs(unconstrained) > 1.0).any()
    np.testing.assert_allclose(landed, unconstrained / np.maximum(np.abs(unconstrained), 1.0), rtol=1e-12)
    outside = volume.copy()
    overlap(1, outside)[...] = 0.6
    np.testing.assert_array_equal(outside, 0.6)
