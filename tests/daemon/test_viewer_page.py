"""The viewer page in headless Chromium against a scripted daemon (no MPI): what the operator sees with
no series, while events arrive, across a daemon restart, and on a phone-sized screen."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptylive.daemon.http.server import Providers, StatusServer
from ptylive.daemon.http.sse import EventHub
from ptylive.daemon.service.preview import to_png
from tests.daemon.browser_harness import PageLog, overlay_counts, pixel_checksum, save_screenshot

pytestmark = pytest.mark.browser

TIMEOUT_MS = 10_000
OBJECT_SHAPE = [120, 160]
TILES = [{"worker": 0, "tile": [0, 60, 0, 80], "iteration": 4, "frames_used": 30, "frames_received": 30,
          "frames_expected": 40, "loss": 3.0, "loss_per_frame": 0.1, "convergence_rate": 0.02, "wait_fraction": 0.1},
         {"worker": 1, "tile": [0, 60, 80, 160], "iteration": 4, "frames_used": 40, "frames_received": 40,
          "frames_expected": 40, "loss": 4.0, "loss_per_frame": 0.1, "convergence_rate": 0.01, "wait_fraction": 0.1},
         {"worker": 2, "tile": [60, 120, 0, 80], "iteration": 4, "frames_used": 12, "frames_received": 12,
          "frames_expected": 40, "loss": 1.2, "loss_per_frame": 0.1, "convergence_rate": 0.03, "wait_fraction": 0.2},
         {"worker": 3, "tile": [60, 120, 80, 160], "iteration": 4, "frames_used": 40, "frames_received": 40,
          "frames_expected": 40, "loss": 36.0, "loss_per_frame": 0.9, "convergence_rate": -0.2,
          "wait_fraction": 0.1}]


@dataclass
class ScriptedDaemon:
    """What the providers answer; a test changes it between steps."""

    series_id: str | None = None
    finished: list[dict[str, Any]] = field(default_factory=list)
    tiles: list[dict[str, Any]] = field(default_factory=list)
    png: bytes | None = None
    hub: EventHub = field(default_factory=EventHub)

    def status(self) -> dict[str, Any]:
        received = sum(t["frames_received"] for t in self.tiles)
        current = None if self.series_id is None else {
            "series_id": self.series_id, "received": received, "n_expected": 160, "missing": 0, "refusal": None}
        return {"series_id": self.series_id, "iteration": 4 if self.series_id else None, "finished": self.finished,
                "workers_up": [0, 1, 2, 3], "heartbeat_age_s": {}, "worker_errors": [],
                "ingest": {"registry": {"current": current, "queued": [], "finished": []}}, "coverage": None}

    def providers(self) -> Providers:
        return Providers(status=self.status, tiles=self.tile_table, preview_png=lambda: self.png, events=self.hub)

    def tile_table(self) -> dict[str, Any]:
        return {"series_id": self.series_id, "object_shape": OBJECT_SHAPE, "n_slices": 1, "tiles": self.tiles}

    def publish_preview(self, version: int) -> None:
        self.hub.publish("preview", {"series_id": self.series_id, "iteration": 4, "tiles": self.tiles,
                                     "frames_received": sum(t["frames_received"] for t in self.tiles),
                                     "frames_expected": 160, "coverage": 0.76,
                                     "shape": [60, 80], "factor": 2, "published_s": time.time(),
                                     "version": version, "object_shape": OBJECT_SHAPE, "n_slices": 1})


def mosaic_png(seed: int) -> bytes:
    return to_png(np.random.default_rng(seed).normal(size=(60, 80)))


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, PageLog]]:
    log = PageLog()
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    yield log.attach(context.new_page()), log
    context.close()


def test_without_a_series_the_page_says_it_waits(page: tuple[Any, PageLog]) -> None:
    view, log = page
    daemon = ScriptedDaemon()
    with StatusServer(daemon.providers()) as server:
        view.goto(server.url)
        view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)
        view.wait_for_function("document.getElementById('no-preview').textContent.includes('no preview yet')",
                               timeout=TIMEOUT_MS)
        assert view.is_hidden("#mosaic-frame")
        assert view.text_content("#progress-text") == "waiting for a series"
        assert view.text_content("#series") == "no series yet"
        assert view.text_content("#attention") == "nothing to report"
        assert view.text_content("#finished") == "none yet"
    assert log.errors == []
    assert log.off_loopback() == [] and any(url.endswith("/events") for url in log.requests)


def test_events_drive_the_page_and_it_recovers_after_a_restart(page: tuple[Any, PageLog]) -> None:
    view, log = page
    log.allowed += ("ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE", "ERR_CONNECTION_RESET")  # the daemon is away
    before = ScriptedDaemon(series_id="before", tiles=TILES, png=mosaic_png(1))
    with StatusServer(before.providers()) as server:
        port = server.port
        view.goto(server.url)
        view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)
        before.publish_preview(version=1)
        view.wait_for_selector('#mosaic[data-src*="before.1"]', timeout=TIMEOUT_MS)
        first = pixel_checksum(view)
        assert overlay_counts(view) == {t["worker"]: (t["frames_received"], t["frames_expected"]) for t in TILES}
        assert view.get_attribute('#overlay .tile[data-worker="3"]', "class") == "tile warn"  # loss rising, high
        before.png = mosaic_png(2)
        before.publish_preview(version=2)
        view.wait_for_selector('#mosaic[data-src*="before.2"]', timeout=TIMEOUT_MS)
        assert pixel_checksum(view) != first
    before.hub.close()
    view.wait_for_selector('#connection[data-state="reconnecting"]', timeout=TIMEOUT_MS)

    after = ScriptedDaemon(series_id="after-restart", tiles=TILES[:2], png=mosaic_png(3),
                           finished=[{"series_id": "before", "path": "/x/before.h5", "file": "before.h5",
                                      "status": "complete", "iterations": 31},
                                     {"series_id": "spilled", "path": "/spare/spilled.h5", "file": None,
                                      "status": "complete", "iterations": 30, "fallback": True,
                                      "error": "No space left on device"},
                                     {"series_id": "lost", "path": None, "file": None, "status": "write_failed",
                                      "iterations": 30, "fallback": False, "error": "Read-only file system"}])
    with StatusServer(after.providers(), port=port):
        view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)
        # recovered from /status, /tiles and /preview.png alone: no event was published yet
        view.wait_for_function("document.getElementById('series').textContent === 'series after-restart'",
                               timeout=TIMEOUT_MS)
        view.wait_for_selector('#mosaic[data-src*="after-restart.0"]', timeout=TIMEOUT_MS)
        assert view.get_attribute("#finished a", "href") == "files/before.h5"  # relative: works under a prefix
        listed = view.text_content("#finished")
        assert "spilled (in the fallback folder: /spare/spilled.h5)" in listed  # said "(no file written)"
        assert "lost (no file written: Read-only file system)" in listed
        view.wait_for_function("document.querySelectorAll('#overlay .tile').length === 2", timeout=TIMEOUT_MS)
        after.publish_preview(version=1)
        view.wait_for_selector('#mosaic[data-src*="after-restart.1"]', timeout=TIMEOUT_MS)
    after.hub.close()
    assert log.errors == []
    assert log.off_loopback() == []


def test_small_screen_fits_without_sideways_scrolling(browser: Any, tmp_path: Path,
                                                      pytestconfig: pytest.Config) -> None:
    daemon = ScriptedDaemon(series_id="phone", tiles=TILES, png=mosaic_png(4),
                            finished=[{"series_id": "earlier-series-with-a-long-name", "path": None, "file": None,
                                       "status": "aborted", "iterations": 3}])
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2)
    log = PageLog()
    view = log.attach(context.new_page())
    try:
        with StatusServer(daemon.providers()) as server:
            view.goto(server.url)
            view.wait_for_selector('#mosaic[data-src*="phone.0"]', timeout=TIMEOUT_MS)
            view.wait_for_function("document.querySelectorAll('#overlay .tile').length === 4", timeout=TIMEOUT_MS)
            overflow = view.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the page is {overflow} px wider than a 360 px screen"
            mosaic = view.eval_on_selector("#mosaic", "m => m.getBoundingClientRect().width")
            assert 300 <= mosaic <= 360
            save_screenshot(view, tmp_path / "viewer-small-screen.png", pytestconfig)
    finally:
        daemon.hub.close()
        context.close()
    assert log.errors == []
