"""Batched, orthonormal 2-D FFTs over the last two axes, in place.

On the CPU the transforms are planned FFTW transforms (pyfftw), cached per
(shape, dtype, direction) and executed on the caller's buffer when it is
SIMD-aligned (see :func:`ptylive.gpu.backend.empty_aligned`); unaligned input is
transformed through an aligned copy. On the GPU, CuPy's cuFFT with its own plan
cache is used. ``norm="ortho"`` throughout, so ``ifft2`` is the adjoint of
``fft2``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ptylive.gpu.backend import get_array_module, is_aligned

logger = logging.getLogger(__name__)

try:
    import pyfftw  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - hard dependency, kept for clarity
    pyfftw = None

#: Planned shapes kept (least recently used dropped first): each holds a scratch array of its shape, and a
#: streaming worker meets a new batch shape with every series whose chunk sizes differ.
MAX_PLANS = 64
_PLANS: OrderedDict[tuple[tuple[int, ...], str], tuple[Any, Any, Any]] = OrderedDict()
_PLAN_LOCK = threading.Lock()
PLANNERS = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT")
#: Environment variable choosing the FFTW planner. FFTW_MEASURE (the default) times candidate algorithms, so two
#: processes on a loaded machine may pick different ones, whose results differ in the last bits (and 30 iterations
#: later by 1e-4); FFTW_ESTIMATE picks without timing: the same plan, bit for bit, in every process.
PLANNER_ENV = "PTYLIVE_FFTW_PLANNER"


def planner_flags(environ: Mapping[str, str] = os.environ) -> tuple[str]:
    """The planner flag of :data:`PLANNER_ENV` (FFTW_MEASURE when unset); ValueError for an unknown one."""
    planner = environ.get(PLANNER_ENV, "FFTW_MEASURE")
    if planner not in PLANNERS:
        raise ValueError(f"{PLANNER_ENV}={planner!r}: expected one of {PLANNERS}")
    return (planner,)


PLANNER_FLAGS = planner_flags()


def _plans(shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, Any, Any]:
    """(forward plan, backward plan, scratch) for one shape; both plans share the scratch."""
    key = (shape, dtype.str)
    with _PLAN_LOCK:
        entry = _PLANS.get(key)
        if entry is not None:
            _PLANS.move_to_end(key)
            return entry
        scratch = pyfftw.empty_aligned(shape, dtype=dtype)
        entry = tuple(
            pyfftw.FFTW(scratch, scratch, axes=(-2, -1), direction=direction, flags=PLANNER_FLAGS, threads=1)
            for direction in ("FFTW_FORWARD", "FFTW_BACKWARD")
        ) + (scratch,)
        _PLANS[key] = entry
        while len(_PLANS) > MAX_PLANS:
            _PLANS.popitem(last=False)
        logger.debug("planned FFTW %s %s", shape, dtype)
    return entry


def _require_fftw_dtype(x: np.ndarray) -> None:
    if pyfftw is None or x.dtype not in (np.complex64, np.complex128):
        raise TypeError(f"FFT needs a complex64/complex128 array, got {x.dtype}")


def _cpu_inplace(x: np.ndarray, direction: str, normalise: bool) -> np.ndarray:
    _require_fftw_dtype(x)
    target = x if is_aligned(x) else pyfftw.byte_align(np.ascontiguousarray(x))
    forward, backward, scratch = _plans(target.shape, target.dtype)
    plan = forward if direction == "FFTW_FORWARD" else backward
    plan.update_arrays(target, target)
    plan.execute()
    plan.update_arrays(scratch, scratch)  # drop the reference: the plan must not keep our array alive
    if normalise:
        target *= target.real.dtype.type(1.0 / np.sqrt(x.shape[-1] * x.shape[-2]))
    if target is not x:
        x[...] = target
    return x


def fft2(x: Any, normalise: bool = True) -> Any:
    """Forward FFT over the last two axes, overwriting ``x``.

    Parameters
    ----------
    x : (..., N, M) complex
        Input; overwritten with the result.
    normalise : bool
        Orthonormal (``1/√(NM)``) when True; unscaled otherwise, for callers
        that fold the scale into their own elementwise pass.

    Returns
    -------
    (..., N, M) complex
        ``x`` itself.
    """
    xp = get_array_module(x)
    if xp is np:
        return _cpu_inplace(x, "FFTW_FORWARD", normalise)
    x[...] = xp.fft.fft2(x, norm="ortho" if normalise else "backward")
    return x


def fft_axes(x: Any, axes: tuple[int, ...], inverse: bool = False) -> Any:
    """FFT over ``axes``, overwriting ``x``: unscaled forward, inverse scaled by 1/n (numpy's norm).

    Parameters
    ----------
    x : complex array
        Any strides (a column block of a volume, a view of a crop); overwritten with the result.
    axes : tuple of int
    inverse : bool

    Returns
    -------
    ``x`` itself.

    On the CPU an FFTW plan is made for ``x`` itself with FFTW_ESTIMATE (which never touches the data and picks
    the same plan in every process): nothing is cached or kept, and no scratch array is allocated (numpy's
    forward ``fft(axis=0)`` allocated five times the block). Planning costs microseconds, so this suits a few
    large transforms (the missing-cone filter's), not the many small batched ones of :func:`fft2`.
    """
    xp = get_array_module(x)
    if xp is np:
        _require_fftw_dtype(x)
        direction = "FFTW_BACKWARD" if inverse else "FFTW_FORWARD"
        pyfftw.FFTW(x, x, axes=axes, direction=direction, flags=("FFTW_ESTIMATE",), threads=1).execute()
        if inverse:
            x *= x.real.dtype.type(1.0 / math.prod(x.shape[a] for a in axes))
        return x
    x[...] = xp.fft.ifftn(x, axes=axes) if inverse else xp.fft.fftn(x, axes=axes)
    return x


def ifft2(x: Any, normalise: bool = True) -> Any:
    """Inverse FFT over the last two axes, overwriting ``x``; with ``normalise`` the adjoint of :func:`fft2`."""
    xp = get_array_module(x)
    if xp is np:
        return _cpu_inplace(x, "FFTW_BACKWARD", normalise)
    x[...] = xp.fft.ifft2(x, norm="ortho" if normalise else "forward")
    return x
