"""Crop, bin, mask and flatfield of raw detector frames (streaming/detector_frames.py) against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.streaming.detector_frames import (
    DetectorCrop,
    DetectorPreprocessing,
    bright_field_centre_px,
    crop_around,
)

SHAPE = (514, 1030)  # EIGER2 500K


def disk_frame(centre: tuple[float, float], radius_px: float, shape: tuple[int, int] = SHAPE, counts: float = 200.0,
               seed: int = 0) -> np.ndarray:
    """Poisson counts of a uniform disk on a weak background (one hot pixel far away)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius_px ** 2
    frame = np.random.default_rng(seed).poisson(np.where(inside, counts, 0.5)).astype(np.uint16)
    frame[3, 3] = 60000
    return frame


def test_crop_and_bin_arithmetic_match_a_hand_sum() -> None:
    raw = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
    pre = DetectorPreprocessing.build((6, 8), DetectorCrop(1, 2, 4, bin_factor=2))
    out = pre.apply(raw)
    box = raw[1:5, 2:6].astype(np.float64)
    expected = np.array([[box[:2, :2].sum(), box[:2, 2:].sum()], [box[2:, :2].sum(), box[2:, 2:].sum()]])
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, expected)
    assert pre.output_px == 2 and pre.pixel_mrad(0.75) == 1.5 and pre.output_mask is None
    stacked = pre.apply(np.stack([raw, 2 * raw]))
    assert stacked.shape == (2, 2, 2)
    np.testing.assert_array_equal(stacked[1], 2 * expected)


def test_crop_around_puts_the_centre_on_the_output_zero_frequency() -> None:
    # bin 1: the centre's pixel becomes (D//2, D//2)
    assert crop_around((300.0, 700.0), 64) == DetectorCrop(268, 668, 64)
    # bin 2, D = 32: output pixel 16 covers box pixels 32 and 33 (centre 32.5)
    crop = crop_around((300.5, 700.5), 64, 2)
    assert crop == DetectorCrop(268, 668, 64, 2)
    centre_of_zero = np.array([crop.row0_px, crop.col0_px]) + (crop.output_px // 2) * 2 + 0.5
    np.testing.assert_array_equal(centre_of_zero, [300.5, 700.5])
    # halves round up on every platform
    assert crop_around((10.5, 10.5), 4).row0_px == 9


@pytest.mark.parametrize("centre", [(200.3, 611.7), (257.0, 514.5), (140.8, 380.2)])
def test_auto_centre_finds_a_shifted_disk_through_a_masked_gap(centre: tuple[float, float]) -> None:
    frame = disk_frame(centre, 24.0)
    mask = np.zeros(SHAPE, bool)
    mask[255:259, :] = True  # the EIGER chip gap, crossing or near the disk
    mask[:, 514:518] = True
    mask[3, 3] = True  # the hot pixel
    frame[mask] = 0
    found = bright_field_centre_px(frame, mask)
    assert abs(found[0] - centre[0]) <= 0.5 and abs(found[1] - centre[1]) <= 0.5, (found, centre)
    # the mean of several frames, too
    frames = np.stack([disk_frame(centre, 24.0, seed=s) for s in range(3)])
    frames[:, mask] = 0
    found = bright_field_centre_px(frames, mask)
    assert abs(found[0] - centre[0]) <= 0.5 and abs(found[1] - centre[1]) <= 0.5, (found, centre)


def test_a_gap_off_the_centre_would_pull_the_plain_centre_of_mass_away() -> None:
    """The mirror filling is what keeps the centre: without the mask the gap's zeros bias it."""
    centre = (220.0, 600.0)
    frame = disk_frame(centre, 24.0)
    mask = np.zeros(SHAPE, bool)
    mask[228:236, :] = True  # 8 rows 8–15 px below the centre, inside the disk
    frame[mask] = 0
    unmasked = bright_field_centre_px(frame)
    masked = bright_field_centre_px(frame, mask)
    assert unmasked[0] < centre[0] - 1.0  # the plain centre of mass of what is left moves up by > 1 px
    assert abs(masked[0] - centre[0]) <= 0.5


def test_dark_frame_and_all_masked_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="dark"):
        bright_field_centre_px(np.zeros(SHAPE, np.uint16))
    with pytest.raises(ValueError, match="every pixel is masked"):
        bright_field_centre_px(np.ones((4, 4)), np.ones((4, 4), bool))


