"""Depth regularisation: a Tikhonov penalty on slice-to-slice differences of the object.

Multislice ptychography resolves depth poorly: structure and noise leak between slices. The
penalty pulls neighbouring slices of every lateral pixel towards each other::

    R(O)  = μ Σ_{r,c} w_{r,c} Σ_{s=0}^{S−2} |O_{s+1,r,c} − O_{s,r,c}|²

    g_s   = ∂R/∂Re O_s + i ∂R/∂Im O_s = 2 μ w (2 O_s − O_{s−1} − O_{s+1})
            (one-sided at the ends: 2 μ w (O_0 − O_1) and 2 μ w (O_{S−1} − O_{S−2}))

``g`` has the engine's gradient convention (twice the Wirtinger derivative ∂/∂O*), so it is added
to the data gradient before the preconditioned step ``Δ = −g / (2 (p + floor))``.

**Scale.** ``w_{r,c} = mean_s (p_{s,r,c} + floor)`` is the illumination preconditioner averaged
over the slices of that pixel (constant along z, so ``R`` is a true quadratic penalty and ``g`` its
exact gradient). The preconditioned step of the penalty alone is then
``Δ_s ≈ −μ (2 O_s − O_{s−1} − O_{s+1})``: μ is dimensionless, the same for any dose, scan density or
mini-batch size. Near the data's minimum (whose curvature is about ``2 p`` per voxel) a depth
mode of eigenvalue ``λ ∈ [0, 4)`` of the difference operator is damped by ``1 / (1 + μ λ)``.
One explicit step at step size 1 is monotone (no sign flip of the highest mode) for ``μ ≤ 1/4``.

**Decomposition.** ``g`` at a voxel needs only the same lateral pixel of the other slices, and
``w`` only that pixel's illumination: a rank holding every slice of a pixel (every rank does, over
its extended tile) computes exactly what one rank would, once the gradients and illuminations of
all ranks are summed. No lateral FFT (a kz filter) would decompose: a tile's spectrum is not the
object's.
"""

from __future__ import annotations

from typing import Any

from ptylive.gpu.backend import get_array_module


def depth_weight(illumination: Any, floor: float) -> Any:
    """The penalty's per-pixel weight ``w = mean_s (p_s + floor)``.

    Parameters
    ----------
    illumination : (S, H, W) real
        The illumination preconditioner ``p`` (total over every position of the update).
    floor : float
        The preconditioner's floor.

    Returns
    -------
    (H, W) real, of ``illumination``'s dtype.
    """
    xp = get_array_module(illumination)
    weight = xp.mean(illumination, axis=0)
    weight += weight.dtype.type(floor)
    return weight


def depth_penalty(volume: Any, weight: Any, strength: float) -> float:
    """``R(O) = μ Σ w Σ_s |O_{s+1} − O_s|²``.

    Parameters
    ----------
    volume : (S, H, W) complex
    weight : (H, W) real
    strength : float
        μ (dimensionless, >= 0).
    """
    xp = get_array_module(volume)
    total = 0.0
    for s in range(volume.shape[0] - 1):
        difference = volume[s + 1] - volume[s]
        total += float(xp.sum(weight * (difference.real**2 + difference.imag**2)))
    return strength * total


def add_depth_gradient(gradient: Any, volume: Any, weight: Any, strength: float) -> None:
    """``gradient += ∇R(O)`` in place (see the module docstring), one slice at a time.

    Parameters
    ----------
    gradient : (S, H, W) complex
        The data gradient (views such as ``g[:, rows, cols]`` work: it is written in place).
    volume : (S, H, W) complex
        The object ``O``.
    weight : (H, W) real
        ``w`` (:func:`depth_weight`).
    strength : float
        μ; 0 or a single slice leaves ``gradient`` untouched.

    Notes
    -----
    Scratch: one (H, W) complex and one (H, W) real array (a tile-sized temporary would be ``S``
    times that).
    """
    n_slices = volume.shape[0]
    if strength == 0 or n_slices < 2:
        return
    xp = get_array_module(volume)
    scaled = weight * weight.dtype.type(2.0 * strength)
    scratch = xp.empty(volume.shape[1:], volume.dtype)
    for s in range(n_slices):
        if s > 0:
            xp.subtract(volume[s], volume[s - 1], out=scratch)
        else:
            scratch[...] = 0
        if s < n_slices - 1:
            scratch += volume[s]
            scratch -= volume[s + 1]
        scratch *= scaled
        gradient[s] += scratch
