"""The missing-cone correction across ranks (daemon/engine/cone.py): each copy of a voxel ends as one rank's.

A 2 × 2 split of a phase object, the filter's radius within every halo: each rank corrects its own tile
from its extended tile and shares the correction (sync: the blocking sum; async: pushed like an update).
Every copy of every voxel must then hold what the correction of the whole object gives it, to float64
rounding (the tiles' transforms have other sizes than the object's). Fake communicator, no mpiexec.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ptylive.daemon.engine.cone import cone_regions, remove_missing_cone, short_halo_px
from ptylive.daemon.engine.decomposition import Box, RankDomain, decompose
from ptylive.daemon.engine.exchange.asynchronous import AsyncExchanger
from ptylive.daemon.engine.exchange.sync import SyncExchanger
from ptylive.daemon.engine.sweep import GradientWorkspace
from ptylive.daemon.engine.tile import TileOptics, tile_cone
from ptylive.gpu.missing_cone import cone_correction, cone_filter
from ptylive.gpu.update import constrain
from tests.daemon import fake_mpi
from tests.daemon.fake_mpi import FakeComm, FakeWorld, run_ranks

N_SLICES, SHAPE, WINDOW = 6, (40, 52), 16
# 6 slices of 4 Å on 0.12 Å pixels at 20 mrad: the deepest kernel's sigma is 0.75 px, its radius 6 px, as wide as
# the narrowest halo of this split (windows of 16 px on a 2-px raster).
CONE = cone_filter(N_SLICES, 4.0, 0.12, 20.0)


@pytest.fixture(autouse=True)
def no_real_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mpi.install(monkeypatch)


def split() -> list[RankDomain]:
    rows, cols = np.meshgrid(np.arange(8.0, 32.5, 2.0), np.arange(8.0, 44.5, 2.0), indexing="ij")
    return decompose(SHAPE, np.stack([rows.ravel(), cols.ravel()], axis=1), WINDOW, 4)


def phase_object(seed: int) -> np.ndarray:
    """(S, H, W) transmissions ``exp(iφ − μ)`` whose φ varies with depth on every lateral scale."""
    rng = np.random.default_rng(seed)
    phase = rng.normal(0.0, 0.4, (N_SLICES, *SHAPE))
    absorption = np.abs(rng.normal(0.0, 0.05, (N_SLICES, *SHAPE)))
    return np.exp(1j * phase - absorption)


def extended(volume: np.ndarray, domain: RankDomain) -> np.ndarray:
    box = domain.extended
    return volume[:, box.row0:box.row1, box.col0:box.col1].copy()


def test_the_split_has_halos_wide_enough_and_the_filter_changes_the_object() -> None:
    domains = split()
    assert CONE.radius_px == 6
    for d in domains:
        assert short_halo_px(d, CONE.radius_px) == 0
        regions = cone_regions(d, 2)
        assert regions is not None
        field, own, crop = regions  # the tile (all of it scanned here) and 2 px more, within the extended tile
        assert field == d.extended and own == d.tile
        assert crop == d.tile.grown(2).intersect(d.extended)
    assert min(short_halo_px(d, 100) for d in domains) == CONE.radius_px  # as narrow as it may be
    truth = phase_object(1)
    assert np.abs(cone_correction(truth, CONE)).max() > 0.1


@pytest.mark.parametrize("max_amplitude", [None, 1.0])
def test_sync_sharing_gives_every_copy_the_whole_objects_correction(max_amplitude: float | None) -> None:
    domains = split()
    truth = phase_object(2)
    whole = truth + cone_correction(truth, CONE)
    constrain(whole, max_amplitude)

    def rank(comm: FakeComm) -> tuple[np.ndarray, GradientWorkspace]:
        r = comm.Get_rank()
        exchanger = SyncExchanger(comm, domains[r], N_SLICES, np.float64, 2)  # rounds of 2 slices
        volume = extended(truth, domains[r])
        workspace = GradientWorkspace(volume)
        remove_missing_cone(volume, domains[r], CONE, workspace, exchanger.reduce_correction, max_amplitude)
        return volume, workspace

    for d, (volume, workspace) in zip(domains, run_ranks(FakeWorld(4), rank), strict=True):
        np.testing.assert_allclose(volume, extended(whole, d), rtol=0, atol=1e-13)
        assert not workspace.gradient.any() and not workspace.illumination.any()  # zero for the next update


def test_without_sharing_the_halos_keep_their_stale_copies() -> None:
    """The sharing is what the result needs: a rank alone corrects its own tile only."""
    domains = split()
    truth = phase_object(3)
    whole = truth + cone_correction(truth, CONE)
    volume = extended(truth, domains[0])
    remove_missing_cone(volume, domains[0], CONE, GradientWorkspace(volume), lambda c: c, None)
    rows, cols = domains[0].tile.relative_to(domains[0].extended)
    np.testing.assert_allclose(volume[:, rows, cols], extended(whole, domains[0])[:, rows, cols], atol=1e-13)
    assert np.abs(volume - extended(whole, domains[0])).max() > 0.05


def test_async_pushing_gives_every_copy_the_whole_objects_correction_after_finish() -> None:
    domains = split()
    truth = phase_object(4)
    whole = truth + cone_correction(truth, CONE)

    def rank(comm: FakeComm) -> np.ndarray:
        r = comm.Get_rank()
        exchanger = AsyncExchanger(comm, domains[r], N_SLICES, np.float64, np.complex128, max_staleness=4,
                                   max_amplitude=None, round_slices=4)
        volume = extended(truth, domains[r])
        remove_missing_cone(volume, domains[r], CONE, GradientWorkspace(volume), exchanger.push_correction, None)
        exchanger.finish(volume, step=1)
        return volume

    for d, volume in zip(domains, run_ranks(FakeWorld(4), rank), strict=True):
        np.testing.assert_allclose(volume, extended(whole, d), rtol=0, atol=1e-13)


def test_no_filter_for_one_slice_or_when_off_and_a_warning_for_a_short_halo(caplog: pytest.LogCaptureFixture) -> None:
    def optics(n_slices: int) -> TileOptics:
        return TileOptics(300e3, 20.0, 0.0, 0.12, WINDOW, n_slices, 4.0)

    domain = split()[0]
    assert tile_cone(domain, optics(1), 1.0) is None
    assert tile_cone(domain, optics(N_SLICES), 0.0) is None
    assert tile_cone(domain, optics(N_SLICES), 1.0) == CONE
    narrow = RankDomain(0, Box(0, 20, 0, 26), Box(0, 23, 0, 26), np.arange(1), ())  # a 3-px halo below
    assert short_halo_px(narrow, CONE.radius_px) == 3
    with caplog.at_level(logging.WARNING, logger="ptylive.daemon.engine.tile"):
        assert tile_cone(narrow, optics(N_SLICES), 1.0) == CONE
    assert "halo of 3 px is narrower than the missing-cone filter's radius of 6 px" in caplog.text


@pytest.mark.parametrize("n_ranks, pad", [(4, 10), (6, 52)])
def test_the_filter_works_inside_the_field_of_view_only(n_ranks: int, pad: int) -> None:
    """The scan padded by vacuum (``O = 1``) on every side: the filter runs on the windows' bounding box only
    (its cost follows the scan, not the object's area), padded by edge values there, and every copy on every
    rank ends with that correction; the vacuum stays exactly 1. At 6 ranks with 52 px of vacuum four tiles
    hold no scanned voxel at all and still take part in the collective sum."""
    rows, cols = np.meshgrid(np.arange(8.0, 32.5, 2.0), np.arange(8.0, 44.5, 2.0), indexing="ij")
    positions = np.stack([rows.ravel(), cols.ravel()], axis=1) + pad
    shape = (SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad)
    domains = decompose(shape, positions, WINDOW, n_ranks)
    field = Box(pad, pad + SHAPE[0], pad, pad + SHAPE[1])
    assert all(d.field == field for d in domains)
    assert all(short_halo_px(d, CONE.radius_px) == 0 for d in domains)
    if n_ranks == 6:
        assert sum(cone_regions(d, CONE.radius_px) is None for d in domains) == 4  # tiles of vacuum only
    truth = np.ones((N_SLICES, *shape), complex)
    truth[:, pad:pad + SHAPE[0], pad:pad + SHAPE[1]] = phase_object(5)
    whole = truth.copy()
    whole[:, pad:pad + SHAPE[0], pad:pad + SHAPE[1]] += cone_correction(phase_object(5), CONE)

    def rank(comm: FakeComm) -> np.ndarray:
        r = comm.Get_rank()
        exchanger = SyncExchanger(comm, domains[r], N_SLICES, np.float64, 2)
        volume = extended(truth, domains[r])
        remove_missing_cone(volume, domains[r], CONE, GradientWorkspace(volume), exchanger.reduce_correction, None)
        return volume

    for d, volume in zip(domains, run_ranks(FakeWorld(n_ranks), rank), strict=True):
        np.testing.assert_allclose(volume, extended(whole, d), rtol=0, atol=1e-13)
    vacuum = np.ones(shape, bool)
    vacuum[pad:pad + SHAPE[0], pad:pad + SHAPE[1]] = False
    assert np.abs(cone_correction(truth, CONE)[:, vacuum]).max() > 1e-3  # the whole object's filter would reach it
