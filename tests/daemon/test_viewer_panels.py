"""The viewer's colour bar, per-tile loss curves and virtual-image panel in headless Chromium.

The virtual images come from a stub of ``GET /virtual.json`` and ``/virtual.png`` (docs/daemon.md, "Virtual
images"), so the test knows every value the panel must show: a loopback proxy in front of the scripted daemon
answers them (:func:`~tests.daemon.browser_harness.start_proxy`) and forwards everything else. The real daemon's
routes behind the same panel: ``tests/daemon/test_viewer_live.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.http.server import StatusServer
from ptylive.daemon.service.preview import to_png
from tests.daemon.browser_harness import PageLog, pixel_checksum, start_proxy
from tests.daemon.test_viewer_page import TILES, TIMEOUT_MS, ScriptedDaemon, mosaic_png

pytestmark = pytest.mark.browser

SCAN_SHAPE = (12, 16)


@dataclass
class CurveDaemon(ScriptedDaemon):
    """A scripted daemon whose /tiles and preview events carry loss curves and the mosaic's display range."""

    phase_range_rad: list[float] = field(default_factory=lambda: [-0.25, 1.5])
    loss_curves: list[dict[str, Any]] = field(default_factory=list)

    def tile_table(self) -> dict[str, Any]:
        return {**super().tile_table(), "pixel_size_A": 0.5, "loss_curves": self.loss_curves,
                "phase_range_rad": self.phase_range_rad, "slice_ranges_rad": []}

    def publish_preview(self, version: int) -> None:
        self.hub.publish("preview", {"series_id": self.series_id, "iteration": max(t["iteration"] for t in self.tiles),
                                     "tiles": self.tiles, "frames_received": 122, "frames_expected": 160,
                                     "coverage": 0.76, "shape": [60, 80], "factor": 2, "published_s": time.time(),
                                     "version": version, "object_shape": [120, 160], "n_slices": 1,
                                     "phase_range_rad": self.phase_range_rad})


@dataclass
class VirtualStub:
    """``/virtual.json`` and ``/virtual.png`` as docs/daemon.md plans them; frames "arrive" with :meth:`fill`."""

    series_id: str
    frames_filled: int = 0
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def images(self) -> list[dict[str, Any]]:
        if not self.frames_filled:
            return []
        return [{"kind": "bf", "label": "BF", "units": "counts", "shape": list(SCAN_SHAPE), "inner_mrad": 0.0,
                 "outer_mrad": 20.0, "finite_min": 10.0 * self.frames_filled, "finite_max": 900.0},
                {"kind": "adf0", "label": "ADF 40-80 mrad", "units": "counts", "shape": list(SCAN_SHAPE),
                 "inner_mrad": 40.0, "outer_mrad": 80.0, "finite_min": 1.0, "finite_max": 7.0},
                {"kind": "com_x", "label": "CoM x", "units": "mrad", "shape": list(SCAN_SHAPE), "inner_mrad": None,
                 "outer_mrad": None, "finite_min": -0.5, "finite_max": 0.5}]

    def fill(self, frames: int) -> None:
        with self.lock:
            self.frames_filled = frames

    def image(self, kind: str) -> bytes:
        """The scan-shaped image: NaN where no frame has arrived yet (raster order), a pattern per kind."""
        values = np.full(SCAN_SHAPE[0] * SCAN_SHAPE[1], np.nan)
        seed = {"bf": 1, "adf0": 2, "com_x": 3}[kind]
        values[:self.frames_filled] = np.random.default_rng(seed).random(self.frames_filled)
        return to_png(values.reshape(SCAN_SHAPE))

    def answer(self, path: str) -> tuple[int, str, bytes] | None:
        with self.lock:
            if path.startswith("/virtual.json"):
                self.requests.append(path)
                return 200, "application/json", json.dumps({
                    "series_id": self.series_id, "scan_shape": list(SCAN_SHAPE), "frames_filled": self.frames_filled,
                    "frames_expected": SCAN_SHAPE[0] * SCAN_SHAPE[1], "images": self.images()}).encode()
            if path.startswith("/virtual.png"):
                self.requests.append(path)
                kind = path.partition("kind=")[2].partition("&")[0]
                if not self.frames_filled or kind not in ("bf", "adf0", "com_x"):
                    return 404, "application/json", b'{"error": "no such virtual image"}'
                return 200, "image/png", self.image(kind)
        return None


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, PageLog]]:
    log = PageLog()
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    yield log.attach(context.new_page()), log
    context.close()


def loss_points(view: Any) -> dict[str, int]:
    return dict(json.loads(view.get_attribute("#loss-plot", "data-points") or "{}"))


