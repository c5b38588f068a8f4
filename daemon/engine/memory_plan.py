"""Predicted memory per rank, before anything runs (``ptylive plan``).

The model counts the arrays the engine allocates (see :mod:`.iteration`, :mod:`.exchange`,
:mod:`ptylive.gpu.multislice`):

* object: the extended tile, ``S·He·We`` complex;
* gradient: one complex copy (exchange, update and constraint work in place; the constraint's
  scratch is one slice);
* illumination: one real copy (async: own and total);
* optimiser state: none (preconditioned gradient descent keeps no moments);
* exchange buffers: sized by the overlaps' area. Sync: send and receive of one round of slices
  (:func:`~.exchange.sync.common_round_slices`, at most 256 KiB per region however deep the object). Async adds the
  method's three buffers (accumulated updates over the whole depth; send and receive of one round),
  each neighbour's latest illumination per mini-batch (and, with several mini-batches, that of the
  blocking first iteration) over the whole depth, and the staged own illumination once over the tile;
* frames: the rank's measured patterns, real;
* batch workspace: the stored waves of a batch, ``K·S·B·N²`` complex (with ``recompute_waves``,
  ``K·(⌈S/g⌉ − 1 + g)·B·N²``, g = ⌈√S⌉: :func:`ptylive.gpu.multislice.held_waves`), with ``B`` from
  :func:`~.tile.batch_limit` (the workspace shrinks with the tile; the same B either way), a few (B, N, N) and (B, D, D)
  arrays, and one scratch array per planned FFT shape (kept by :mod:`ptylive.gpu.fft`'s plan cache);
  or, where larger, the missing-cone filter's scratch at an iteration's end (:func:`cone_scratch`: it writes into
  the gradient array, between updates, so the two never coexist; one column block of the slices).
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ptylive.daemon.engine.cone import field_in_tile
from ptylive.daemon.engine.decomposition import RankDomain, decompose
from ptylive.daemon.engine.exchange.sync import common_round_slices
from ptylive.daemon.engine.options import DEFAULT_UPDATES_PER_ITERATION, EngineOptions
from ptylive.daemon.engine.tile import batch_limit
from ptylive.gpu.backend import PRECISIONS
from ptylive.gpu.multislice import held_waves, wave_segment_slices


@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one rank, by item."""

    rank: int
    extended_shape: tuple[int, int]
    n_positions: int
    object: int
    gradient: int
    illumination: int
    optimiser_state: int
    exchange_buffers: int
    frames: int
    batch_workspace: int

    @property
    def total(self) -> int:
        return (self.object + self.gradient + self.illumination + self.optimiser_state
                + self.exchange_buffers + self.frames + self.batch_workspace)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def rank_memory(domain: RankDomain, n_slices: int, window_px: int, detector_px: int,
                batch_size: int, precision: str, mode: str,
                updates_per_iteration: int = DEFAULT_UPDATES_PER_ITERATION, probe_modes: int = 1,
                total_positions: int | None = None, *, round_slices: int,
                recompute_waves: bool = False, missing_cone: bool = True) -> RankMemory:
    """Predict one rank's peak array memory in bytes.

    Batches are chunks of at most :func:`~.tile.batch_limit` (``batch_size`` the cap) of the rank's
    members of each global mini-batch (:func:`ptylive.daemon.engine.iteration.minibatch_of`), the
    line-search subset chunked apart. Sync runs choose that subset by the size of the whole mini-batch
    (``total_positions`` of the scan give it), async runs by the rank's own members (also the fallback
    when ``total_positions`` is None). A rank with no positions holds its tile and buffers only.
    ``round_slices``: the exchange's slices per round, :func:`~.exchange.sync.common_round_slices` of the
    whole decomposition (:func:`plan_memory` computes it). ``missing_cone``: whether the filter runs (its scratch is
    counted only then).
    """
    real_t, complex_t = (np.dtype(t) for t in PRECISIONS[precision])
    r, c = real_t.itemsize, complex_t.itemsize
    voxels = n_slices * domain.extended.size
    overlap = n_slices * sum(box.size for _, box in domain.neighbours)
    rounds = [2 * 3 * round_slices * box.size * r for _, box in domain.neighbours]
    buffers = sum(rounds)  # sync: send + receive of one round per region
    if mode == "async":  # the same again for the async send/receive; accumulated, staged, per-mini-batch, exact
        exact = overlap * r if updates_per_iteration > 1 else 0  # with one mini-batch it lands in place
        staged = voxels * r if domain.neighbours else 0  # the own illumination, once over the tile
        buffers += sum(rounds) + overlap * (c + updates_per_iteration * r) + exact + staged
    from ptylive.daemon.engine.iteration import minibatch_of
    from ptylive.daemon.engine.step import line_search_subset

    batch_cap = batch_limit(batch_size, n_slices, domain.extended.shape, window_px, probe_modes, c)
    labels = minibatch_of(domain.positions, updates_per_iteration)
    global_sizes = (np.bincount(minibatch_of(np.arange(total_positions), updates_per_iteration),
                                minlength=updates_per_iteration)
                    if mode == "sync" and total_positions is not None else None)
    chunk_sizes = set()
    for m in range(updates_per_iteration):  # the line-search subset is chunked apart from the rest (local_gradient)
        members = np.asarray(domain.positions)[labels == m]
        n_global = len(members) if global_sizes is None else int(global_sizes[m])
        subset = int(np.count_nonzero(line_search_subset(members, n_global))) if len(members) else 0
        for count in (subset, len(members) - subset):
            chunk_sizes.update({min(batch_cap, count), count % batch_cap} - {0})
    batch = max(chunk_sizes, default=0)
    # Sync adds neighbours' contributions in place; async also holds own + total illumination.
    illumination_copies = 2 if (mode == "async" and domain.neighbours) else 1
    window = window_px * window_px
    fft_scratch = sum(chunk_sizes) * probe_modes * window * c + (window * c if batch else 0)
    held = held_waves(n_slices, wave_segment_slices(n_slices)) if recompute_waves else n_slices
    waves = probe_modes * held * batch * window * c
    # besides the waves: the shifted probe(s), the windows of one slice and the probe gradient's shift, (B, N, N)
    # complex; one slice of illumination and the mode scratch, real; the far field of the unfused losses.
    workspace = waves + (2 + probe_modes) * batch * window * c + 2 * batch * window * r \
        + batch * detector_px**2 * c + fft_scratch
    field = field_in_tile(domain) if missing_cone else None  # the filter works within the field of view only
    workspace = max(workspace, cone_scratch(n_slices, field.shape, c) if field is not None else 0)
    return RankMemory(
        rank=domain.rank, extended_shape=domain.extended.shape, n_positions=len(domain.positions),
        object=voxels * c, gradient=voxels * c, illumination=illumination_copies * voxels * r, optimiser_state=0,
        exchange_buffers=buffers, frames=len(domain.positions) * detector_px**2 * r,
        batch_workspace=workspace,
    )


