"""Splitting the object into tiles, probe groups and extended tiles.

The object (H×W pixels, all slices) is cut into a grid of near-square tiles,
one per rank. A probe position belongs to the tile containing its window
centre (its *probe group*). The *extended tile* of a rank is the bounding box
of its tile and of every window of its group (grown by an optional margin)::

      ┌────────────── object ───────────────┐
      │   ┌─ extended tile of rank 0 ──┐     │
      │   │ ┌──────────┐╔══════════════╪═══╗ │ ╔═ extended tile of rank 1
      │   │ │  tile 0  │║ exchange     │   ║ │
      │   │ │          │║ region 0↔1   │   ║ │
      │   │ └──────────┘╚══════════════╪═══╝ │
      │   └────────────────────────────┘     │
      └──────────────────────────────────────┘

Two ranks are neighbours when their extended tiles intersect; the
intersection is their exchange region. Every rank whose windows touch a
voxel holds it, so direct neighbours suffice and nothing is forwarded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ptylive.gpu.patches import window_starts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """Half-open pixel rectangle ``[row0, row1) × [col0, col1)`` in object coordinates."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row1 - self.row0, self.col1 - self.col0)

    @property
    def size(self) -> int:
        return max(self.shape[0], 0) * max(self.shape[1], 0)

    def intersect(self, other: Box) -> Box | None:
        box = Box(max(self.row0, other.row0), min(self.row1, other.row1),
                  max(self.col0, other.col0), min(self.col1, other.col1))
        return box if box.row1 > box.row0 and box.col1 > box.col0 else None

    def grown(self, margin: int) -> Box:
        """This box with ``margin`` pixels more on every side (not clipped)."""
        return Box(self.row0 - margin, self.row1 + margin, self.col0 - margin, self.col1 + margin)

    def union(self, other: Box) -> Box:
        return Box(min(self.row0, other.row0), max(self.row1, other.row1),
                   min(self.col0, other.col0), max(self.col1, other.col1))

    def relative_to(self, origin: Box) -> tuple[slice, slice]:
        """Slices selecting this box inside an array that covers ``origin``."""
        return (slice(self.row0 - origin.row0, self.row1 - origin.row0),
                slice(self.col0 - origin.col0, self.col1 - origin.col0))

    def windows(self, positions_px: np.ndarray, window_px: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~ptylive.gpu.patches.window_starts` of ``positions_px`` (P, 2), the starts relative to this box
        (a tile's own array): ``(P, 2)`` int64 starts and ``(P, 2)`` sub-pixel shifts."""
        starts, shifts = window_starts(positions_px, window_px)
        return starts - np.array([self.row0, self.col0], dtype=np.int64), shifts


def windows_box(starts: np.ndarray, window_px: int) -> Box | None:
    """Bounding box of the windows starting at ``starts`` (P, 2) (None for none), in the same coordinates."""
    if len(starts) == 0:
        return None
    low, high = np.min(starts, axis=0), np.max(starts, axis=0) + window_px
    return Box(int(low[0]), int(high[0]), int(low[1]), int(high[1]))


@dataclass(frozen=True)
class RankDomain:
    """What one rank owns.

    Attributes
    ----------
    rank : int
    tile : Box
        Pixels this rank contributes to the stitched volume.
    extended : Box
        Tile plus halos: every pixel any window of its group touches.
    positions : (P,) int
        Indices (into the scan) of the rank's probe group, ascending.
    neighbours : tuple of (int, Box)
        ``(other rank, exchange region)`` in ascending rank order.
    field : Box or None
        The scan's field of view, the same on every rank: the bounding box of every window of the whole scan
        (grown by the decomposition's margin, within the object). Nothing outside it is ever updated, so the
        missing-cone filter works inside it only (:mod:`ptylive.daemon.engine.cone`). None: the whole object.
    """

    rank: int
    tile: Box
    extended: Box
    positions: np.ndarray
    neighbours: tuple[tuple[int, Box], ...]
    field: Box | None = None


def rank_grid(shape: tuple[int, int], n_ranks: int) -> tuple[int, int]:
    """Rows × columns of tiles for ``n_ranks`` whose tiles are closest to square."""
    if n_ranks < 1:
        raise ValueError(f"number of ranks must be >= 1, got {n_ranks}")
    best = min(
        ((r, n_ranks // r) for r in range(1, n_ranks + 1) if n_ranks % r == 0),
        key=lambda rc: abs(math.log((shape[0] / rc[0]) / (shape[1] / rc[1]))),
    )
    if best[0] > shape[0] or best[1] > shape[1]:
        raise ValueError(f"cannot split an object of {shape} pixels into {n_ranks} tiles")
    return best


def _edges(length: int, parts: int) -> np.ndarray:
    return np.array([round(i * length / parts) for i in range(parts + 1)], dtype=np.int64)


def probe_owner(shape: tuple[int, int], positions_px: np.ndarray, window_px: int, n_ranks: int) -> np.ndarray:
    """Tile (rank) of each position: the tile holding its window centre (clipped to the grid).

    Parameters
    ----------
    positions_px : (P, 2) float

    Returns
    -------
    (P,) int64
    """
    grid_rows, grid_cols = rank_grid(shape, n_ranks)
    row_edges, col_edges = _edges(shape[0], grid_rows), _edges(shape[1], grid_cols)
    starts, _ = window_starts(positions_px, window_px)
    centres = starts + window_px // 2
    tile_row = np.clip(np.searchsorted(row_edges, centres[:, 0], side="right") - 1, 0, grid_rows - 1)
    tile_col = np.clip(np.searchsorted(col_edges, centres[:, 1], side="right") - 1, 0, grid_cols - 1)
    return (tile_row * grid_cols + tile_col).astype(np.int64)


def decompose(
    shape: tuple[int, int], positions_px: np.ndarray, window_px: int, n_ranks: int, margin_px: int = 0,
) -> list[RankDomain]:
    """Decompose an object of ``shape`` (H, W) and its scan over ``n_ranks`` ranks.

    Parameters
    ----------
    shape : (int, int)
    positions_px : (P, 2) float
        Probe centres ``(row, col)`` in object pixels.
    window_px : int
    n_ranks : int
    margin_px : int
        Pixels added on every side of each extended tile (clipped to the object), so that a window moved
        by up to ``margin_px`` from its nominal position still lies in its rank's extended tile (the streaming
        daemon's header positions, :mod:`ptylive.streaming.ownership`); 0 offline.

    Returns
    -------
    list of RankDomain, indexed by rank (row-major over the tile grid).
    """
    if margin_px < 0:
        raise ValueError(f"margin_px must be >= 0, got {margin_px}")
    grid_rows, grid_cols = rank_grid(shape, n_ranks)
    row_edges, col_edges = _edges(shape[0], grid_rows), _edges(shape[1], grid_cols)
    starts, _ = window_starts(positions_px, window_px)
    owner = probe_owner(shape, positions_px, window_px, n_ranks)
    whole = Box(0, shape[0], 0, shape[1])
    tiles, extended, groups = [], [], []
    for rank in range(n_ranks):
        r, c = divmod(rank, grid_cols)
        tile = Box(int(row_edges[r]), int(row_edges[r + 1]), int(col_edges[c]), int(col_edges[c + 1]))
        group = np.flatnonzero(owner == rank)
        windows = windows_box(starts[group], window_px)
        box = tile if windows is None else tile.union(windows)
        tiles.append(tile)
        extended.append(box.grown(margin_px).intersect(whole) or tile)
        groups.append(group)
    scanned = windows_box(starts, window_px)
    field = None if scanned is None else scanned.grown(margin_px).intersect(whole)
    domains = []
    for rank in range(n_ranks):
        neighbours = tuple(
            (other, region) for other in range(n_ranks) if other != rank
            for region in [extended[rank].intersect(extended[other])] if region is not None
        )
        domains.append(RankDomain(rank, tiles[rank], extended[rank], groups[rank], neighbours, field))
    return domains


def stitch(shape: tuple[int, ...], domains: list[RankDomain], extended_volumes: list[np.ndarray]) -> np.ndarray:
    """Drop halos and assemble tiles: ``(S, H, W)`` from per-rank extended volumes."""
    out = np.empty(shape, dtype=extended_volumes[0].dtype)
    for domain, volume in zip(domains, extended_volumes, strict=True):
        rows, cols = domain.tile.relative_to(domain.extended)
        t = domain.tile
        out[..., t.row0:t.row1, t.col0:t.col1] = volume[..., rows, cols]
    return out
