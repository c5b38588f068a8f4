"""Rank 0's virtual-image mosaic."""

from __future__ import annotations

import numpy as np
import pytest

from ptylive.daemon.service.virtual_mosaic import VirtualMosaic


def test_values_land_in_raster_order_and_the_rest_stays_nan() -> None:
    mosaic = VirtualMosaic("s1", (3, 4))
    dropped = mosaic.add(np.array([0, 5, 11, 12, -1]),
                         {"bf": np.array([1.0, 2.0, 3.0, 9.0, 9.0])})
    assert dropped == 2 and mosaic.frames_filled == 3
    bf = mosaic.images()["bf"]
    assert bf.shape == (3, 4)
    assert bf[0, 0] == 1.0 and bf[1, 1] == 2.0 and bf[2, 3] == 3.0
    assert np.isnan(bf).sum() == 12 - 3
    assert "idpc" not in mosaic.images()


def test_idpc_appears_with_com_and_mismatched_values_are_refused() -> None:
    mosaic = VirtualMosaic("s1", (4, 4))
    com_x = np.tile(np.cos(2 * np.pi * np.arange(4) / 4), 4)  # below Nyquist: integrable
    mosaic.add(np.arange(16), {"com_x": com_x, "com_y": np.zeros(16)})
    idpc = mosaic.images()["idpc"]
    assert idpc.shape == (4, 4) and np.isfinite(idpc).all()
    assert abs(idpc.mean()) < 1e-12 and np.ptp(idpc) > 0
    with pytest.raises(ValueError, match="values for"):
        mosaic.add(np.arange(2), {"bf": np.zeros(3)})