def cone_scratch(n_slices: int, extended_shape: tuple[int, int], complex_itemsize: int) -> int:
    """Bytes the missing-cone correction (:func:`~ptylive.gpu.missing_cone.cone_correction`) allocates besides the
    gradient array it writes into (its transforms run in place there): the log-amplitude and phase of one column
    block (two reals, one complex's bytes), or, later, the lateral low-pass's padded plane (bounded by two
    planes); 0 for one slice. Measured with tracemalloc: one block exactly (40 × 253 × 64)."""
    if n_slices < 2:
        return 0
    from ptylive.gpu.missing_cone import COLUMN_CHUNK

    height, width = extended_shape
    return max(n_slices * height * min(COLUMN_CHUNK, width), 2 * height * width) * complex_itemsize


def plan_memory(object_shape: tuple[int, int], positions_px: np.ndarray, n_ranks: int, n_slices: int,
                window_px: int, detector_px: int, batch_size: int = EngineOptions.batch_size, precision: str = "single",
                mode: str = "sync", updates_per_iteration: int = DEFAULT_UPDATES_PER_ITERATION,
                probe_modes: int = 1, recompute_waves: bool = False, missing_cone: bool = True) -> list[RankMemory]:
    """Predicted memory of every rank of a decomposition."""
    domains = decompose(object_shape, positions_px, window_px, n_ranks)
    rounds = common_round_slices(domains, n_slices, precision)
    return [rank_memory(d, n_slices, window_px, detector_px, batch_size, precision, mode, updates_per_iteration,
                        probe_modes, total_positions=len(positions_px), round_slices=rounds,
                        recompute_waves=recompute_waves, missing_cone=missing_cone) for d in domains]


def synthetic_positions(object_shape: tuple[int, int], n_positions: int, window_px: int) -> np.ndarray:
    """A near-square raster of ``n_positions`` whose windows just fill the object."""
    rows_span = object_shape[0] - window_px
    cols_span = object_shape[1] - window_px
    if rows_span < 0 or cols_span < 0:
        raise ValueError(f"window of {window_px} px does not fit an object of {object_shape}")
    n_rows = max(1, int(round(np.sqrt(n_positions * (rows_span + 1) / (cols_span + 1)))))
    n_cols = int(np.ceil(n_positions / n_rows))
    r = np.linspace(0, rows_span, n_rows) + window_px // 2
    c = np.linspace(0, cols_span, n_cols) + window_px // 2
    grid = np.stack(np.meshgrid(r, c, indexing="ij"), axis=-1).reshape(-1, 2)
    return grid[:n_positions]


def format_table(plan: list[RankMemory]) -> str:
    """Human-readable table, MiB per item and rank."""
    items = ("object", "gradient", "illumination", "optimiser_state", "exchange_buffers",
             "frames", "batch_workspace", "total")
    head = f"{'rank':>4} {'extended tile':>14} {'positions':>9} " + " ".join(f"{i[:12]:>12}" for i in items)
    lines = [head, "-" * len(head)]
    for m in plan:
        d = m.as_dict()
        cells = " ".join(f"{int(d[i]) / 2**20:12.2f}" for i in items)  # type: ignore[call-overload]
        lines.append(f"{m.rank:>4} {str(m.extended_shape):>14} {m.n_positions:>9} {cells}")
    lines.append("(MiB per rank; total = peak array memory predicted)")
    return "\n".join(lines)


def host_memory_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def gpu_memory_bytes(backend: str) -> int:
    """Bytes CuPy's default memory pool holds for this process (0 on numpy)."""
    if backend != "cupy":
        return 0
    import cupy  # type: ignore[import-not-found]

    return int(cupy.get_default_memory_pool().used_bytes())
