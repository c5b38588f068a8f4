"""The object update: a preconditioned gradient step and the amplitude constraint.

Both act voxel by voxel, so every copy of a voxel held by several ranks stays
identical when they apply the same totals.
"""

from __future__ import annotations

from typing import Any

from ptylive.gpu.backend import get_array_module


def object_update(gradient: Any, illumination: Any, floor: float, step: float) -> Any:
    """Preconditioned step ``−step · g / (2 (p + floor))``, computed in place.

    Parameters
    ----------
    gradient : (S, H, W) complex
        Overwritten with the update, and returned.
    illumination : (S, H, W) real
        Overwritten (used as scratch). No temporaries the size of the tile.
    """
    xp = get_array_module(gradient)
    illumination += floor
    xp.divide(-0.5 * step, illumination, out=illumination)
    gradient *= illumination
    return gradient


def constrain(volume: Any, max_amplitude: float | None) -> None:
    """Project transmissions onto ``|O| <= max_amplitude`` in place (no gain anywhere).

    Without it a multislice step that raises ``|O_s|`` amplifies every later
    slice's wave and the iterations diverge (seen on PbTiO3 with 4 slices).
    Voxel-wise, so all copies of a voxel stay identical. Works one slice at a time: its scratch is one
    (H, W) real array, not a tile-sized one.
    """
    if max_amplitude is None:
        return
    xp = get_array_module(volume)
    planes = volume if volume.ndim == 3 else [volume]  # (S, H, W): slice by slice; anything else at once
    factor = xp.empty(volume.shape[-2:] if volume.ndim == 3 else volume.shape, dtype=volume.real.dtype)
    for plane in planes:
        xp.abs(plane, out=factor)
        xp.maximum(factor, max_amplitude, out=factor)
        xp.divide(max_amplitude, factor, out=factor)
        plane *= factor
