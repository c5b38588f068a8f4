"""A series' detector crop, pixel mask and flatfield: on the wire (series_start), from the SIMPLON v1 header and the
stream v2 start, from files, and settled per series by ``[detector]`` (streaming/detector_maps.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest

from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming import dectris_v2 as v2
from ptylive.streaming.dectris_v1 import DectrisV1Decoder
from ptylive.streaming.dectris_v2 import DectrisV2Decoder
from ptylive.streaming.detector_frames import DetectorCrop, crop_around
from ptylive.streaming.detector_maps import DetectorSettings, read_detector_map
from ptylive.streaming.protocol import ProtocolError, SeriesStart, decode, encode_series_start
from ptylive.streaming.scan_geometry import Optics, ScanGeometry, SeriesTemplate

SHAPE = (514, 1030)
CENTRE = (180.0, 640.0)
START = SeriesStart(series_id="d", scan_shape=(2, 3), scan_step_A=(1.0, 1.0), detector_shape=SHAPE, dtype="uint16",
                    energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0, detector_pixel_mrad=0.5)


def disk_image(centre: tuple[float, float] = CENTRE, radius_px: float = 20.0) -> np.ndarray:
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return np.where((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius_px ** 2, 500, 1).astype(np.uint16)


def eiger_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[255:259, :] = True
    mask[:, 512:518] = True
    return mask


def test_series_start_carries_crop_and_maps_on_the_wire() -> None:
    rng = np.random.default_rng(0)
    mask, flat = rng.random((64, 64)) < 0.1, rng.uniform(0.5, 2.0, (64, 64)).astype(np.float32)
    start = dataclasses.replace(START, detector_crop=DetectorCrop(100, 300, 64, 2), pixel_mask=mask, flatfield=flat)
    again = decode(encode_series_start(start))
    assert isinstance(again, SeriesStart) and again == start and hash(again) == hash(start)
    assert again.detector_crop == DetectorCrop(100, 300, 64, 2)
    np.testing.assert_array_equal(again.pixel_mask, mask)
    np.testing.assert_array_equal(again.flatfield, flat)
    plain = decode(encode_series_start(START))
    assert isinstance(plain, SeriesStart) and plain.detector_crop is None and plain.pixel_mask is None


@pytest.mark.parametrize("key, value", [
    ("crop", {"row0_px": 1, "col0_px": 2, "size_px": 0, "bin": 1}),
    ("crop", {"row0_px": -1, "col0_px": 2, "size_px": 8, "bin": 1}),
    ("crop", {"row0_px": 1, "col0_px": 2, "size_px": 8}),
    ("crop", {"row0_px": 1.5, "col0_px": 2, "size_px": 8, "bin": 1}),
    ("pixel_mask", {"shape": [4, 4], "bits": b"\x00"}),
    ("pixel_mask", {"shape": [4, 4]}),
    ("flatfield", {"shape": [2, 2], "float32": bytes(15)}),
    ("flatfield", {"shape": [0, 2], "float32": b""}),
    ("flatfield", [1.0]),
])
def test_bad_detector_extras_are_bad_fields(key: str, value: object) -> None:
    header = msgpack.unpackb(encode_series_start(START)[0])
    header["detector"][key] = value
    with pytest.raises(ProtocolError) as info:
        decode([msgpack.packb(header, use_bin_type=True)])
    assert info.value.reason == "bad_field"


def test_auto_crop_is_centred_on_the_first_image_and_the_maps_cut_to_it() -> None:
    flat = np.random.default_rng(1).uniform(0.9, 1.1, SHAPE).astype(np.float32)
    settings = DetectorSettings(crop_px=96, bin_factor=2, flatfield=flat)
    stream_mask = eiger_mask()
    image = disk_image()
    image[stream_mask] = 0
    start = settings.series_start(START, image, stream_mask, None)
    assert start.detector_crop == crop_around(CENTRE, 96, 2)
    crop = start.detector_crop
    box = (slice(crop.row0_px, crop.row0_px + 96), slice(crop.col0_px, crop.col0_px + 96))
    assert start.pixel_mask is not None and start.flatfield is not None
    np.testing.assert_array_equal(start.pixel_mask, stream_mask[box])
    np.testing.assert_array_equal(start.flatfield, flat[box])  # the file's flatfield wins over the stream's
    assert settings.needs_first_image and not DetectorSettings(96, (1.0, 2.0)).needs_first_image


def test_fixed_centre_masks_or_and_a_dark_first_image_falls_back_to_the_middle() -> None:
    configured = np.zeros(SHAPE, bool)
    configured[10, 20] = True
    start = DetectorSettings(crop_px=64, centre_px=(12.0, 30.0), pixel_mask=configured).series_start(
        START, None, eiger_mask(), np.ones(SHAPE, np.float32))
    assert start.detector_crop == DetectorCrop(-20, -2, 64)  # leaves the detector: refused later, maps uncut
    assert start.pixel_mask is not None and start.pixel_mask.shape == SHAPE
    np.testing.assert_array_equal(start.pixel_mask, configured | eiger_mask())
    dark = DetectorSettings(crop_px=64).series_start(START, np.zeros(SHAPE, np.uint16))
    assert dark.detector_crop == crop_around((SHAPE[0] / 2, SHAPE[1] / 2), 64)
    wrong = DetectorSettings().series_start(START, None, np.zeros((512, 512), bool))
    assert wrong.pixel_mask is not None and wrong.pixel_mask.shape == (512, 512)  # passed on, refused by the daemon
    assert DetectorSettings().series_start(START, None).detector_crop is None


def test_maps_are_read_from_npy_and_dectris_master_files(tmp_path: Path) -> None:
    mask = (np.arange(12).reshape(3, 4) % 5 == 0).astype(np.uint32) * 4
    np.save(tmp_path / "mask.npy", mask)
    np.testing.assert_array_equal(read_detector_map(tmp_path / "mask.npy", "pixel_mask"), mask != 0)
    with h5py.File(tmp_path / "master.h5", "w") as f:
        f["/entry/instrument/detector/detectorSpecific/pixel_mask"] = mask
        f["/calibration/flat"] = np.full((3, 4), 1.25)
    np.testing.assert_array_equal(read_detector_map(tmp_path / "master.h5", "pixel_mask"), mask != 0)
    flat = read_detector_map(f"{tmp_path / 'master.h5'}::/calibration/flat", "flatfield")
    assert flat.dtype == np.float32 and flat[2, 3] == 1.25
    with pytest.raises(ValueError, match="flatfield file .*master.h5: holds no dataset"):
        read_detector_map(tmp_path / "master.h5", "flatfield")
    with pytest.raises(ValueError, match="pixel_mask file .*absent.npy"):
        read_detector_map(tmp_path / "absent.npy", "pixel_mask")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"expected a 2-D real array, got float64 \(2, 3, 4\)"):
        read_detector_map(tmp_path / "cube.npy", "flatfield")


def template(detector: DetectorSettings) -> SeriesTemplate:
    return SeriesTemplate(ScanGeometry(2, 3), Optics(300e3, 20.0, 0.0, 0.5), detector=detector)


def first_start(decoded: list) -> SeriesStart:
    starts = [message for message, _ in decoded if isinstance(message, SeriesStart)]
    assert len(starts) == 1
    return starts[0]


@pytest.mark.parametrize("applied", [False, True])
def test_simplon_v1_header_maps_reach_the_start(applied: bool) -> None:
    mask = eiger_mask()
    flat = np.full(SHAPE, 1.5, np.float32)
    config = {"x_pixels_in_detector": SHAPE[1], "y_pixels_in_detector": SHAPE[0],
              "flatfield_correction_applied": applied}
    image = disk_image()
    messages = [v1.header_message(3, "all", config, pixel_mask=mask.astype(np.uint32) * 2, flatfield=flat),
                v1.image_message(3, 0, image), v1.end_message(3)]
    decoder = DectrisV1Decoder(template(DetectorSettings(crop_px=64)))
    decoded = [o for m in messages for o in decoder.feed(m)]
    assert not [o for o in decoded if isinstance(o, ProtocolError)]
    start = first_start(decoded)
    assert start.detector_crop == crop_around(CENTRE, 64)
    assert start.pixel_mask is not None and start.pixel_mask.shape == (64, 64)
    assert (start.flatfield is None) == applied
    # the start as the workers get it
    assert decode(encode_series_start(start)) == start


def test_simplon_v1_map_of_the_wrong_size_is_counted() -> None:
    header = v1.header_message(3, "all", {"x_pixels_in_detector": 4, "y_pixels_in_detector": 4})
    header[5] = header[5][:-4]  # the pixel mask's blob, cut short
    outcomes = DectrisV1Decoder(template(DetectorSettings())).feed(header)
    assert [o.reason for o in outcomes if isinstance(o, ProtocolError)] == ["payload_size"]


@pytest.mark.parametrize("enabled", [False, True])
def test_stream_v2_start_maps_of_the_reconstructed_channel(enabled: bool) -> None:
    channels = ["threshold_1", "threshold_2"]
    masks = {"threshold_1": eiger_mask(), "threshold_2": np.zeros(SHAPE, bool)}
    flats = {"threshold_1": np.full(SHAPE, 1.25, np.float32), "threshold_2": np.full(SHAPE, 0.75, np.float32)}
    image = disk_image()
    messages = [v2.start_message(8, channels, SHAPE, 6, masks, flats, flatfield_enabled=enabled),
                v2.image_message(8, 0, {c: image for c in channels}), v2.end_message(8)]
    for channel in ("", "threshold_2"):
        decoder = DectrisV2Decoder(template(DetectorSettings(crop_px=64, centre_px=CENTRE)), channel)
        decoded = [o for m in messages for o in decoder.feed([m])]
        assert not [o for o in decoded if isinstance(o, ProtocolError)]
        start = first_start(decoded)
        truth = channel or "threshold_1"
        box = (slice(148, 212), slice(608, 672))
        assert start.detector_crop == DetectorCrop(148, 608, 64)
        np.testing.assert_array_equal(start.pixel_mask, masks[truth][box])
        if enabled:
            assert start.flatfield is None
        else:
            np.testing.assert_array_equal(start.flatfield, flats[truth][box])


def test_stream_v2_start_lacking_the_channel_map_is_counted() -> None:
    message = v2.start_message(8, ["a", "b"], (4, 4), 6, {"a": np.zeros((4, 4), bool)})
    outcomes = DectrisV2Decoder(template(DetectorSettings()), "b").feed([message])
    assert [o.reason for o in outcomes if isinstance(o, ProtocolError)] == ["missing_field"]
