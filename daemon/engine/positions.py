"""Position correction on one rank: one iteration's position gradients → new window starts and shifts.

The rank keeps a :class:`PositionState` (its positions ``p_j`` in object pixels, float64, and each one's step
gain and last gradient) next to the nominal positions ``n_j``. During an iteration every position is visited
once; :func:`ptylive.gpu.multislice.loss_and_gradient` with ``want_position_gradient=True`` gives its
``∂L/∂d_j`` and curvature ``h_j``: write both into (P, 2) host arrays by local index, zeroed at the start of
every iteration (a position not visited since the last call must come with zeros, or its old step is
applied again and its gain grows). After the iteration :func:`refine_positions` turns them into new
positions (:mod:`ptylive.gpu.positions` has the rules and why)::

    all-reduce 1   Σ h, count         → h_floor (the same on every rank)
    local          γ_j ← adapt(γ_j); c_j = p_j + δp_j    (curvature-normalised step, gain, trust region)
    all-reduce 2   affine normal equations (weights ρ_j), Σ n, P, step statistics
    local          p_j ← n_j + B (n_j − n̄) + ρ_j (c_j − affine(n_j))   (unless g_j or h_j is not finite)
    local          clip p_j so its window stays inside the extended tile → starts, shifts

Windows must stay inside the rank's extended tile (its volume holds nothing else). A window of ``N`` px
starts at ``floor(p) − N//2``, so ``p`` is clipped to the box below (``e`` the extended tile)::

         e.col0                                      e.col1
    e.row0 ┌────────────── extended tile ──────────────┐
           │            N//2 px                        │
           │        ┌──── allowed p ────┐              │
           │ N//2 px│                   │ N − N//2 px  │
           │        └───────────────────┘              │
           │            N − N//2 px                    │
    e.row1 └───────────────────────────────────────────┘

    floor(p_row) ∈ [e.row0 + N//2, e.row1 − N + N//2], and the same for columns

Clipping depends on the extended tile, hence on the number of ranks: for sync results that do not
depend on it, decompose with a ``margin_px`` at least the largest correction expected (then only the
object's own edge clips, the same for every rank count).

Both reductions go through ``exchanger.allreduce_sum`` (a blocking sum over every rank:
:class:`~ptylive.daemon.engine.exchange.protocols.SyncExchange`, or the
:class:`~ptylive.daemon.engine.exchange.protocols.NullExchanger` of one rank), so every rank must call
:func:`refine_positions` at the same point of the same iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ptylive.daemon.engine.decomposition import Box
from ptylive.gpu.multislice import CURVATURE_PER_LOSS
from ptylive.gpu.positions import (
    AFFINE_MODELS,
    CURVATURE_FLOOR,
    MAX_MOVE_PX,
    N_AFFINE_SUMS,
    NEWTON_FRACTION,
    Affine,
    adapt_gain,
    affine_normal_equations,
    blend_positions,
    informative,
    position_step,
    solve_affine,
)

logger = logging.getLogger(__name__)


class SumReducer(Protocol):
    """What position correction needs from an exchanger: a blocking elementwise sum over every rank."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PositionOptions:
    """Position-correction settings (the defaults need no tuning per data set, see :mod:`ptylive.gpu.positions`).

    Attributes
    ----------
    max_move_px : float
        Trust region: the largest move of one position per call.
    newton_fraction : float
        Fraction of the estimated Newton step.
    curvature_floor : float
        ``h_floor`` as a fraction of the mean curvature over all positions; positions below it follow the
        affine.
    affine : {"rotation", "full", "none"}
        The global transform fitted to the scan each call (:func:`~ptylive.gpu.positions.solve_affine`):
        ``"rotation"`` (the default) a rotation and the translation; ``"full"`` every ``B`` (rotation,
        scale, shear); ``"none"`` ``B = 0`` (every position refined on its own; the translation is still
        pinned). Scale and shear are left out by default: with the probe refined they are nearly degenerate
        with its defocus and astigmatism, and on abTEM's SrTiO3 with an unknown probe (``srtio3_aberrated``:
        30 Å of defocus error, C12 = 30 Å, C30 = 5 µm) the full affine took them up (a 3.7 % shear of exact
        positions, correlation 0.870) where the rotation kept 0.963; the perturbed scan, whose true positions
        are 1.5 % larger and 1° rotated, gave 0.963 with either (BENCHMARKS.md, "An unknown probe").
    adaptive_gain : bool
        False: ``γ = 1`` (the plain half-Newton step).
    """

    max_move_px: float = MAX_MOVE_PX
    newton_fraction: float = NEWTON_FRACTION
    curvature_floor: float = CURVATURE_FLOOR
    affine: Literal["rotation", "full", "none"] = "rotation"
    adaptive_gain: bool = True

    def __post_init__(self) -> None:
        if not (self.max_move_px > 0 and self.newton_fraction > 0 and 0 <= self.curvature_floor < 1):
            raise ValueError(f"need max_move_px > 0, newton_fraction > 0 and 0 <= curvature_floor < 1, got "
                             f"{self.max_move_px}, {self.newton_fraction}, {self.curvature_floor}")
        if self.affine not in (*AFFINE_MODELS, "none"):
            raise ValueError(f"affine must be one of {(*AFFINE_MODELS, 'none')}, got {self.affine!r}")


