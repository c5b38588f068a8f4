"""The arrays one rank owns and their set-up, the same for ``ptylive reconstruct`` and a streaming worker."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ptylive.daemon.engine.cone import short_halo_px
from ptylive.daemon.engine.decomposition import RankDomain
from ptylive.daemon.engine.positions import PositionCorrection
from ptylive.gpu.backend import PRECISIONS
from ptylive.gpu.missing_cone import ConeFilter, cone_filter
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.probe import ProbeOptics, make_probe
from ptylive.gpu.probe_modes import initial_modes, mode_powers
from ptylive.gpu.propagation import fresnel_propagator

logger = logging.getLogger(__name__)


@dataclass
class TileState:
    """Arrays one rank owns.

    Attributes
    ----------
    domain : RankDomain
    volume : (S, He, We) complex
        Object transmission over the extended tile.
    probe : (N, N) complex, or (K, N, N) with K > 1 incoherent modes
    propagator : (N, N) complex
    starts : (P, 2) int
        Window starts relative to the extended tile.
    shifts : (P, 2) float
        Sub-pixel shifts.
    targets : (P, D, D) real
        Raw intensities until the detector scale is fitted, then the loss's target.
    positions : PositionCorrection or None
        Position correction of this rank's windows (None: positions fixed).
    cone : ConeFilter or None
        The missing-cone filter applied once per iteration (:mod:`ptylive.daemon.engine.cone`); None: off,
        or one slice.
    """

    domain: RankDomain
    volume: Any
    probe: Any
    propagator: Any
    starts: np.ndarray
    shifts: np.ndarray
    targets: Any
    scale: float = float("nan")
    positions: PositionCorrection | None = None
    cone: ConeFilter | None = None


@dataclass(frozen=True)
class TileOptics:
    """What the probe and the propagator are built from.

    ``probe`` (N, N) complex, real space and centred, replaces the probe synthesised from the optics
    when given (a scan file may carry one).
    """

    energy_eV: float
    convergence_semiangle_mrad: float
    defocus_A: float
    pixel_size_A: float
    window_px: int
    n_slices: int
    slice_thickness_A: float
    probe: np.ndarray | None = None


def set_up_tile(domain: RankDomain, optics: TileOptics, starts: np.ndarray, shifts: np.ndarray, targets: Any,
                xp: ModuleType, precision: str, probe_modes: int = 1, missing_cone: float = 0.0) -> TileState:
    """A fresh tile: vacuum object (``O = 1``) over the extended tile, the probe and the propagator.

    Parameters
    ----------
    starts : (P, 2) int64
        Window starts relative to ``domain.extended``.
    shifts : (P, 2) real
    targets : (P, D, D) real, on ``xp``
        Raw intensities (or preallocated rows a streaming worker fills as frames arrive).
    probe_modes : int
        K: 1 keeps one (N, N) probe; K > 1 makes ``state.probe`` (K, N, N) incoherent modes, the optics'
        (or file's) probe with 95 % of the power and K − 1 Hermite-like modes
        (:func:`ptylive.gpu.probe_modes.initial_modes`).
    missing_cone : float
        Strength of the missing-cone filter (:func:`tile_cone`); 0: off.
    """
    real_t, complex_t = PRECISIONS[precision]
    probe = optics.probe
    if probe is None:
        probe = make_probe(ProbeOptics(optics.energy_eV, optics.convergence_semiangle_mrad, optics.defocus_A),
                           optics.window_px, optics.pixel_size_A, dtype=np.complex128)
    if probe_modes > 1:
        probe = initial_modes(np.asarray(probe).astype(np.complex128), probe_modes)
        logger.info("%d probe modes, powers %s", probe_modes, np.array2string(mode_powers(probe), precision=4))
    propagator = fresnel_propagator(xp, optics.window_px, optics.pixel_size_A, wavelength_A(optics.energy_eV),
                                    optics.slice_thickness_A, dtype=complex_t)
    volume = xp.ones((optics.n_slices, *domain.extended.shape), dtype=complex_t)
    return TileState(domain, volume, xp.asarray(np.asarray(probe).astype(complex_t)), propagator, starts,
                     np.asarray(shifts).astype(real_t), targets, cone=tile_cone(domain, optics, missing_cone))


def tile_cone(domain: RankDomain, optics: TileOptics, strength: float) -> ConeFilter | None:
    """The missing-cone filter of this tile's grid (:func:`~ptylive.gpu.missing_cone.cone_filter`), or None when
    ``strength`` is 0 or the object has one slice (nothing along z to filter).

    Warns when a halo is narrower than the filter's radius (the correction near that edge then uses padding,
    so the result depends a little on the number of ranks).
    """
    if strength == 0 or optics.n_slices < 2:
        return None
    cone = cone_filter(optics.n_slices, optics.slice_thickness_A, optics.pixel_size_A,
                       optics.convergence_semiangle_mrad, strength)
    short = short_halo_px(domain, cone.radius_px)
    if short:
        logger.warning("rank %d: a halo of %d px is narrower than the missing-cone filter's radius of %d px; the "
                       "correction near that edge differs a little from one rank's", domain.rank, short,
                       cone.radius_px)
    return cone


#: A batch's stored waves may take this share of the object tile's bytes ...
WORKSPACE_SHARE = 0.5
#: ... or this many bytes where that is more: below it memory is not worth the speed (measured on the abTEM
#: cases' 8-slice 105² tiles: batches of 4-5 positions instead of 32 cost 23-37 % more time per iteration).
WORKSPACE_FLOOR_BYTES = 32 * 2**20


def batch_limit(cap: int, n_slices: int, extended_shape: tuple[int, int], window_px: int, n_modes: int,
                complex_itemsize: int) -> int:
    """Positions propagated at once: at most ``cap``, fewer where their stored waves would outgrow the tile.

    A batch of B positions stores ψ_s of every slice and mode, ``K·S·B·N²`` complex (the rest of its
    workspace is a few (B, N, N) arrays). That is held to :data:`WORKSPACE_SHARE` of the extended tile's
    object bytes, or :data:`WORKSPACE_FLOOR_BYTES` where that is more, so on large tiles the workspace
    shrinks with the tile as ranks are added instead of staying the same per rank; at least one position.
    """
    per_position = n_modes * n_slices * window_px * window_px * complex_itemsize
    tile = n_slices * extended_shape[0] * extended_shape[1] * complex_itemsize
    budget = max(WORKSPACE_SHARE * tile, WORKSPACE_FLOOR_BYTES)
    return int(max(1, min(cap, budget // max(per_position, 1))))


def batch_positions(state: TileState, cap: int) -> int:
    """:func:`batch_limit` of this rank's tile and probe."""
    n_modes = state.probe.shape[0] if state.probe.ndim == 3 else 1
    return batch_limit(cap, state.volume.shape[0], state.volume.shape[1:], state.probe.shape[-1], n_modes,
                       state.volume.dtype.itemsize)


def tile_view(state: TileState) -> Any:
    """The rank's own tile of ``state.volume`` (halos dropped): (S, h, w), a view."""
    rows, cols = state.domain.tile.relative_to(state.domain.extended)
    return state.volume[:, rows, cols]