def test_a_binned_pixel_is_masked_when_any_source_pixel_is() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1, 2] = True  # box (0, 0)–(8, 8), bin 2: output pixel (0, 1)
    mask[7, 7] = True  # output pixel (3, 3)
    raw = np.ones((8, 8), np.uint16)
    pre = DetectorPreprocessing.build((8, 8), DetectorCrop(0, 0, 8, bin_factor=2), pixel_mask=mask)
    expected = np.zeros((4, 4), bool)
    expected[0, 1] = expected[3, 3] = True
    assert pre.output_mask is not None
    np.testing.assert_array_equal(pre.output_mask, expected)
    out = pre.apply(raw)
    assert out[0, 1] == 0 and out[3, 3] == 0 and out[0, 0] == 4  # a masked bin holds 0, not a partial sum


def test_flatfield_multiplies_and_bad_flatfield_pixels_are_masked() -> None:
    flat = np.full((6, 6), 1.5, np.float32)
    flat[2, 3] = 0.0
    flat[4, 4] = np.nan
    raw = np.full((6, 6), 10, np.uint32)
    pre = DetectorPreprocessing.build((6, 6), pixel_mask=None, flatfield=flat)
    out = pre.apply(raw)
    assert out[0, 0] == pytest.approx(15.0) and out[2, 3] == 0 and out[4, 4] == 0
    assert pre.output_mask is not None and set(zip(*np.nonzero(pre.output_mask), strict=True)) == {(2, 3), (4, 4)}
    assert not np.isnan(out).any()


def test_maps_of_the_whole_detector_or_of_the_box_are_cut_alike() -> None:
    rng = np.random.default_rng(1)
    flat = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
    mask = rng.random(SHAPE) < 0.01
    crop = DetectorCrop(100, 300, 128, bin_factor=4)
    whole = DetectorPreprocessing.build(SHAPE, crop, mask, flat)
    box = (slice(100, 228), slice(300, 428))
    cut = DetectorPreprocessing.build(SHAPE, crop, mask[box], flat[box])
    raw = rng.poisson(50, SHAPE).astype(np.uint16)
    np.testing.assert_array_equal(whole.apply(raw), cut.apply(raw))
    np.testing.assert_array_equal(whole.output_mask, cut.output_mask)
    expected = (raw[box] * flat[box]).reshape(32, 4, 32, 4).sum(axis=(1, 3))
    expected[mask[box].reshape(32, 4, 32, 4).any(axis=(1, 3))] = 0
    np.testing.assert_allclose(whole.apply(raw), expected, rtol=1e-5)
    assert 0 < whole.output_mask.sum() < 32 * 32


def test_square_detector_without_anything_is_the_identity() -> None:
    pre = DetectorPreprocessing.build((48, 48))
    assert pre.identity and pre.output_px == 48
    raw = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48)
    np.testing.assert_array_equal(pre.apply(raw), raw)
    assert not DetectorPreprocessing.build((48, 48), DetectorCrop(0, 0, 48, 2)).identity


@pytest.mark.parametrize("shape, crop, message", [
    (SHAPE, None, "514×1030 is not square"),
    (SHAPE, DetectorCrop(0, 0, 600), "crop of 600 px is larger than the 514×1030 detector"),
    (SHAPE, DetectorCrop(0, 0, 100, 3), "bin 3 does not divide the crop of 100 px"),
    (SHAPE, DetectorCrop(480, 0, 64), r"crop of 64 px at \(480, 0\) leaves the 514×1030 detector"),
    (SHAPE, DetectorCrop(-1, 0, 64), "leaves the"),
    (SHAPE, DetectorCrop(0, 0, 0), "crop must be >= 1 px"),
])
def test_impossible_crops_are_clear_value_errors(shape: tuple[int, int], crop: DetectorCrop | None,
                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetectorPreprocessing.build(shape, crop)
    if crop is not None and crop.size_px % crop.bin_factor:
        with pytest.raises(ValueError, match=message):
            crop_around((257.0, 515.0), crop.size_px, crop.bin_factor)


def test_maps_of_another_shape_are_refused_by_name() -> None:
    crop = DetectorCrop(0, 0, 64)
    with pytest.raises(ValueError, match=r"pixel mask is 512×512; expected the detector's 514×1030 \(or the crop's "
                                         r"64×64\)"):
        DetectorPreprocessing.build(SHAPE, crop, pixel_mask=np.zeros((512, 512), bool))
    with pytest.raises(ValueError, match="flatfield is 1×1"):
        DetectorPreprocessing.build(SHAPE, crop, flatfield=np.ones((1, 1)))
    with pytest.raises(ValueError, match=r"frame of \(512, 512\) px"):
        DetectorPreprocessing.build(SHAPE, crop).apply(np.zeros((512, 512)))
