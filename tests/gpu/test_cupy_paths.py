"""Every non-numpy branch of the kernels and the engine against the numpy path, on the same inputs.

The kernels take their array module from their inputs (``gpu/backend.py``), and on anything but numpy they
run array expressions instead of the numba loops. Each test here feeds both paths the same inputs and
compares the results. It runs on two array modules:

- ``cupy`` (marked ``gpu``; ``pytest -m gpu`` selects it, ``tools/device_check.sh`` runs it): CuPy on a CUDA
  device. Skipped, with the reason, where CuPy or a device is missing.
- ``standin``: a numpy-backed stand-in for CuPy (:class:`StandIn`), so that CI without a GPU still runs the
  non-numpy branches' arithmetic. It is numpy underneath: it cannot find what only CuPy does differently,
  except what it copies from CuPy on purpose: a device array never mixes with a host numpy array in a ufunc
  or an ``xp.`` function (CuPy raises TypeError there), and ``cupyx.scatter_add`` refuses the dtypes
  CuPy's atomic add refuses (complex among them). A pass on the stand-in is not a GPU check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import decompose
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.exchange.sync import add_pairs, pack, unpack
from ptylive.daemon.engine.iteration import fit_scale, run_async, run_sync
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileOptics, TileState, set_up_tile
from ptylive.gpu import backend
from ptylive.gpu.fused import backward_slice, transmit
from ptylive.gpu.missing_cone import cone_correction, cone_filter
from ptylive.gpu.multislice import add_slice_curvature, loss_and_gradient, position_gradient
from ptylive.gpu.patches import (
    SliceWindows,
    TileSink,
    accumulate_patches,
    accumulate_plane,
    extract_patches,
    window_starts,
)
from ptylive.gpu.probe import fourier_shift
from ptylive.gpu.propagation import farfield, farfield_adjoint, fresnel_propagator
from ptylive.gpu.simulate import SimulationSpec, simulate
from ptylive.gpu.update import constrain, object_update

# -- the numpy-backed stand-in for CuPy ---------------------------------------------------------------------------

#: What ``cupy.add.at`` (behind ``cupyx.scatter_add``) accepts: CUDA's atomicAdd types (CuPy 13-14).
SCATTER_ADD_DTYPES = tuple(np.dtype(t) for t in (np.int32, np.uint32, np.uint64, np.float16, np.float32, np.float64))
HOST_ALLOWED = {"asarray", "array", "asnumpy", "get_array_module"}  # the functions that take host arrays


class StandInArray(np.ndarray):
    """A numpy array that the array-module dispatch treats as a device array (see the module docstring)."""

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, out: Any = None, **kwargs: Any) -> Any:
        _refuse_host(ufunc.__name__, (*inputs, *(out or ())))
        args = [_host_view(x) for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(_host_view(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)


def _host_view(x: Any) -> Any:
    return x.view(np.ndarray) if isinstance(x, StandInArray) else x


def _refuse_host(name: str, values: tuple[Any, ...]) -> None:
    for x in values:
        if isinstance(x, np.ndarray) and not isinstance(x, StandInArray):
            raise TypeError(f"stand-in for CuPy: {name} got a host numpy array {x.shape} {x.dtype} next to device "
                            "arrays (CuPy raises TypeError here: move it with xp.asarray first)")


def _device(value: Any) -> Any:
    """numpy results as stand-in device arrays (scalars as 0-d arrays, as CuPy returns them)."""
    if isinstance(value, StandInArray):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value).view(StandInArray)
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    if isinstance(value, list):
        return [_device(v) for v in value]
    return value


class StandIn:
    """``xp`` for :class:`StandInArray`: numpy's functions, refusing host arrays, returning device arrays."""

    ndarray = StandInArray

    def __init__(self, source: ModuleType = np) -> None:
        self._source = source

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._source, name)
        if isinstance(attr, ModuleType):
            return StandIn(attr)
        if isinstance(attr, type) or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            _refuse_host(f"xp.{name}", (*args, *kwargs.values()))
            return _device(attr(*args, **kwargs))

        return call

    def get_array_module(self, *arrays: Any) -> Any:
        return STANDIN if any(isinstance(a, StandInArray) for a in arrays) else np

    @staticmethod
    def asarray(a: Any, dtype: Any = None) -> StandInArray:
        """A device copy of host data (CuPy copies too); device arrays are returned as they are (cast if asked)."""
        if isinstance(a, StandInArray):
            return a if dtype is None else a.astype(dtype, copy=False).view(StandInArray)
        return np.array(a, dtype=dtype, copy=True).view(StandInArray)

    array = asarray

    @staticmethod
    def asnumpy(a: Any) -> np.ndarray:
        return np.array(_host_view(a), copy=True)


