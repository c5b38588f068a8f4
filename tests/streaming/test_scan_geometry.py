"""Image number → scan position for detectors that send only an image number; the ``[scan]`` config section."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ptylive.daemon.service.config import ConfigError, DaemonConfig, IngestConfig, ScanConfig, config_from_mapping
from ptylive.streaming.router import raster_positions_A
from ptylive.streaming.scan_geometry import SKIP, ScanGeometry, template_from_settings


def test_plain_raster_is_the_identity() -> None:
    scan = ScanGeometry(3, 4)
    np.testing.assert_array_equal(scan.position_indices(np.arange(12)), np.arange(12))


def test_snake_and_flyback_at_the_end() -> None:
    scan = ScanGeometry(3, 4, snake=True, flyback_frames=2)
    expected = [0, 1, 2, 3, SKIP, SKIP, 7, 6, 5, 4, SKIP, SKIP, 8, 9, 10, 11, SKIP, SKIP]
    np.testing.assert_array_equal(scan.position_indices(np.arange(18)), expected)
    assert scan.n_images == 18 and scan.n_positions == 12


def test_flyback_at_the_start_of_each_line() -> None:
    scan = ScanGeometry(2, 3, flyback_frames=1, flyback_at="start")
    np.testing.assert_array_equal(scan.position_indices(np.arange(8)), [SKIP, 0, 1, 2, SKIP, 3, 4, 5])


def test_images_past_the_scan_get_indices_past_the_last_position() -> None:
    scan = ScanGeometry(2, 2, flyback_frames=1)
    assert scan.position_index(6) == 4 and scan.position_index(9) == 7


@pytest.mark.parametrize("snake", [False, True])
@pytest.mark.parametrize("flyback_at", ["end", "start"])
def test_image_numbers_invert_the_mapping(snake: bool, flyback_at: str) -> None:
    scan = ScanGeometry(5, 7, snake=snake, flyback_frames=3, flyback_at=flyback_at)  # type: ignore[arg-type]
    images = scan.image_numbers()
    np.testing.assert_array_equal(scan.position_indices(images), np.arange(scan.n_positions))
    assert len(set(images.tolist())) == scan.n_positions


def test_bad_geometry_is_refused() -> None:
    for kwargs in ({"rows": 0, "cols": 3}, {"rows": 2, "cols": 2, "flyback_frames": -1},
                   {"rows": 2, "cols": 2, "step_A": (0.0, 1.0)}, {"rows": 2, "cols": 2, "flyback_at": "middle"}):
        with pytest.raises(ValueError):
            ScanGeometry(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 0"):
        ScanGeometry(2, 2).position_indices([-1])


def test_template_builds_the_series_start_from_the_scan_section() -> None:
    section = ScanConfig(rows=4, cols=5, step_row_A=0.5, step_col_A=0.25, rotation_deg=90.0, snake=True,
                         energy_eV=200e3, convergence_semiangle_mrad=25.0, defocus_A=-50.0, detector_pixel_mrad=2.0)
    start = template_from_settings(section).start("7", (32, 32), "uint16")
    assert start.scan_shape == (4, 5) and start.scan_step_A == (0.5, 0.25) and start.scan_rotation_deg == 90.0
    assert (start.energy_eV, start.defocus_A, start.detector_pixel_mrad) == (200e3, -50.0, 2.0)
    assert raster_positions_A(start).shape == (20, 2)


def test_dectris_formats_take_the_scan_raster_per_series() -> None:
    """No raster in [scan] is no longer refused at load: each series' scan comes from the detector's count, a
    request or a hook (tests/streaming/test_scan_plan.py); a hook is refused for ptylive stream v1."""
    assert DaemonConfig(ingest=IngestConfig(format="dectris_v1")).scan.rows == 0
    with pytest.raises(ConfigError, match="scan.hook"):
        config_from_mapping({"scan": {"hook": "acquisition.hooks:scan"}})
    with pytest.raises(ConfigError, match="scan.hook"):
        config_from_mapping({"ingest": {"format": "dectris_v1"}, "scan": {"hook": "a b"}})
    with pytest.raises(ConfigError, match="scan.on_count_mismatch"):
        config_from_mapping({"scan": {"on_count_mismatch": "guess"}})
    assert config_from_mapping({"ingest": {"format": "dectris_v1"},
                                "scan": {"cols": 16, "hook": "acquisition.hooks:scan"}}).scan.rows == 0
    config = config_from_mapping({"ingest": {"format": "dectris_v2", "channel": "threshold_1"},
                                  "scan": {"rows": 3, "cols": 4, "snake": True, "flyback_frames": 2}})
    assert config.scan.rows == 3 and config.ingest.channel == "threshold_1"
    with pytest.raises(ConfigError, match="scan.flyback_at"):
        config_from_mapping({"scan": {"flyback_at": "middle"}})
    with pytest.raises(ConfigError, match="ingest.format"):
        config_from_mapping({"ingest": {"format": "eiger"}})
    assert dataclasses.replace(config, ingest=IngestConfig()).ingest.format == "ptylive"
