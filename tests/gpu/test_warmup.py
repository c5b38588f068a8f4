"""The warm-up runs every numba kernel the engine uses, in both precisions, without error."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.gpu.warmup import compile_kernels


@pytest.mark.parametrize("real_dtype, complex_dtype", [(np.float32, np.complex64), (np.float64, np.complex128)])
def test_compile_kernels_runs_the_gradient_and_patch_kernels(real_dtype: type, complex_dtype: type) -> None:
    seconds = compile_kernels(real_dtype, complex_dtype)
    assert np.isfinite(seconds) and seconds >= 0