class StandInCupyx:
    """``cupyx`` for the stand-in: ``scatter_add`` with CuPy's dtype restriction."""

    @staticmethod
    def scatter_add(a: StandInArray, slices: Any, value: Any) -> None:
        if a.dtype not in SCATTER_ADD_DTYPES:
            raise TypeError(f"stand-in for CuPy: cupy.add.at (cupyx.scatter_add) does not take {a.dtype}; it takes "
                            f"{', '.join(str(d) for d in SCATTER_ADD_DTYPES)}")
        index = tuple(_host_view(s) for s in slices) if isinstance(slices, tuple) else _host_view(slices)
        np.add.at(_host_view(a), index, _host_view(value))


STANDIN = StandIn()


# -- the two array modules ----------------------------------------------------------------------------------------

def _cupy_missing() -> str | None:
    """Why the CuPy tests cannot run here (None: they can)."""
    try:
        import cupy  # type: ignore[import-not-found]  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "no CuPy"
        return f"CuPy does not import ({type(error).__name__}: {error}); install ptylive[gpu]"
    if not backend.cupy_available():
        return "CuPy imports but sees no CUDA device (cupy.cuda.runtime.getDeviceCount() failed or is 0)"
    return None


CUPY_MISSING = _cupy_missing()


@dataclass(frozen=True)
class Device:
    """An array module to check against numpy, and how to bring its arrays back to the host."""

    name: str
    xp: Any
    host: Callable[[Any], np.ndarray]


@pytest.fixture(params=[
    pytest.param("cupy", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(CUPY_MISSING is not None,
                                                   reason=f"needs CuPy and a CUDA device: {CUPY_MISSING}")]),
    pytest.param("standin"),
])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    if request.param == "cupy":
        import cupy

        yield Device("cupy", cupy, cupy.asnumpy)
        cupy.cuda.Device().synchronize()
        return
    monkeypatch.setattr(backend, "_cupy", STANDIN)
    monkeypatch.setitem(sys.modules, "cupyx", StandInCupyx)
    yield Device("standin", STANDIN, StandIn.asnumpy)


def close(got: Any, expected: Any, rel: float = 1e-5) -> None:
    """``got`` (host) within ``rel`` × the largest element of ``expected`` (float32 arithmetic in both)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.dtype)
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(got - expected).max())
    assert error <= rel * scale, f"max |difference| {error:.3g} > {rel:g} × max |expected| {scale:.3g}"


def _complex(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float = 1.0) -> np.ndarray:
    return (amplitude * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)


def _object(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Transmissions near 1, some above ``max_amplitude = 1`` (the constraint has work to do)."""
    return ((1.0 + 0.2 * rng.standard_normal(shape)) * np.exp(0.5j * rng.standard_normal(shape))).astype(np.complex64)


def _starts(rng: np.random.Generator, n_positions: int, shape: tuple[int, int], window: int) -> np.ndarray:
    """Window starts inside ``shape``, some repeated (the scatter-add must add, not assign)."""
    starts = np.stack([rng.integers(0, shape[0] - window + 1, n_positions),
                       rng.integers(0, shape[1] - window + 1, n_positions)], axis=1)
    starts[-1] = starts[0]
    return starts


