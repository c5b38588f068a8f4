"""Live virtual images through ``ptylive serve`` (2 workers + rank 0, loopback): ``/virtual.json`` fills while
frames arrive, the PUB carries them, and the final file's ``virtual/`` group holds the values the workers computed
from the frames (checked against the scan file's own frames), NaN only where a frame never came; ``/diffraction.png``
is the mean of the frames that came (log scale) and ``/probe.png`` worker 0's probe."""

from __future__ import annotations

import dataclasses
import io
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import ScanSource
from ptylive.streaming.virtual_images import default_detector, frame_values
from tests.daemon.serve_harness import PreviewListener, get_json, stream

pytestmark = pytest.mark.mpi

SCAN_SHAPE = (20, 16)  # ptylive simulate's raster (row-major); the scan file itself says (1, 320)
LOST = tuple(range(40, 48))  # half of row 2: never sent


def raster_source(path: Path) -> ScanSource:
    source = ScanSource.from_file(path)
    return dataclasses.replace(source, start=dataclasses.replace(source.start, scan_shape=SCAN_SHAPE))


def test_virtual_images_fill_while_frames_arrive_and_reach_the_final_file(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    process, listener = daemon
    url = process.endpoints["http"]
    source = raster_source(dosed_scan)
    series_id = "virtual-e2e"
    filled: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream, process, source, series_id=series_id, rate_hz=100.0, dtype="uint16",
                              drop_frames=LOST)
        while not sending.done():
            index = get_json(url + "virtual.json")
            if index["series_id"] == series_id and index["frames_filled"] not in filled:
                filled.append(index["frames_filled"])
            time.sleep(0.1)
        _, stats = sending.result()
    final = listener.wait_final(series_id)
    n_sent = source.n_frames - len(LOST)
    assert stats.frames_sent == n_sent
    partial = [n for n in filled if 0 < n < n_sent]
    assert len(partial) >= 2, f"virtual.json did not fill while frames arrived: {filled}"

    index = get_json(url + "virtual.json")
    assert index["series_id"] == series_id and index["scan_shape"] == list(SCAN_SHAPE)
    assert index["frames_filled"] == n_sent and index["frames_expected"] == source.n_frames
    assert [image["kind"] for image in index["images"]] == ["bf", "adf0", "com_x", "com_y", "idpc"]
    with urllib.request.urlopen(url + "virtual.png?kind=bf", timeout=5) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert np.asarray(Image.open(io.BytesIO(response.read()))).shape == SCAN_SHAPE

    published = listener.log.virtuals(series_id)
    assert published and published[-1]["frames_filled"] == n_sent  # the last one before the final
    assert any(h["frames_filled"] < n_sent for h in published)
    assert published[-1]["images_by_kind"]["bf"].shape == SCAN_SHAPE

    arrived = np.setdiff1d(np.arange(source.n_frames), LOST)
    with h5py.File(final["path"], "r") as f:
        bf = f["virtual/bf"][...].reshape(-1)
        com_x = f["virtual/com_x"][...].reshape(-1)
        group_attrs = dict(f["virtual"].attrs)
        received = f["received"][...]
    assert np.isfinite(bf[arrived]).all() and np.isnan(bf[list(LOST)]).all()
    assert received[arrived].all() and not received[list(LOST)].any()
    assert group_attrs["frames_filled"] == n_sent
    start = source.start
    assert group_attrs["convergence_semiangle_mrad"] == start.convergence_semiangle_mrad
    assert group_attrs["detector_pixel_mrad"] == pytest.approx(start.detector_pixel_mrad, rel=1e-9)

    sample = arrived[::37]
    detector = default_detector(start.convergence_semiangle_mrad, start.detector_pixel_mrad, start.detector_shape[0])
    expected = frame_values(source.read(sample), detector)
    np.testing.assert_allclose(bf[sample], expected["bf"], rtol=1e-5)
    np.testing.assert_allclose(com_x[sample], expected["com_x"], rtol=1e-4, atol=1e-6)

    served = get_png(url + "diffraction.png")
    mean = source.read(arrived).mean(axis=0)
    shown = np.log1p(mean)
    expected = np.rint((shown - shown.min()) / np.ptp(shown) * 255)
    assert served.shape == start.detector_shape
    assert np.abs(served.astype(int) - expected).max() <= 1  # the workers' sums, summed: every frame's mean
    probe = get_png(url + "probe.png")
    assert probe.shape == (48, 48) and probe.max() == 255  # ptylive simulate's 48-px window
    assert probe[24, 24] > probe[0, 0]


def get_png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"] == "image/png"
        return np.asarray(Image.open(io.BytesIO(response.read())))