@dataclass(frozen=True)
class PositionState:
    """What a rank carries from one position update to the next, for its own positions.

    Attributes
    ----------
    positions_px : (P, 2) float64
        Current positions, object pixels.
    gain : (P, 2) float64
        Step gain ``γ`` per position and axis.
    last_gradient : (P, 2) float64
        The gradient the last update used (zero before the first).
    spread_px2 : float
        ``τ²``, the estimated variance (px² per axis) of the positions' true deviations from the affine
        (counted data only, see :func:`refine_positions`); inf: no prior.
    displacement : (2, 2) float64
        ``B`` of the last affine fit (zero before the first).
    nominal_mean_px : (2,) float64
        ``n̄`` over every rank (set by the first call).
    last_residual_px : (P, 2) float64 or None
        The last call's full-Newton proposals minus that call's affine (NaN where a position was not
        informative); None before the first call with a prior noise. :func:`_spread` correlates them with
        this call's.
    """

    positions_px: npt.NDArray[np.float64]
    gain: npt.NDArray[np.float64]
    last_gradient: npt.NDArray[np.float64]
    spread_px2: float = float("inf")
    displacement: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((2, 2)))
    nominal_mean_px: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(2))
    last_residual_px: npt.NDArray[np.float64] | None = None

    @classmethod
    def start(cls, positions_px: npt.ArrayLike) -> PositionState:
        """The state before any correction: ``positions_px`` (P, 2), gain 1, no prior yet."""
        p = np.array(positions_px, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"need positions of shape (P, 2), got {p.shape}")
        return cls(p, np.ones_like(p), np.zeros_like(p))


@dataclass(frozen=True)
class PositionUpdate:
    """What :func:`refine_positions` returns.

    Attributes
    ----------
    state : PositionState
        For the next call; ``state.positions_px`` (P, 2) float64 are the new positions.
    starts : (P, 2) int64
        Window starts relative to the extended tile.
    shifts : (P, 2) float64
        Sub-pixel shifts in [0, 1).
    affine : Affine
        The scan's affine fitted over every rank (``c − n ≈ B n + t``); the same on every rank.
    rms_step_px : float
        Root mean square of the proposed steps ``|δp_j|`` over every rank.
    limited : int
        Steps the trust region shortened, over every rank.
    nonfinite : int
        Positions whose gradient or curvature was not finite (not moved), over every rank.
    uninformative : int
        Positions placed by the affine alone (``ρ_j = 0``), over every rank.
    clipped : int
        Positions of *this rank* moved back so their window stays inside the extended tile.
    """

    state: PositionState
    starts: npt.NDArray[np.int64]
    shifts: npt.NDArray[np.float64]
    affine: Affine
    rms_step_px: float
    limited: int
    nonfinite: int
    uninformative: int
    clipped: int