def test_colour_bar_and_loss_curves_follow_the_previews(page: tuple[Any, PageLog]) -> None:
    view, log = page
    tiles = [dict(t) for t in TILES[:2]]
    daemon = CurveDaemon(series_id="curves", tiles=tiles, png=mosaic_png(8),
                         loss_curves=[{"worker": 0, "iteration": [1, 2, 3], "loss_per_frame": [0.9, 0.5, 0.2]},
                                      {"worker": 1, "iteration": [2, 3], "loss_per_frame": [0.7, 0.4]}])
    with StatusServer(daemon.providers()) as server:
        view.goto(server.url)
        view.wait_for_selector('#mosaic[data-src*="curves.0"]', timeout=TIMEOUT_MS)
        view.wait_for_selector("#colour-bar:not([hidden])", timeout=TIMEOUT_MS)
        assert view.text_content("#colour-bar .low") == "-0.250 rad"
        assert view.text_content("#colour-bar .high") == "1.50 rad"
        view.wait_for_function("JSON.parse(document.getElementById('loss-plot').dataset.points || '{}')[1] === 2",
                               timeout=TIMEOUT_MS)
        assert loss_points(view) == {"0": 3, "1": 2}  # /tiles' curves (the tiles' own iteration 4 adds none yet)
        # the daemon serves no virtual images here (404): the panel says so and stops asking
        view.wait_for_function("document.getElementById('virtual-text').textContent.includes('serves no virtual')",
                               timeout=TIMEOUT_MS)

        for version, loss in ((1, 0.1), (2, 0.05)):
            for tile in tiles:
                tile.update(iteration=tile["iteration"] + 1, loss_per_frame=loss)
            daemon.phase_range_rad = [-0.5, 2.0 + version]
            daemon.publish_preview(version)
            view.wait_for_selector(f'#mosaic[data-src*="curves.{version}"]', timeout=TIMEOUT_MS)
        view.wait_for_function("document.getElementById('colour-bar').dataset.high === '4'", timeout=TIMEOUT_MS)
        assert view.text_content("#colour-bar .low") == "-0.500 rad"
        view.wait_for_function("JSON.parse(document.getElementById('loss-plot').dataset.points)[0] === 5",
                               timeout=TIMEOUT_MS)
        assert loss_points(view) == {"0": 5, "1": 4}  # iterations 5 and 6 joined each curve
        legend = view.text_content("#loss-legend")
        assert "tile 0: 0.05" in str(legend) and "tile 1: 0.05" in str(legend)
        assert "iterations 1\u20136" in str(view.text_content("#loss-text"))
    daemon.hub.close()
    assert log.errors == []


def test_the_virtual_image_changes_while_frames_arrive(page: tuple[Any, PageLog]) -> None:
    view, log = page
    daemon = CurveDaemon(series_id="virtual", tiles=TILES, png=mosaic_png(9))
    stub = VirtualStub("virtual")
    with StatusServer(daemon.providers()) as server:
        proxy = start_proxy(server.port, answer=stub.answer)
        try:
            view.goto(f"http://127.0.0.1:{proxy.server_address[1]}/")
            view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)
            view.wait_for_function("document.getElementById('virtual-text').textContent.includes('first frame')",
                                   timeout=TIMEOUT_MS)  # no images before the first frame
            seen = []
            for version, frames in enumerate((20, 90, 192), start=1):
                stub.fill(frames)
                daemon.publish_preview(version)
                view.wait_for_selector(f'#virtual[data-src*="virtual.{frames}"]', timeout=TIMEOUT_MS)
                seen.append(pixel_checksum(view, "virtual"))
                assert view.text_content("#virtual-colour .low") == f"{10.0 * frames:g} counts"
            assert len({checksum for _, checksum in seen}) == 3  # the image changed with each batch of frames
            assert [url for url, _ in seen] == [f"virtual.png?kind=bf&v=virtual.{n}" for n in (20, 90, 192)]
            kinds = view.eval_on_selector_all("#virtual-kind option", "options => options.map(o => o.value)")
            assert kinds == ["bf", "adf0", "com_x"]

            view.select_option("#virtual-kind", "com_x")
            view.wait_for_selector('#virtual[data-src*="kind=com_x"]', timeout=TIMEOUT_MS)
            assert view.text_content("#virtual-colour .high") == "0.500 mrad"
            assert pixel_checksum(view, "virtual") != seen[-1]
            stub.fill(150)  # the next preview: the chosen kind is refreshed, not the first one
            daemon.publish_preview(4)
            view.wait_for_selector('#virtual[data-src*="kind=com_x&v=virtual.150"]', timeout=TIMEOUT_MS)
        finally:
            daemon.hub.close()
            proxy.shutdown()
            proxy.server_close()
    assert all(not path.startswith("//") for path in stub.requests)
    assert log.errors == [] and log.off_loopback() == []