# -- gpu/patches.py -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trial", ["plain", "step", "step and constraint"])
def test_slice_windows_match_numpy(device: Device, trial: str) -> None:
    rng = np.random.default_rng(1)
    volume, direction = _object(rng, (3, 40, 36)), _complex(rng, (3, 40, 36), 0.3)
    starts = _starts(rng, 7, (40, 36), 16)
    step, cap = (None, None) if trial == "plain" else (0.7, 1.0 if trial == "step and constraint" else None)
    expected = SliceWindows(volume, starts, 16, None if step is None else direction, step or 0.0, cap)
    got = SliceWindows(device.xp.asarray(volume), starts, 16,
                       None if step is None else device.xp.asarray(direction), step or 0.0, cap)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    for s in range(3):
        close(device.host(got[s]), expected[s].copy(), rel=1e-6)
    if cap is not None:
        assert np.abs(device.host(got[2])).max() <= cap * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [np.complex64, np.float32, np.complex128])
def test_extract_and_accumulate_patches_match_numpy(device: Device, dtype: Any) -> None:
    rng = np.random.default_rng(2)
    volume = _complex(rng, (2, 30, 34)).astype(dtype) if np.dtype(dtype).kind == "c" else \
        rng.random((2, 30, 34)).astype(dtype)
    starts = _starts(rng, 9, (30, 34), 12)
    patches = extract_patches(volume, starts, 12)
    got = extract_patches(device.xp.asarray(volume), starts, 12)
    close(device.host(got), patches, rel=0)
    expected, target = volume.copy(), device.xp.asarray(volume)
    accumulate_patches(expected, starts, patches)
    accumulate_patches(target, starts, got)
    close(device.host(target), expected, rel=1e-6)


def test_accumulate_plane_and_tile_sink_match_numpy(device: Device) -> None:
    rng = np.random.default_rng(3)
    gradient, illumination = _complex(rng, (2, 28, 30)), rng.random((2, 28, 30)).astype(np.float32)
    starts = _starts(rng, 6, (28, 30), 10)
    windows, lit = _complex(rng, (6, 10, 10)), rng.random((6, 10, 10)).astype(np.float32)
    expected_g, expected_i = gradient.copy(), illumination.copy()
    TileSink(expected_g, expected_i, starts).add(1, windows, lit)
    got_g, got_i = device.xp.asarray(gradient), device.xp.asarray(illumination)
    TileSink(got_g, got_i, starts).add(1, device.xp.asarray(windows), device.xp.asarray(lit))
    close(device.host(got_g), expected_g, rel=1e-6)
    close(device.host(got_i), expected_i, rel=1e-6)
    plane = device.xp.asarray(gradient[0])
    accumulate_plane(plane, starts, device.xp.asarray(windows))
    reference = gradient[0].copy()
    accumulate_plane(reference, starts, windows)
    close(device.host(plane), reference, rel=1e-6)


# -- gpu/probe.py, gpu/fused.py, gpu/propagation.py ---------------------------------------------------------------

@pytest.mark.parametrize("waves", ["one probe", "one wave per shift", "zero shifts"])
def test_fourier_shift_matches_numpy(device: Device, waves: str) -> None:
    rng = np.random.default_rng(4)
    wave = _complex(rng, (24, 24)) if waves != "one wave per shift" else _complex(rng, (5, 24, 24))
    shifts = np.zeros((5, 2)) if waves == "zero shifts" else rng.uniform(-1, 1, (5, 2))
    expected = fourier_shift(wave, shifts)
    for device_shifts in (shifts, device.xp.asarray(shifts)):  # the engine passes both
        close(device.host(fourier_shift(device.xp.asarray(wave), device_shifts)), expected, rel=2e-6)


