"""Projected phase, block means, the tile mosaic and PNG encoding."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from ptylive.daemon.service.preview import Mosaic, block_mean, downsample_factor, projected_phase, slice_phases, to_png


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.mark.parametrize("shape, max_px, expected", [((100, 100), 100, 1), ((101, 50), 100, 2), ((50, 201), 100, 3),
                                                     ((512, 384), 128, 4), ((513, 10), 128, 5), ((1, 1), 1, 1),
                                                     ((7, 3), 1, 7)])
def test_downsample_factor_is_smallest_that_fits(shape: tuple[int, int], max_px: int, expected: int) -> None:
    factor = downsample_factor(shape, max_px)
    assert factor == expected
    assert all(-(-side // factor) <= max_px for side in shape)
    if factor > 1:
        assert any(-(-side // (factor - 1)) > max_px for side in shape)


@pytest.mark.parametrize("shape, max_px", [((0, 5), 4), ((5, 5), 0)])
def test_downsample_factor_rejects_non_positive(shape: tuple[int, int], max_px: int) -> None:
    with pytest.raises(ValueError, match="must"):
        downsample_factor(shape, max_px)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_projected_phase_sums_slice_phases(dtype: type) -> None:
    rows, cols = np.meshgrid(np.linspace(-1, 1, 6), np.linspace(-1, 1, 5), indexing="ij")
    phases = np.stack([0.3 * rows, 0.5 * cols, 0.2 * rows * cols])  # each within (-pi, pi)
    amplitude = np.array([0.9, 1.0, 0.8])[:, None, None]
    volume = (amplitude * np.exp(1j * phases)).astype(dtype)
    projected = projected_phase(volume)
    assert projected.shape == (6, 5) and projected.dtype == np.float32
    np.testing.assert_allclose(projected, phases.sum(axis=0), atol=1e-6)


def test_projected_phase_rejects_2d() -> None:
    with pytest.raises(ValueError, match=r"\(S, h, w\)"):
        projected_phase(np.ones((4, 4), np.complex64))


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_slice_phases_are_each_slice_block_averaged_and_sum_to_the_projection(factor: int) -> None:
    rng = np.random.default_rng(5)
    phases = rng.uniform(-1.0, 1.0, size=(3, 7, 8))
    volume = (0.9 * np.exp(1j * phases)).astype(np.complex64)
    slices = slice_phases(volume, factor)
    assert slices.shape == (3, -(-7 // factor), -(-8 // factor)) and slices.dtype == np.float32
    for layer, phase in zip(slices, phases, strict=True):
        np.testing.assert_allclose(layer, block_mean(phase, factor), atol=1e-6)
    np.testing.assert_allclose(slices.sum(axis=0), block_mean(projected_phase(volume), factor), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(S, h, w\)"):
        slice_phases(volume[0], factor)


def test_block_mean_averages_only_real_pixels_of_edge_blocks() -> None:
    image = np.arange(20, dtype=np.float64).reshape(4, 5)
    # [[ 0  1  2  3  4]
    #  [ 5  6  7  8  9]
    #  [10 11 12 13 14]
    #  [15 16 17 18 19]]
    expected = [[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
                [(10 + 11 + 15 + 16) / 4, (12 + 13 + 17 + 18) / 4, (14 + 19) / 2]]
    result = block_mean(image, 2)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)
    corner = block_mean(np.arange(25, dtype=np.float32).reshape(5, 5), 3)
    np.testing.assert_array_equal(corner, [[6.0, 8.5], [18.5, 21.0]])


def test_block_mean_factor_one_is_a_float32_copy() -> None:
    image = np.arange(6, dtype=np.int64).reshape(2, 3)
    result = block_mean(image, 1)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, image)
    result[0, 0] = 99
    assert image[0, 0] == 0


def test_block_mean_larger_than_image_is_one_pixel_mean() -> None:
    np.testing.assert_array_equal(block_mean(np.array([[1.0, 2.0], [3.0, 6.0]]), 8), [[3.0]])


def test_mosaic_places_tiles_in_their_coarse_pixels() -> None:
    mosaic = Mosaic((10, 12), 4)  # coarse (3, 3)
    assert mosaic.shape == (3, 3) and mosaic.version == 0
    assert np.isnan(mosaic.image).all()
    mosaic.place((0, 8, 4, 12), np.array([[1.0, 2.0], [3.0, 4.0]]))
    mosaic.place((8, 10, 0, 4), np.array([[5.0]]))  # partial bottom row: ceil(2/4) = 1
    expected = np.array([[np.nan, 1, 2], [np.nan, 3, 4], [5, np.nan, np.nan]], np.float32)
    image = mosaic.image
    assert image.dtype == np.float32 and mosaic.version == 2
    np.testing.assert_array_equal(image, expected)  # NaN positions must match too
    image[0, 0] = 7.0  # a copy: the mosaic is unchanged
    assert np.isnan(mosaic.image[0, 0])


def test_mosaic_unaligned_tile_is_floored_and_later_placement_wins() -> None:
    mosaic = Mosaic((8, 8), 4)
    mosaic.place((0, 8, 0, 5), np.full((2, 2), 1.0))  # covers coarse columns 0-1
    mosaic.place((0, 8, 5, 8), np.full((2, 1), 2.0))  # col0 = 5 lands at floor(5/4) = 1
    np.testing.assert_array_equal(mosaic.image, [[1.0, 2.0], [1.0, 2.0]])


def test_mosaic_rejects_wrong_preview_shape_naming_both() -> None:
    mosaic = Mosaic((10, 12), 4)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 2\)"):
        mosaic.place((0, 8, 4, 12), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="outside"):
        mosaic.place((0, 11, 0, 4), np.zeros((3, 1)))
    assert mosaic.version == 0


def test_to_png_is_grayscale_of_the_right_size_with_nan_black() -> None:
    image = np.linspace(0.0, 1.0, 6 * 4).reshape(6, 4)
    image[0, 0] = np.nan
    decoded = decode(to_png(image))
    assert decoded.mode == "L" and decoded.size == (4, 6)  # PIL size is (width, height)
    pixels = np.asarray(decoded)
    assert pixels[0, 0] == 0
    assert pixels[-1, -1] == 255 and pixels[0, 1] == 0  # clipped at the 99th / 1st percentile
    assert np.all(np.diff(pixels.ravel()[1:].astype(int)) >= 0)  # monotone ramp


def test_to_png_uses_given_range_and_clips() -> None:
    pixels = np.asarray(decode(to_png(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]]), low_high=(0.0, 1.0))))
    np.testing.assert_array_equal(pixels, [[0, 0, 128, 255, 255]])
    with pytest.raises(ValueError, match="low <= high"):
        to_png(np.zeros((2, 2)), low_high=(1.0, 0.0))


@pytest.mark.parametrize("image, expected", [(np.full((3, 5), 2.5), 128), (np.full((3, 5), np.nan), 0)])
def test_to_png_constant_or_empty_image_has_no_division(image: np.ndarray, expected: int) -> None:
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        png = to_png(image)
    pixels = np.asarray(decode(png))
    assert pixels.shape == (3, 5)
    assert (pixels == expected).all()


def test_to_png_constant_with_nan_is_grey_and_black() -> None:
    image = np.full((2, 2), -3.0)
    image[1, 1] = np.nan
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        pixels = np.asarray(decode(to_png(image)))
    np.testing.assert_array_equal(pixels, [[128, 128], [128, 0]])
