"""Cutting probe windows out of an object and adding gradients back.

A window of ``N×N`` pixels starting at integer ``(row, col)`` covers object
pixels ``[row, row+N) × [col, col+N)`` of every slice. On the CPU both
directions are single-pass numba loops (a Python loop over positions cost
18-35 % of a gradient pass); on the GPU they are fancy indexing and
``cupyx.scatter_add`` (:func:`_scatter_add`: CuPy's atomic add takes real dtypes
only, so a complex array takes its real and imaginary parts apart).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ptylive.gpu.backend import empty_aligned, get_array_module


@numba.njit(cache=True, nogil=True)
def _extract_plane(plane: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    n_pos, n, m = out.shape
    for b in range(n_pos):
        r0 = starts[b, 0]
        c0 = starts[b, 1]
        for i in range(n):
            for j in range(m):
                out[b, i, j] = plane[r0 + i, c0 + j]


@numba.njit(cache=True, nogil=True)
def _accumulate_plane(plane: np.ndarray, starts: np.ndarray, patches: np.ndarray) -> None:  # pragma: no cover
    n_pos, n, m = patches.shape
    for b in range(n_pos):
        r0 = starts[b, 0]
        c0 = starts[b, 1]
        for i in range(n):
            for j in range(m):
                plane[r0 + i, c0 + j] += patches[b, i, j]


@numba.njit(cache=True, nogil=True)
def _extract(volume: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    for s in range(out.shape[0]):
        _extract_plane(volume[s], starts, out[s])


@numba.njit(cache=True, nogil=True)
def _accumulate(volume: np.ndarray, starts: np.ndarray, patches: np.ndarray) -> None:  # pragma: no cover
    for s in range(patches.shape[0]):
        _accumulate_plane(volume[s], starts, patches[s])


@numba.njit(cache=True, nogil=True)
def _extract_plane_trial(plane: np.ndarray, direction: np.ndarray, step: float, starts: np.ndarray,
                         max_amplitude: float, out: np.ndarray) -> None:  # pragma: no cover
    # Real arithmetic in the plane's precision (``step`` and ``max_amplitude`` come in its real dtype) and
    # no branch: the factor a / max(|v|, a) is exactly 1 where nothing is clipped. With complex abs (hypot),
    # a double ``max_amplitude`` and a branch per voxel this cost 20-50x the plain cut-out.
    n_pos, n, m = out.shape
    for b in range(n_pos):
        r0 = starts[b, 0]
        c0 = starts[b, 1]
        for i in range(n):
            row, row_direction, target = plane[r0 + i, c0:c0 + m], direction[r0 + i, c0:c0 + m], out[b, i]
            for j in range(m):
                re = row[j].real + step * row_direction[j].real
                im = row[j].imag + step * row_direction[j].imag
                factor = max_amplitude / max(np.sqrt(re * re + im * im), max_amplitude)
                target[j] = complex(re * factor, im * factor)


@numba.njit(cache=True, nogil=True)
def _extract_plane_step(plane: np.ndarray, direction: np.ndarray, step: float, starts: np.ndarray,
                        out: np.ndarray) -> None:  # pragma: no cover
    n_pos, n, m = out.shape
    for b in range(n_pos):
        r0 = starts[b, 0]
        c0 = starts[b, 1]
        for i in range(n):
            row, row_direction, target = plane[r0 + i, c0:c0 + m], direction[r0 + i, c0:c0 + m], out[b, i]
            for j in range(m):
                target[j] = complex(row[j].real + step * row_direction[j].real,
                                    row[j].imag + step * row_direction[j].imag)


def _index_grids(xp: Any, starts: Any, n: int) -> tuple[Any, Any]:
    offs = xp.arange(n)
    rows = xp.asarray(starts[:, 0])[:, None, None] + offs[None, :, None]
    cols = xp.asarray(starts[:, 1])[:, None, None] + offs[None, None, :]
    return rows, cols


def window_starts(positions_px: np.ndarray, window_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer window start and sub-pixel shift of each probe position.

    Our grid convention: object pixel centres sit at integer coordinates and the
    probe's centre (array index ``N//2``) lands on the position, so a position
    ``p`` gives start ``floor(p) − N//2`` and shift ``p − floor(p)`` in [0, 1).

    Returns
    -------
    starts : (P, 2) int64
    shifts : (P, 2) float64
    """
    positions = np.asarray(positions_px, dtype=np.float64)
    base = np.floor(positions)
    return (base.astype(np.int64) - window_px // 2), positions - base


def check_windows(shape: tuple[int, int], starts: np.ndarray, window_px: int) -> None:
    """Raise ValueError if any window leaves an object of ``shape`` (rows, cols)."""
    starts = np.asarray(starts)
    if starts.size and (starts.min() < 0 or (starts + window_px > np.asarray(shape)).any()):
        bad = np.nonzero((starts < 0).any(1) | (starts + window_px > np.asarray(shape)).any(1))[0]
        raise ValueError(
            f"{len(bad)} probe windows of {window_px} px leave the object of shape {shape}; "
            f"first offending window start (row, col) = {tuple(starts[bad[0]])}"
        )


def extract_patches(volume: Any, starts: np.ndarray, window_px: int) -> Any:
    """Cut windows out of every slice.

    Parameters
    ----------
    volume : (S, H, W) complex or real
    starts : (B, 2) int
        Window start ``(row, col)``; windows must lie inside ``(H, W)``.
    window_px : int

    Returns
    -------
    (S, B, N, N) array of ``volume.dtype`` (SIMD-aligned on CPU).
    """
    xp = get_array_module(volume)
    out = empty_aligned(xp, (volume.shape[0], len(starts), window_px, window_px), volume.dtype)
    if xp is np:
        _extract(volume, np.ascontiguousarray(starts, dtype=np.int64), out)
    else:
        rows, cols = _index_grids(xp, starts, window_px)
        out[...] = volume[:, rows, cols]
    return out


def accumulate_patches(volume: Any, starts: np.ndarray, patches: Any) -> None:
    """Add ``patches`` (S, B, N, N) into ``volume`` (S, H, W) at ``starts`` (B, 2).

    Overlapping windows add up (a scatter-add, not an assignment).
    """
    xp = get_array_module(volume)
    if xp is np:
        _accumulate(volume, np.ascontiguousarray(starts, dtype=np.int64), patches)
        return
    rows, cols = _index_grids(xp, starts, patches.shape[-1])
    for s in range(volume.shape[0]):
        _scatter_add(volume[s], (rows, cols), patches[s])


def _scatter_add(target: Any, index: tuple[Any, Any], values: Any) -> None:
    """``cupyx.scatter_add(target, index, values)``, complex arrays included (CuPy arrays only).

    CuPy's scatter-add (``cupy.add.at``) takes int32, uint32, uint64 and float16/32/64 only (CUDA's
    ``atomicAdd``) and raises TypeError for complex64/complex128; the real and imaginary parts are views
    of a real dtype, so each is added on its own: the same sums, voxel by voxel.
    """
    import cupyx  # type: ignore[import-not-found]  # only reached with CuPy arrays

    if target.dtype.kind == "c":
        cupyx.scatter_add(target.real, index, values.real)
        cupyx.scatter_add(target.imag, index, values.imag)
    else:
        cupyx.scatter_add(target, index, values)


class SliceWindows:
    """The (S, B, N, N) windows of a volume, one slice at a time, without the (S, B, N, N) copy.

    ``windows[s]`` is slice ``s``'s (B, N, N) windows, written into one scratch array that the next
    ``windows[...]`` overwrites: use it before asking for another slice. The multislice model reads
    its windows only this way (:func:`ptylive.gpu.multislice.loss_and_gradient`), so a batch's
    workspace holds one slice of windows instead of all ``S``.

    With ``direction`` (S, H, W) and ``step``, the windows are those of ``O + step·Δ`` projected onto
    ``|O| ≤ max_amplitude`` (:func:`ptylive.gpu.update.constrain`'s projection, voxel by voxel): a line
    search's trial object, without a tile-sized copy.

    Parameters
    ----------
    volume : (S, H, W) complex
    starts : (B, 2) int
        Window starts; windows must lie inside ``(H, W)``.
    window_px : int
    """

    def __init__(self, volume: Any, starts: np.ndarray, window_px: int, direction: Any | None = None,
                 step: float = 0.0, max_amplitude: float | None = None) -> None:
        self.volume = volume
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self.direction = direction
        self.step = step
        self.max_amplitude = max_amplitude
        self.shape = (volume.shape[0], len(self.starts), window_px, window_px)
        self.dtype = volume.dtype
        self.xp = get_array_module(volume)
        self._out = empty_aligned(self.xp, self.shape[1:], volume.dtype)
        self._grids = None if self.xp is np else _index_grids(self.xp, self.starts, window_px)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: int) -> Any:
        out = self._out
        if self.xp is np:
            if self.direction is None:
                _extract_plane(self.volume[s], self.starts, out)
            else:
                real = self.volume.real.dtype.type
                if self.max_amplitude is None:
                    _extract_plane_step(self.volume[s], self.direction[s], real(self.step), self.starts, out)
                else:
                    _extract_plane_trial(self.volume[s], self.direction[s], real(self.step), self.starts,
                                         real(self.max_amplitude), out)
            return out
        assert self._grids is not None  # made in __init__ for every array module but numpy
        rows, cols = self._grids
        out[...] = self.volume[s][rows, cols]
        if self.direction is not None:
            out += self.dtype.type(self.step) * self.direction[s][rows, cols]
            if self.max_amplitude is not None:
                amplitude = self.xp.abs(out)
                self.xp.maximum(amplitude, self.max_amplitude, out=amplitude)
                self.xp.divide(self.max_amplitude, amplitude, out=amplitude)
                out *= amplitude
        return out