def test_transmit_and_backward_slice_match_numpy(device: Device) -> None:
    rng = np.random.default_rng(5)
    wave, patch, gradient = _complex(rng, (4, 16, 16)), _complex(rng, (4, 16, 16)), _complex(rng, (4, 16, 16))
    expected = [wave.copy(), np.empty_like(wave), gradient.copy(), np.empty((4, 16, 16), np.float32)]
    transmit(expected[0], patch, expected[1])
    backward_slice(expected[1], expected[2], patch, expected[3])
    got = [device.xp.asarray(a) for a in (wave, np.empty_like(wave), gradient, np.empty((4, 16, 16), np.float32))]
    transmit(got[0], device.xp.asarray(patch), got[1])
    backward_slice(got[1], got[2], device.xp.asarray(patch), got[3])
    for g, e in zip(got, expected, strict=True):
        close(device.host(g), e, rel=1e-6)


@pytest.mark.parametrize("detector", [16, 24])
def test_farfield_and_adjoint_match_numpy(device: Device, detector: int) -> None:
    rng = np.random.default_rng(6)
    exit_wave, field = _complex(rng, (3, 24, 24)), _complex(rng, (3, detector, detector))
    expected = farfield(exit_wave.copy(), detector)
    close(device.host(farfield(device.xp.asarray(exit_wave), detector)), expected, rel=2e-6)
    adjoint = farfield_adjoint(field, 24, np.empty((3, 24, 24), np.complex64))
    got = farfield_adjoint(device.xp.asarray(field), 24, device.xp.empty((3, 24, 24), np.complex64))
    close(device.host(got), adjoint, rel=2e-6)


# -- gpu/multislice.py --------------------------------------------------------------------------------------------

def _batch(rng: np.random.Generator, n_modes: int) -> dict[str, Any]:
    n, s, b, detector = 32, 3, 5, 24
    probe = _complex(rng, (n, n) if n_modes == 1 else (n_modes, n, n), 0.05)
    return {"probe": probe, "volume": _object(rng, (s, 56, 50)), "starts": _starts(rng, b, (56, 50), n),
            "shifts": rng.uniform(0, 1, (b, 2)).astype(np.float32),
            "measured": rng.uniform(0, 0.1, (b, detector, detector)).astype(np.float32),
            "propagator": fresnel_propagator(np, n, 0.25, 0.025, 2.0)}


def _gradient_pass(xp: Any, case: dict[str, Any], loss: str, sink: bool) -> dict[str, Any]:
    volume = xp.asarray(case["volume"])
    gradient, illumination = xp.zeros_like(volume), xp.zeros(volume.shape, np.float32)
    result = loss_and_gradient(xp.asarray(case["probe"]), xp.asarray(case["shifts"]),
                               SliceWindows(volume, case["starts"], case["probe"].shape[-1]),
                               xp.asarray(case["propagator"]), xp.asarray(case["measured"]), loss, True, True,
                               sink=TileSink(gradient, illumination, case["starts"]) if sink else None)
    out = {"loss": result.loss, "probe": result.probe_gradient, "positions": result.position_gradient,
           "curvature": result.position_curvature}
    if sink:
        out.update(gradient=gradient, illumination=illumination)
    else:
        out.update(gradient=result.object_gradient, illumination=result.illumination)
    return out


@pytest.mark.parametrize("loss", ["amplitude", "poisson"])
@pytest.mark.parametrize("n_modes", [1, 2])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "arrays"])
def test_loss_and_gradient_match_numpy(device: Device, loss: str, n_modes: int, sink: bool) -> None:
    """Loss, object and probe gradients, illumination, position gradient and curvature (the CuPy amplitude
    loss runs farfield + amplitude_loss where numpy runs the fused detector kernel)."""
    case = _batch(np.random.default_rng(7), n_modes)
    expected = _gradient_pass(np, case, loss, sink)
    got = _gradient_pass(device.xp, case, loss, sink)
    assert float(got["loss"]) == pytest.approx(expected["loss"], rel=2e-5)
    for name in ("gradient", "illumination", "probe"):
        close(device.host(got[name]), expected[name], rel=1e-4)
    for name in ("positions", "curvature"):
        close(device.host(got[name]), expected[name], rel=1e-4)


