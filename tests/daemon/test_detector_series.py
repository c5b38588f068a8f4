"""A series of a non-square detector, cropped and binned: its geometry, its admission (a map of the wrong shape is
refused and counted, never a crash), and the frames a worker keeps (masked pixels out of the loss and out of the
detector scale)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ptylive.daemon.engine.decomposition import decompose
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.geometry import SeriesRefused, series_geometry
from ptylive.daemon.engine.iteration import fit_scale
from ptylive.daemon.engine.options import EngineOptions
from ptylive.daemon.engine.tile import TileOptics, set_up_tile
from ptylive.daemon.service.config import (
    ConfigError,
    DetectorConfig,
    ReconstructionConfig,
    config_from_mapping,
    config_to_toml,
    loopback_config,
)
from ptylive.daemon.service.supervisor import Admission, frames_exceed_budget
from ptylive.daemon.worker.frames import FrameStore
from ptylive.daemon.worker.refine import probe_power
from ptylive.gpu.loss import MASKED_TARGET
from ptylive.gpu.patches import window_starts
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.simulate import SimulationSpec, simulate
from ptylive.streaming.detector_frames import DetectorCrop
from ptylive.streaming.detector_maps import settings_from_config
from ptylive.streaming.protocol import SeriesStart, decode, encode_frame
from ptylive.streaming.router import Router
from ptylive.streaming.series import RegistryConfig, SeriesRegistry
from ptylive.streaming.series_book import SeriesBook

SHAPE = (514, 1030)
START = SeriesStart(series_id="eiger", scan_shape=(6, 8), scan_step_A=(1.0, 1.0), detector_shape=SHAPE,
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=0.5, detector_crop=DetectorCrop(200, 500, 64, 2))


def test_a_cropped_and_binned_series_is_reconstructed_on_its_output_frames() -> None:
    geometry = series_geometry(START, 2, 2)
    assert geometry.detector_px == 32 and geometry.window_px == 64 and geometry.detector_pixel_mrad == 1.0
    assert geometry.pixel_size_A == pytest.approx(wavelength_A(300e3) / (64 * 1.0e-3), rel=1e-12)
    assert geometry.detector.output_px == 32 and not geometry.detector.identity
    square = series_geometry(dataclasses.replace(START, detector_shape=(32, 32), detector_crop=None,
                                                 detector_pixel_mrad=1.0), 2, 2)
    assert square.detector.identity and square.pixel_size_A == geometry.pixel_size_A
    np.testing.assert_array_equal(square.positions_px, geometry.positions_px)


@pytest.mark.parametrize("changes, message", [
    ({"detector_crop": None}, "detector 514×1030 is not square: crop it"),
    ({"detector_crop": DetectorCrop(0, 0, 600)}, "crop of 600 px is larger than the 514×1030 detector"),
    ({"detector_crop": DetectorCrop(500, 0, 64)}, "leaves the 514×1030 detector"),
    ({"detector_crop": DetectorCrop(0, 0, 66, 4)}, "bin 4 does not divide the crop of 66 px"),
    ({"pixel_mask": np.zeros((512, 512), bool)}, "pixel mask is 512×512; expected the detector's 514×1030"),
    ({"flatfield": np.ones((64, 65), np.float32)}, "flatfield is 64×65"),
])
def test_impossible_detector_settings_refuse_the_series(changes: dict, message: str) -> None:
    with pytest.raises(SeriesRefused, match=message):
        series_geometry(dataclasses.replace(START, **changes), 2, 1)


def test_maps_too_large_for_the_series_start_refuse_it() -> None:
    big = dataclasses.replace(START, detector_shape=(4096, 4096), detector_crop=None,
                              flatfield=np.ones((4096, 4096), np.float32))
    with pytest.raises(SeriesRefused, match=r"series_start of 64\.\d MiB; at most 32 MiB"):
        series_geometry(big, 1, 1)


def test_a_wrong_mask_is_refused_and_counted_by_the_ingest_book(tmp_path: Path) -> None:
    """Admission (rank 0's) refuses; the registry counts it, and every frame of it is rejected as refused."""
    admission = Admission(loopback_config(tmp_path, 2, ReconstructionConfig()))
    registry = SeriesRegistry(RegistryConfig())
    book = SeriesBook(admission.router, registry, 2, admit=admission)
    assert book.start(START)  # the good one runs
    wrong = dataclasses.replace(START, series_id="wrong", pixel_mask=np.zeros((512, 1028), bool))
    assert not book.start(wrong)
    snapshot, _, _ = book.snapshot()
    refused = next(s for s in snapshot["finished"] if s["series_id"] == "wrong")
    assert snapshot["starts"]["refused"] == 1
    assert "pixel mask is 512×1028; expected the detector's 514×1030" in refused["refusal"]
    assert isinstance(admission.router(START), Router) and admission.lookup("wrong") is None


def test_the_memory_arithmetic_counts_the_cropped_frames() -> None:
    """A 4096² detector cropped to 128 px: what the workers keep is 128² per frame, not 4096²."""
    large = dataclasses.replace(START, scan_shape=(128, 128), detector_shape=(4096, 4096),
                                detector_crop=DetectorCrop(1984, 1984, 128))
    assert frames_exceed_budget(large, 2, "single", 2**30) is None
    uncropped = dataclasses.replace(large, detector_crop=None)
    assert "need at least" in (frames_exceed_budget(uncropped, 2, "single", 2**30) or "")


def masked_start() -> SeriesStart:
    mask = np.zeros(SHAPE, bool)
    mask[230:233, :] = True  # a gap row through the crop (rows 200–263)
    mask[:, 530] = True
    flat = np.full(SHAPE, 2.0, np.float32)
    return dataclasses.replace(START, pixel_mask=mask, flatfield=flat)


@pytest.mark.parametrize("loss", ["amplitude", "poisson"])
def test_the_frame_store_keeps_cropped_frames_and_masks_them_out_of_loss_and_scale(loss: str) -> None:
    geometry = series_geometry(masked_start(), 1, 1)
    store = FrameStore.allocate(geometry, 0, loss, np, np.float32)
    assert store.targets.shape[1:] == (32, 32) and store.mask is not None and store.mask.sum() > 0
    rng = np.random.default_rng(3)
    raw = rng.poisson(20, (3, *SHAPE)).astype(np.uint16)
    for k in range(3):  # bslz4 frames, decoded on the worker as the DECTRIS adapters forward them
        assert store.add(decode([bytes(p) for p in encode_frame("eiger", int(store.global_index[k]), raw[k],
                                                                encoding="bslz4")]))
    expected = geometry.detector.apply(raw)
    np.testing.assert_array_equal(store.targets[:3], expected)
    assert np.all(store.targets[:3][:, store.mask] == 0)
    assert store.intensity_sum == pytest.approx(float(expected.sum()), rel=1e-9)
    store.set_scale(4.0)
    good = store.targets[:3][:, ~store.mask]
    assert np.all(store.targets[:3][:, store.mask] == MASKED_TARGET) and np.all(good >= 0)
    transform = np.sqrt if loss == "amplitude" else (lambda x: x)
    np.testing.assert_allclose(good, transform(expected[:, ~store.mask] / 4.0), rtol=1e-6)
    store.set_scale(2.0)  # rescaling keeps the mask
    assert np.all(store.targets[:3][:, store.mask] < 0)


def test_masked_pixels_leave_the_model_power_and_the_offline_scale() -> None:
    """The detector scale α = ΣI / Σ|Ψ|² over the pixels both sums keep: data α·|Ψ|² with garbage in the masked
    pixels gives α back exactly with the mask, and a wrong α without it."""
    spec = SimulationSpec(detector_px=32, detector_pixel_mrad=3.0, n_slices=1, scan_shape=(4, 4), scan_step_px=3.0)
    sim = simulate(spec)
    shape = sim.object_truth.shape[1:]
    domain = decompose(shape, sim.positions_px, 32, 1)[0]
    starts, shifts = window_starts(sim.positions_px, 32)
    optics = TileOptics(spec.energy_eV, spec.convergence_semiangle_mrad, spec.defocus_A, spec.pixel_size_A, 32, 1,
                        spec.slice_thickness_A, sim.probe)
    mask = np.zeros((32, 32), bool)
    mask[16, :] = True  # through the bright-field disk
    alpha = 750.0
    data = alpha * sim.intensities.astype(np.float64)
    data[:, mask] = 1e6  # what a hot or gap pixel might hold
    results = {}
    for name, m in (("masked", mask), ("plain", None)):
        state = set_up_tile(domain, optics, starts, shifts, data.astype(np.float32), np, "single")
        state.volume[...] = sim.object_truth  # the true object: the model is the data's
        fit_scale(state, NullExchanger(), EngineOptions(), m)
        results[name] = state
    assert results["masked"].scale == pytest.approx(alpha, rel=1e-4)
    assert results["plain"].scale > 2 * alpha
    assert np.all(results["masked"].targets[:, mask] == MASKED_TARGET)
    full = probe_power(sim.probe, results["masked"].propagator, 1, 32)
    part = probe_power(sim.probe, results["masked"].propagator, 1, 32, mask)
    assert 0 < part < full


def test_detector_config_is_validated_and_read(tmp_path: Path) -> None:
    """[detector]: centre "auto" or [row, col], a bin that divides the crop, DECTRIS formats only; the files read into
    the settings every DECTRIS series is settled by (streaming/detector_maps.py)."""
    dectris = {"ingest": {"format": "dectris_v2"}}
    config = config_from_mapping({**dectris, "detector": {"crop_px": 64, "centre": [100, 200.5], "bin": 2}})
    assert config.detector.centre == (100.0, 200.5) and config.detector.active
    assert config_from_mapping(tomllib.loads(config_to_toml(config))) == config
    assert not DetectorConfig().active and config_from_mapping({}).detector == DetectorConfig()
    for table, message in (({"centre": "middle"}, r"'detector.centre'; expected one of 'auto' or a list"),
                           ({"centre": [1.0]}, r"'detector.centre'; expected \"auto\" or \[row, col\]"),
                           ({"crop_px": 100, "bin": 3}, r"'detector.bin'; expected a divisor of 'detector.crop_px'"),
                           ({"bin": 0}, r"'detector.bin'; expected an integer >= 1")):
        with pytest.raises(ConfigError, match=message):
            config_from_mapping({**dectris, "detector": table})
    with pytest.raises(ConfigError, match=r"\[detector\] needs a DECTRIS 'ingest.format'"):
        config_from_mapping({"detector": {"crop_px": 64}})
    np.save(tmp_path / "mask.npy", np.eye(4, dtype=np.uint8))
    settings = settings_from_config(DetectorConfig(crop_px=4, mask_file=str(tmp_path / "mask.npy")))
    assert settings.needs_first_image and settings.pixel_mask is not None and settings.pixel_mask.dtype == bool
    with pytest.raises(ValueError, match="flatfield file .*absent.h5"):
        settings_from_config(DetectorConfig(flatfield_file=str(tmp_path / "absent.h5")))