def positions_of_windows(starts: npt.ArrayLike, shifts: npt.ArrayLike, extended: Box,
                         window_px: int) -> npt.NDArray[np.float64]:
    """Object-pixel positions ``(P, 2)`` of windows at ``starts`` (relative to ``extended``) with ``shifts``.

    The inverse of :func:`ptylive.gpu.patches.window_starts` followed by the shift to ``extended``.
    """
    origin = np.array([extended.row0, extended.col0], dtype=np.float64)
    return np.asarray(starts, dtype=np.float64) + origin + window_px // 2 + np.asarray(shifts, dtype=np.float64)


def clip_to_tile(positions_px: npt.ArrayLike, extended: Box,
                 window_px: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Positions whose window of ``window_px`` lies inside ``extended``, and which ones had to move.

    Returns
    -------
    positions : (P, 2) float64
    clipped : (P,) bool
    """
    p = np.asarray(positions_px, dtype=np.float64)
    half = window_px // 2
    low = np.array([extended.row0 + half, extended.col0 + half], dtype=np.float64)
    high = np.array([extended.row1 - window_px + half + 1, extended.col1 - window_px + half + 1], dtype=np.float64)
    if (high <= low).any():
        raise ValueError(f"extended tile {extended} is smaller than a window of {window_px} px")
    high = np.nextafter(high, -np.inf)  # floor(high) is the last allowed floor(p)
    inside = np.clip(p, low, high)
    return inside, (inside != p).any(axis=1)


def refine_positions(
    state: PositionState, nominal_px: npt.ArrayLike, position_gradient: npt.ArrayLike,
    curvature: npt.ArrayLike, extended: Box, window_px: int, exchanger: SumReducer,
    options: PositionOptions | None = None, noise_px2_loss: float | None = None,
) -> PositionUpdate:
    """One position-correction step of this rank's positions; a collective call (two sums over ranks).

    Parameters
    ----------
    state : PositionState
        This rank's current positions (object pixels), gains and last gradients.
    nominal_px : (P, 2) real
        Their nominal (scan-file or header) positions.
    position_gradient : (P, 2) real
        ``∂L/∂d`` of each position from its visit in this iteration; zero, with zero curvature, for a
        position not visited since the last call (no frame yet): it is then placed by the affine.
    curvature : (P, 2) real
        ``h`` of each position from the same visit.
    extended : Box
        The rank's extended tile (object coordinates).
    window_px : int
    exchanger : SumReducer
    options : PositionOptions or None
    noise_px2_loss : float or None
        ``k`` of the counting noise: a position's shot-noise variance is ``σ_j² = k / h_j`` px² per axis
        (:func:`counting_noise`); None (data not counts, or noise-free): no prior.

    Returns
    -------
    PositionUpdate

    Notes
    -----
    **Shot-noise prior** (counted data). Where the data pin a position only weakly (a weak phase object
    at low dose), the maximum-likelihood position is the true one plus shot noise of variance ``σ_j²``, and
    correction walks exact positions away by about ``σ`` (graphene at 1e4 e/Å²: 0.44 Å rms). So the step
    minimises ``L + (λ/2) Σ_j |p_j − a_j|²`` instead, with ``a_j = n_j + B(n_j − n̄)`` the affine's place
    for ``j`` (last call's ``B``) and ``λ = k / τ²``: a Gaussian prior of variance ``τ²`` px² in the loss's
    units (near its minimum ``L ≈ h σ² · (−log likelihood)`` and ``h σ² = k``). ``τ²`` is estimated from
    the data after each call (empirical Bayes): a full Newton step's proposals ``q_j = p_j − g_j/h_j``
    scatter about the affine by the true spread plus the noise plus what the unconverged object puts into
    the gradients. That last part is not noise that averages out, and it is large: on thick SrTiO3 with
    exact positions (true ``τ = 0``) the proposals scattered 2 px rms about the affine in the first
    iterations, which made the prior weak and walked the positions 0.21 px (correlation 0.992 → 0.953).
    But it changes as the object does, and it swings with it (an object step that absorbs a residual the
    positions also moved for flips the sign of the next proposal), while a true position error stays put.
    So the estimate correlates this call's residuals ``r = q − a`` with the last call's ``r'``:
    ``τ² = max((mean(r · r') − 2σ²)/2, SPREAD_MIN_PX2)`` over every rank's positions informative in both
    (a third sum over ranks; ``mean(|r|²)`` on the first call), and ``τ²`` grows by at most
    ``SPREAD_GROWTH`` per call, so one call's correlated swing does not release the positions. Measured
    (30 iterations, one update each): thick SrTiO3 with exact positions 0.953 → 0.989 (1e5 e/Å²),
    0.965 → 0.978 (1e6), while the perturbed case is corrected as before (rms 1.98 → 0.42 px,
    0.970); docs/physics.md has the table. The first call, and data without a noise measure
    (``noise_px2_loss`` None), take the plain step (``λ = 0``).
    """
    options = options or PositionOptions()
    p = state.positions_px
    n = np.asarray(nominal_px, dtype=np.float64)
    g = np.asarray(position_gradient, dtype=np.float64)
    h = np.asarray(curvature, dtype=np.float64)
    if not (p.shape == n.shape == g.shape == h.shape and p.ndim == 2 and p.shape[1] == 2):
        raise ValueError(f"need positions, nominal, gradient and curvature of one shape (P, 2), got "
                         f"{p.shape}, {n.shape}, {g.shape}, {h.shape}")
    with np.errstate(invalid="ignore"):
        seen = np.isfinite(h).all(axis=1) & np.isfinite(g).all(axis=1) & (h.sum(axis=1) > 0)
    first = exchanger.allreduce_sum(np.array([float(h[seen].sum()), 2.0 * float(seen.sum())]))
    floor = options.curvature_floor * float(first[0]) / float(first[1]) if first[1] > 0 else 0.0
    prior = 0.0 if noise_px2_loss is None or not np.isfinite(state.spread_px2) else noise_px2_loss / state.spread_px2
    placed = n + (n - state.nominal_mean_px) @ state.displacement.T  # the last affine's place of each position
    data_gradient = g
    with np.errstate(invalid="ignore"):
        g = g + prior * (p - placed)  # the gradient of the objective minimised: data plus prior
    gain = adapt_gain(state.gain, g, state.last_gradient) if options.adaptive_gain else state.gain
    with np.errstate(invalid="ignore"):
        step = position_step(g, h + prior * (h > 0), floor + prior, options.max_move_px, options.newton_fraction,
                             gain)
    corrected = p + step.moves_px
    weights = (informative(h, floor) & ~step.nonfinite).astype(np.float64)
    sums = np.concatenate([
        affine_normal_equations(n, corrected, weights), n.sum(axis=0),
        [float(len(n)), float((step.moves_px**2).sum()), float(step.limited.sum()), float(step.nonfinite.sum()),
         float(len(n) - weights.sum())],
    ])
    totals = exchanger.allreduce_sum(sums)
    affine = (_translation_only(totals) if options.affine == "none"
              else solve_affine(totals[:N_AFFINE_SUMS], options.affine))
    count = float(totals[N_AFFINE_SUMS + 2])
    nominal_mean = totals[N_AFFINE_SUMS:N_AFFINE_SUMS + 2] / max(count, 1.0)
    blended = blend_positions(n, corrected, weights, affine, nominal_mean)
    blended[step.nonfinite] = p[step.nonfinite]  # a non-finite gradient is never applied
    blended, clipped = clip_to_tile(blended, extended, window_px)
    starts, shifts = extended.windows(blended, window_px)
    rest = totals[N_AFFINE_SUMS + 3:]
    kept = step.nonfinite[:, None]  # a non-finite gradient leaves gain and memory as they were
    spread = state.spread_px2
    residual = state.last_residual_px
    if noise_px2_loss is not None:
        spread, residual = _spread(p, data_gradient, h, n, weights > 0, affine, noise_px2_loss, exchanger, residual)
        spread = min(spread, state.spread_px2 * SPREAD_GROWTH)
    new_state = PositionState(blended, np.where(kept, state.gain, gain), np.where(kept, state.last_gradient, g),
                              spread, affine.displacement.copy(), np.asarray(nominal_mean, dtype=np.float64),
                              residual)
    update = PositionUpdate(new_state, starts, shifts, affine, float(np.sqrt(rest[0] / max(count, 1.0))),
                            int(round(rest[1])), int(round(rest[2])), int(round(rest[3])), int(clipped.sum()))
    logger.debug("positions: rms step %.3g px, %d limited, %d non-finite, %d uninformative, %d clipped here",
                 update.rms_step_px, update.limited, update.nonfinite, update.uninformative, update.clipped)
    return update


SPREAD_MIN_PX2 = 1e-4  # τ² floor: (0.01 px)², far below any position error that matters
SPREAD_GROWTH = 1.5  # τ² rises by at most this factor per call (it may fall at once)


def counting_noise(loss: str, counts_per_unit_power: float) -> float:
    """``k`` with shot-noise variance ``σ² = k / h`` (px², per axis) of a position of curvature scale ``h``.

    Data in counts divided by the detector scale ``α`` (counts per unit probe power) carry Poisson noise:
    ``Var(I/α) = m/α`` and ``Var(√(I/α)) ≈ 1/(4α)``. With ``S = Σ|∂a/∂d|²`` over the detector (``a`` the
    model amplitude): the amplitude loss has ``h = 2S`` and ``Var(g) = S/α``; the Poisson loss has
    ``h = 4S`` and ``Var(g) = 4S/α``. Either way ``σ² = Var(g)/h² = 1/(4αS) = c_loss/(4αh)``, with
    ``c_loss`` the factor of :func:`ptylive.gpu.multislice.position_curvature` (2 and 4).
    """
    if not counts_per_unit_power > 0:
        raise ValueError(f"counts per unit probe power must be positive, got {counts_per_unit_power!r}")
    return CURVATURE_PER_LOSS[loss] / (4.0 * counts_per_unit_power)


def residual_noise(loss: str, loss_per_pixel: float) -> float | None:
    """``k`` of :func:`counting_noise` from the fit's residual: the amplitude loss per detector pixel.

    The amplitude loss per pixel is the mean squared residual of ``√(I/α)``: at the truth it is the
    targets' noise variance (``1/(4α)`` for counts), and before the fit converges it is larger (model
    error), so the prior holds positions near the affine until the object explains the data; for data
    that are not counts (a noise-free simulation, gain-corrected frames) it is the only noise measure.
    ``k = c Var(t)`` (``c = 2``; :func:`counting_noise` with ``Var(t) = 1/(4α)``). None for the Poisson
    loss, whose value is not a residual.
    """
    if loss != "amplitude" or not np.isfinite(loss_per_pixel) or loss_per_pixel < 0:
        return None
    return CURVATURE_PER_LOSS["amplitude"] * loss_per_pixel


def _spread(p: npt.NDArray[np.float64], g: npt.NDArray[np.float64], h: npt.NDArray[np.float64],
            n: npt.NDArray[np.float64], informative_: npt.NDArray[np.bool_], affine: Affine, k: float,
            exchanger: SumReducer, last_residual: npt.NDArray[np.float64] | None
            ) -> tuple[float, npt.NDArray[np.float64]]:
    """``τ²`` of the shot-noise prior (see :func:`refine_positions`; one sum over every rank) and the residuals.

    Returns
    -------
    spread_px2 : float
        inf where no position could be used.
    residual : (P, 2) float64
        ``q − a`` of this call, NaN where a position was not used (the next call's ``last_residual``).
    """
    use = informative_ & np.isfinite(g).all(axis=1) & (h > 0).all(axis=1)
    residual = np.full_like(p, np.nan)
    residual[use] = p[use] - g[use] / h[use] - affine.apply(n[use])
    if last_residual is not None:
        use = use & np.isfinite(last_residual).all(axis=1)
    other = residual if last_residual is None else last_residual
    product = float((residual[use] * other[use]).sum())
    sums = exchanger.allreduce_sum(np.array([product, float((k / h[use]).sum()), float(use.sum())]))
    if sums[2] < 1:
        return float("inf"), residual
    return max(float(sums[0] - sums[1]) / (2.0 * float(sums[2])), SPREAD_MIN_PX2), residual


def _translation_only(totals: npt.NDArray[np.float64]) -> Affine:
    """``B = 0`` and ``t`` the weighted mean displacement, from the normal-equation sums."""
    weight = float(totals[8])  # Σ w: the (offset, offset) entry of the 3×3 matrix
    offset = totals[13:15] / weight if weight > 0 else np.zeros(2)
    return Affine(np.zeros((2, 2)), np.asarray(offset, dtype=np.float64))


@dataclass
class PositionCorrection:
    """One rank's position correction across iterations (the engine's side of :func:`refine_positions`).

    Every rank holds one (or none: correction off); each iteration from ``first_iteration`` on, the
    gradient pass writes its positions' ``∂L/∂d`` and curvature into :attr:`gradient` and
    :attr:`curvature` (by local index), and :meth:`finish_iteration` moves the windows, on every rank
    at the same point (two all-reduces).

    Attributes
    ----------
    nominal_px : (P, 2) float64
        The file's (or headers') positions of this rank's group, object pixels.
    gradient, curvature : (P, 2) float64
        This iteration's, zeroed by :meth:`begin_iteration`.
    """

    nominal_px: npt.NDArray[np.float64]
    state: PositionState
    gradient: npt.NDArray[np.float64]
    curvature: npt.NDArray[np.float64]
    first_iteration: int
    options: PositionOptions
    last: PositionUpdate | None = None
    noise_px2_loss: float | None = None  # counting_noise(...) once the detector scale is known; None: no prior

    @classmethod
    def start(cls, nominal_px: npt.ArrayLike, first_iteration: int,
              options: PositionOptions | None = None) -> PositionCorrection:
        nominal = np.array(nominal_px, dtype=np.float64)
        return cls(nominal, PositionState.start(nominal), np.zeros_like(nominal), np.zeros_like(nominal),
                   first_iteration, options or PositionOptions())

    def active(self, iteration: int) -> bool:
        """Whether ``iteration`` measures position gradients."""
        return iteration >= self.first_iteration

    def begin_iteration(self) -> None:
        self.gradient[...] = 0.0
        self.curvature[...] = 0.0

    def finish_iteration(self, starts: npt.NDArray[np.int64], shifts: npt.NDArray[np.floating[Any]],
                         extended: Box, window_px: int, exchanger: SumReducer,
                         fit_noise_px2_loss: float | None = None) -> PositionUpdate:
        """Move this rank's windows: ``starts`` (P, 2) and ``shifts`` (P, 2) are updated in place.

        The prior's noise ``k`` is the larger of the counting noise (:attr:`noise_px2_loss`) and
        ``fit_noise_px2_loss`` (:func:`residual_noise` of this iteration), where known: a misfit larger
        than the counting noise limits what the gradients say about positions as much as noise does.
        """
        known = [k for k in (self.noise_px2_loss, fit_noise_px2_loss) if k is not None and np.isfinite(k)]
        update = refine_positions(self.state, self.nominal_px, self.gradient, self.curvature, extended, window_px,
                                  exchanger, self.options, max(known) if known else None)
        self.state, self.last = update.state, update
        starts[...] = update.starts
        shifts[...] = update.shifts
        return update
