"""The CuPy path runs the same kernels; checked against numpy when a CUDA device exists."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.backend import backend_module, cupy_available, get_array_module
from ptylive.gpu.multislice import loss_and_gradient
from ptylive.gpu.patches import accumulate_patches, extract_patches
from ptylive.gpu.propagation import fresnel_propagator

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not cupy_available(), reason="CuPy or a CUDA device is not available")


def test_numpy_arrays_select_numpy_and_missing_cupy_is_a_clear_error() -> None:
    assert get_array_module(np.zeros(3)) is np
    if not cupy_available():
        with pytest.raises(ValueError, match="CuPy"):
            backend_module("cupy")


@needs_gpu
def test_cupy_gradient_matches_numpy() -> None:
    import cupy as cp

    rng = np.random.default_rng(0)
    n, s, b = 32, 3, 4
    probe = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))).astype(np.complex64)
    volume = np.exp(0.3j * rng.standard_normal((s, 60, 50))).astype(np.complex64)
    starts = rng.integers(0, 18, size=(b, 2))
    shifts = rng.uniform(0, 1, size=(b, 2)).astype(np.float32)
    measured = rng.uniform(0, 0.1, size=(b, 16, 16)).astype(np.float32)
    prop = fresnel_propagator(np, n, 0.25, 0.025, 2.0)
    results = []
    for xp in (np, cp):
        patches = extract_patches(xp.asarray(volume), starts, n)
        r = loss_and_gradient(xp.asarray(probe), xp.asarray(shifts), patches, xp.asarray(prop),
                              xp.asarray(measured), "amplitude", True)
        grad = xp.zeros_like(xp.asarray(volume))
        accumulate_patches(grad, starts, r.object_gradient)
        host = cp.asnumpy if xp is cp else np.asarray
        results.append((r.loss, host(grad), host(r.probe_gradient)))
    (l0, g0, p0), (l1, g1, p1) = results
    # float32 through ~10 FFTs: relative error ~1e-6 of the largest element.
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert np.abs(g1 - g0).max() <= 1e-4 * np.abs(g0).max()
    assert np.abs(p1 - p0).max() <= 1e-4 * np.abs(p0).max()