def test_slice_curvature_and_position_gradient_match_numpy(device: Device) -> None:
    rng = np.random.default_rng(8)
    patch, lit = _object(rng, (4, 20, 20)), rng.random((4, 20, 20)).astype(np.float32)
    expected = np.zeros((4, 2))
    add_slice_curvature(patch, lit, expected)
    got = device.xp.zeros((4, 2))
    add_slice_curvature(device.xp.asarray(patch), device.xp.asarray(lit), got)
    close(device.host(got), expected, rel=1e-5)
    probe, shifts, wave_gradient = _complex(rng, (20, 20)), rng.uniform(0, 1, (4, 2)), _complex(rng, (4, 20, 20))
    reference = position_gradient(probe, shifts, wave_gradient.copy())
    close(device.host(position_gradient(device.xp.asarray(probe), device.xp.asarray(shifts),
                                        device.xp.asarray(wave_gradient))), reference, rel=1e-5)


# -- gpu/update.py ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["whole tile", "rectangle view", "one plane"])
def test_object_update_and_constrain_match_numpy(device: Device, where: str) -> None:
    rng = np.random.default_rng(9)
    volume, gradient = _object(rng, (3, 26, 22)), _complex(rng, (3, 26, 22))
    illumination = rng.random((3, 26, 22)).astype(np.float32)
    region: Any = {"whole tile": np.s_[:, :, :], "rectangle view": np.s_[:, 3:19, 5:17],
                   "one plane": np.s_[1, 2:20, :]}[where]
    expected = [a.copy() for a in (volume, gradient, illumination)]
    got = [device.xp.asarray(a) for a in (volume, gradient, illumination)]
    for v, g, p in (expected, got):
        update = object_update(g[region], p[region], 0.05, 0.8)
        target = v[region]
        target += update
        constrain(target, 1.0)
    for g, e in zip(got, expected, strict=True):
        close(device.host(g), e, rel=1e-6)
    assert np.abs(device.host(got[0][region])).max() <= 1.0 + 1e-6


# -- daemon/engine/exchange: device blocks through host buffers ---------------------------------------------------

def test_exchange_pack_and_add_pairs_match_numpy(device: Device) -> None:
    rng = np.random.default_rng(10)
    gradient, illumination = _complex(rng, (3, 20, 24)), rng.random((3, 20, 24)).astype(np.float32)
    region = (slice(0, 2), slice(4, 11), slice(17, 24))  # a round of two slices of an exchange region (a view)
    shape = (2, 7, 7)
    expected, got = np.empty(3 * 98 + 2), np.empty(3 * 98 + 2)
    pack(gradient[region], illumination[region], expected, header=(3.0, 1.0))
    pack(device.xp.asarray(gradient)[region], device.xp.asarray(illumination)[region], got, header=(3.0, 1.0))
    np.testing.assert_array_equal(got, expected)
    pairs, received = unpack(got, shape, n_head=2)
    target_np, target = gradient.copy(), device.xp.asarray(gradient)
    add_pairs(target_np[region], pairs)
    add_pairs(target[region], pairs)
    close(device.host(target), target_np, rel=1e-6)
    lit = device.xp.asarray(illumination)
    lit[region] += device.xp.asarray(received)  # as SyncExchanger.reduce_gradients adds a neighbour's
    close(device.host(lit), illumination + np.pad(received.astype(np.float32), ((0, 1), (4, 9), (17, 0))), rel=1e-6)