def accumulate_plane(plane: Any, starts: np.ndarray, patches: Any) -> None:
    """Add one slice's windows ``patches`` (B, N, N) into ``plane`` (H, W) at ``starts`` (B, 2)."""
    xp = get_array_module(plane)
    if xp is np:
        _accumulate_plane(plane, np.ascontiguousarray(starts, dtype=np.int64), patches)
        return
    rows, cols = _index_grids(xp, starts, patches.shape[-1])
    _scatter_add(plane, (rows, cols), patches)


class TileSink:
    """Where a batch's object gradient and illumination go, slice by slice, instead of (S, B, N, N) arrays.

    ``add(s, gradient_s, illumination_s)`` scatter-adds one slice's (B, N, N) windows at ``starts`` into
    ``gradient[s]`` and ``illumination[s]`` (both (S, H, W)), exactly as :func:`accumulate_patches`
    would add the whole (S, B, N, N) arrays.
    """

    def __init__(self, gradient: Any, illumination: Any, starts: np.ndarray) -> None:
        self.gradient = gradient
        self.illumination = illumination
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self._numpy = get_array_module(gradient) is np
        self._grids: tuple[Any, Any] | None = None  # CuPy's window indices, built on the first slice

    def add(self, s: int, gradient_s: Any, illumination_s: Any) -> None:
        if self._numpy:
            _accumulate_plane(self.gradient[s], self.starts, gradient_s)
            _accumulate_plane(self.illumination[s], self.starts, illumination_s)
            return
        if self._grids is None:
            self._grids = _index_grids(get_array_module(self.gradient), self.starts, gradient_s.shape[-1])
        _scatter_add(self.gradient[s], self._grids, gradient_s)
        _scatter_add(self.illumination[s], self._grids, illumination_s)
