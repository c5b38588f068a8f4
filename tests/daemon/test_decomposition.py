"""Tiles, probe groups, extended tiles, neighbours and stitching."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import Box, decompose, rank_grid, stitch
from ptylive.gpu.patches import window_starts


def raster(rows: int, cols: int, step: float, offset: float) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows) * step + offset, np.arange(cols) * step + offset, indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1)


def test_window_convention_centre_lands_on_position() -> None:
    starts, shifts = window_starts(np.array([[10.0, 7.25], [3.5, 4.999]]), 8)
    np.testing.assert_array_equal(starts, [[6, 3], [-1, 0]])
    np.testing.assert_allclose(starts + 4 + shifts, [[10.0, 7.25], [3.5, 4.999]])


@pytest.mark.parametrize("shape, ranks, expected", [((100, 100), 4, (2, 2)), ((200, 50), 4, (4, 1)),
                                                     ((60, 90), 6, (2, 3)), ((50, 50), 1, (1, 1))])
def test_rank_grid_prefers_square_tiles(shape: tuple[int, int], ranks: int, expected: tuple[int, int]) -> None:
    assert rank_grid(shape, ranks) == expected


def test_every_window_pixel_is_held_by_its_owner_and_overlaps_are_exchanged() -> None:
    shape, window = (59, 51), 32
    positions = raster(14, 10, 2.0, 16.5)
    domains = decompose(shape, positions, window, 4)
    owners = np.concatenate([d.positions for d in domains])
    assert sorted(owners) == list(range(len(positions)))  # each position exactly once
    starts, _ = window_starts(positions, window)
    holders = np.zeros(shape, int)
    for d in domains:
        e = d.extended
        holders[e.row0:e.row1, e.col0:e.col1] += 1
        for j in d.positions:  # extended tile covers every window of the group
            r, c = starts[j]
            assert e.row0 <= r and r + window <= e.row1 and e.col0 <= c and c + window <= e.col1
        assert d.tile.intersect(e) == d.tile
    for d in domains:  # neighbours are exactly the ranks whose extended tiles intersect
        expected = {o.rank for o in domains if o.rank != d.rank and d.extended.intersect(o.extended)}
        assert {n for n, _ in d.neighbours} == expected
        for n, region in d.neighbours:
            assert region == d.extended.intersect(domains[n].extended)
    assert holders.max() == 4  # windows larger than tiles: some voxels are held by every rank


def test_tiles_partition_the_object_and_stitch_drops_halos() -> None:
    shape = (37, 53)
    domains = decompose(shape, raster(5, 7, 5.0, 6.0), 12, 6)
    cover = np.zeros(shape, int)
    for d in domains:
        cover[d.tile.row0:d.tile.row1, d.tile.col0:d.tile.col1] += 1
    assert (cover == 1).all()
    truth = np.arange(2 * 37 * 53, dtype=float).reshape(2, *shape)
    pieces = []
    for d in domains:  # halos filled with garbage must not reach the stitched volume
        e = d.extended
        piece = np.full((2, *e.shape), -1.0)
        rows, cols = d.tile.relative_to(e)
        piece[:, rows, cols] = truth[:, d.tile.row0:d.tile.row1, d.tile.col0:d.tile.col1]
        pieces.append(piece)
    np.testing.assert_array_equal(stitch((2, *shape), domains, pieces), truth)


def test_box_intersection_is_none_when_disjoint() -> None:
    assert Box(0, 5, 0, 5).intersect(Box(5, 9, 0, 5)) is None
    assert Box(0, 5, 0, 5).intersect(Box(4, 9, 3, 8)) == Box(4, 5, 3, 5)


def test_bad_rank_counts_are_named() -> None:
    with pytest.raises(ValueError, match="ranks"):
        rank_grid((10, 10), 0)