def test_missing_cone_correction_matches_numpy(device: Device) -> None:
    """The filter of ``ln O`` (transform along z in column blocks, padded lateral low-pass, ``exp``) on a strong
    phase object, written into a strided view as the engine does."""
    rng = np.random.default_rng(7)
    volume = np.exp(1j * rng.normal(0.0, 0.8, (6, 40, 70)) - np.abs(rng.normal(0.0, 0.05, (6, 40, 70))))
    volume = volume.astype(np.complex64)
    cone = cone_filter(6, 4.0, 0.12, 20.0)  # kernels up to 6 px: the padding is exercised
    expected = cone_correction(volume, cone)
    out = device.xp.zeros((6, 50, 80), np.complex64)
    got = cone_correction(device.xp.asarray(volume), cone, out=out[:, 5:45, 5:75])
    close(device.host(got), expected)
    assert not device.host(out)[:, :5].any()  # nothing written beyond the view
    assert float(np.abs(expected).max()) > 0.1


# -- the engine: whole iterations ---------------------------------------------------------------------------------

def _engine_problem(xp: Any) -> TileState:
    """One rank's tile of a small simulated scan (32-px window, 8×8 positions 3 px apart, 3 slices), scale fitted."""
    spec = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=3, scan_shape=(8, 8), scan_step_px=3.0)
    sim = simulate(spec)
    shape = sim.object_truth.shape[1:]
    domain = decompose(shape, sim.positions_px, 32, 1)[0]
    starts, shifts = window_starts(sim.positions_px, 32)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A, 32, 3,
                        spec.slice_thickness_A, sim.probe)
    state = set_up_tile(domain, optics, starts, shifts, xp.asarray(sim.intensities.astype(np.float32)), xp, "single",
                        missing_cone=EngineOptions().missing_cone)  # the engine's default: the filter runs
    fit_scale(state, NullExchanger(), EngineOptions())
    return state


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_engine_iterations_match_numpy(device: Device, mode: str) -> None:
    """Four iterations of one rank (two updates each, probe refinement, position correction from iteration 1,
    a fixed step so that no line-search decision can flip on rounding): losses, object and probe agree."""
    options = EngineOptions(iterations=4, mode=mode, step_size=0.5, updates_per_iteration=2,
                            positions_from_iteration=1, batch_size=16)
    runs = {}
    for name, xp in (("numpy", np), (device.name, device.xp)):
        state = _engine_problem(xp)
        report = (run_sync if mode == "sync" else run_async)(state, NullExchanger(), replace(options))
        host = device.host if xp is not np else np.asarray
        runs[name] = (np.asarray(report.loss_history), host(state.volume), host(state.probe))
    (loss_np, volume_np, probe_np), (loss, volume, probe) = runs["numpy"], runs[device.name]
    np.testing.assert_allclose(loss, loss_np, rtol=1e-3)
    assert loss_np[-1] < loss_np[0]  # the run did refine
    close(volume, volume_np, rel=1e-3)
    close(probe, probe_np, rel=1e-3)


def test_detector_preprocessing_matches_numpy(device: Device) -> None:
    """Crop, flatfield, mask and bin of raw frames (streaming/detector_frames.py), and the bright-field centre."""
    from ptylive.streaming.detector_frames import DetectorCrop, DetectorPreprocessing, bright_field_centre_px

    rng = np.random.default_rng(7)
    shape = (66, 130)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    disk = (rows - 30.3) ** 2 + (cols - 71.6) ** 2 <= 100
    raw = rng.poisson(np.where(disk, 80.0, 1.0), (3, *shape)).astype(np.uint16)
    mask = np.zeros(shape, bool)
    mask[32:34, :] = True
    flat = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    pre = DetectorPreprocessing.build(shape, DetectorCrop(10, 40, 48, bin_factor=2), mask, flat)
    expected = pre.apply(raw)
    close(device.host(pre.apply(device.xp.asarray(raw))), expected)
    centre = bright_field_centre_px(device.xp.asarray(raw), device.xp.asarray(mask))
    np.testing.assert_allclose(centre, bright_field_centre_px(raw, mask), rtol=1e-12)
    assert abs(centre[0] - 30.3) <= 0.5 and abs(centre[1] - 71.6) <= 0.5
