"""Iteration settings shared by every rank, offline and streaming.

``ptylive reconstruct`` builds them from its command line through
:meth:`ptylive.daemon.service.config.ReconstructionConfig.engine_options`, the streaming workers from
the daemon's ``[reconstruction]`` section through the same method: one translation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptylive.daemon.engine.loss_choice import AUTO
from ptylive.gpu.loss import LOSSES

MODES = ("sync", "async")
# Global mini-batches per iteration (docs/physics.md has the measurements): many small updates each fit their own
# positions' noise; one update per iteration (the full gradient, its step measured) was the best on every abTEM
# case and as good on our own simulations.
DEFAULT_UPDATES_PER_ITERATION = 1


@dataclass(frozen=True)
class EngineOptions:
    """Iteration settings shared by every rank."""

    iterations: int = 30
    mode: str = "sync"
    batch_size: int = 32
    step_size: float | None = None  # None: see ``step``
    illumination_floor: float = 0.05
    # "auto" is chosen from the data before the first fit (daemon.engine.loss_choice): offline by
    # daemon.cli.offline.validate, streaming by the workers once enough frames are in (daemon.worker.refine)
    loss: str = "amplitude"
    refine_probe: bool = True
    probe_step_size: float = 0.5
    max_staleness: int = 4
    max_amplitude: float | None = 1.0
    updates_per_iteration: int = DEFAULT_UPDATES_PER_ITERATION
    correct_positions: bool = True  # docs/physics.md, Position correction: on by default
    probe_from_iteration: int = 0
    positions_from_iteration: int = 3
    probe_modes: int = 1  # K incoherent probe modes (mixed states); 1: one coherent probe
    # μ of the slice-to-slice penalty (ptylive.gpu.depth), dimensionless (relative to the illumination
    # preconditioner); 0: off. Off by default: see docs/physics.md, "Depth regularisation".
    depth_regularisation: float = 0.0
    # Strength s of the missing-cone filter (ptylive.gpu.missing_cone: the cone's edge k_r = s |k_z| / alpha at
    # half weight), applied once per iteration; 0: off. On by default: docs/physics.md, "Missing cone".
    missing_cone: float = 1.0
    # Recompute each batch's waves ψ_s from every ⌈√S⌉-th slice in the backward pass instead of storing all S
    # (ptylive.gpu.multislice, "Recomputed waves"): the same batches and results, (⌈S/g⌉ − 1 + g)/S of the
    # waves' memory (19 of 100 at 100 slices), about 1.5× the slice FFTs. Off by default.
    recompute_waves: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss not in (*LOSSES, AUTO):
            raise ValueError(f"loss must be one of {(*LOSSES, AUTO)}, got {self.loss!r}")
        if self.batch_size < 1 or not self.step > 0 or not self.illumination_floor > 0:
            raise ValueError("batch_size, step_size and illumination_floor must be positive")
        if self.updates_per_iteration < 1:
            raise ValueError(f"updates_per_iteration must be >= 1, got {self.updates_per_iteration}")
        if self.probe_modes < 1:
            raise ValueError(f"probe_modes must be >= 1, got {self.probe_modes}")
        if not 0 <= self.depth_regularisation < float("inf"):
            raise ValueError(f"depth_regularisation must be finite and >= 0, got {self.depth_regularisation}")
        if not 0 <= self.missing_cone < float("inf"):
            raise ValueError(f"missing_cone must be finite and >= 0, got {self.missing_cone}")

    @property
    def step(self) -> float:
        """The step size in use: ``step_size``, else 1.0 (sync) or 0.5 (async), halved for Poisson.

        Async applies neighbours' updates one or more updates late; at step 1 (a
        full projection per mini-batch) they over-correct and the iterations diverge.
        Near the solution the Poisson gradient is twice the amplitude one (and larger
        at dark pixels); at step 1 it diverged on PbTiO3 at 1e5 e/Å².
        """
        if self.step_size is not None:
            return self.step_size
        return (1.0 if self.mode == "sync" else 0.5) * (0.5 if self.loss == "poisson" else 1.0)
