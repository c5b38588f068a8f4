"""The viewer's scale bar and finalize/abort buttons in headless Chromium, and the page behind a reverse proxy
that serves it under a path prefix (relative URLs only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ptylive.daemon.http.access import ControlAccess
from ptylive.daemon.http.server import Providers, StatusServer
from tests.daemon.browser_harness import PageLog, start_proxy
from tests.daemon.test_viewer_page import OBJECT_SHAPE, TILES, TIMEOUT_MS, ScriptedDaemon, mosaic_png

pytestmark = pytest.mark.browser

TOKEN = "viewer-test-token-0123456789abcdef"
PREFIX = "/ptylive"


class PixelDaemon(ScriptedDaemon):
    """A scripted daemon whose /tiles carries the object's pixel size and whose control calls are recorded."""

    pixel_size_A: float = 0.5
    calls: list[tuple[str, str | None]]

    def tile_table(self) -> dict[str, Any]:
        return {**super().tile_table(), "pixel_size_A": self.pixel_size_A}

    def control(self, action: str, series_id: str | None) -> tuple[bool, str]:
        self.calls.append((action, series_id))
        return True, f"{action} of {series_id} requested"

    def control_providers(self) -> Providers:
        base = self.providers()
        return Providers(status=base.status, tiles=self.tile_table, preview_png=base.preview_png, events=base.events,
                         control=self.control)


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, PageLog]]:
    log = PageLog()
    log.allowed += ("status of 401",)  # the refused control requests the test makes on purpose
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    yield log.attach(context.new_page()), log
    context.close()


def click_and_read(view: Any, button: str, previous: str) -> str:
    view.click(button)
    view.wait_for_function("(before) => document.getElementById('control-result').textContent !== before",
                           arg=previous, timeout=TIMEOUT_MS)
    return str(view.text_content("#control-result"))


def test_scale_bar_in_angstrom_and_buttons_refuse_without_the_token(page: tuple[Any, PageLog]) -> None:
    view, log = page
    daemon = PixelDaemon(series_id="scan-7", tiles=TILES, png=mosaic_png(5))
    daemon.calls = []
    with StatusServer(daemon.control_providers(), access=ControlAccess(TOKEN)) as server:
        view.goto(server.url)
        view.wait_for_selector('#mosaic[data-src*="scan-7.0"]', timeout=TIMEOUT_MS)
        view.wait_for_selector("#scale-bar:not([hidden])", timeout=TIMEOUT_MS)
        # 160 px x 0.5 A = 80 A wide; a fifth is 16 A, whose round length below is 10 A: 12.5 % of the width
        assert view.get_attribute("#scale-bar", "data-length-a") == "10"
        assert view.text_content("#scale-text") == "10 \u00c5"
        line, bar = view.evaluate("[document.getElementById('scale-line').getBoundingClientRect().width, "
                                  "document.getElementById('scale-bar').getBoundingClientRect().width]")
        assert line == pytest.approx(bar * 10 / (OBJECT_SHAPE[1] * daemon.pixel_size_A), rel=0.02)

        shown = click_and_read(view, "#finalize", str(view.text_content("#control-result")))
        assert "finalize refused (HTTP 401)" in shown and "token" in shown
        view.fill("#control-token", "not-the-token-0123456789")
        shown = click_and_read(view, "#abort", shown)
        assert "abort refused (HTTP 401)" in shown
        assert view.get_attribute("#control-result", "data-status") == "refused"
        assert daemon.calls == []  # nothing reached the daemon without the token

        view.fill("#control-token", TOKEN)
        shown = click_and_read(view, "#finalize", shown)
        assert shown == "finalize: finalize of scan-7 requested"
        assert daemon.calls == [("finalize", "scan-7")]
        assert TOKEN not in view.content()  # typed into the field, never written into the page
        assert view.evaluate("sessionStorage.getItem('ptylive.control-token')") == TOKEN
    daemon.hub.close()
    assert log.errors == []


def test_the_page_works_behind_a_reverse_proxy_with_a_path_prefix(page: tuple[Any, PageLog]) -> None:
    view, log = page
    daemon = PixelDaemon(series_id="proxied", tiles=TILES, png=mosaic_png(6))
    daemon.calls = []
    with StatusServer(daemon.providers()) as server:
        proxy = start_proxy(server.port, PREFIX)
        try:
            view.goto(f"http://127.0.0.1:{proxy.server_address[1]}{PREFIX}/")
            view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)  # events through the proxy
            view.wait_for_selector('#mosaic[data-src*="proxied.0"]', timeout=TIMEOUT_MS)
            daemon.publish_preview(version=1)
            view.wait_for_selector('#mosaic[data-src*="proxied.1"]', timeout=TIMEOUT_MS)
            view.wait_for_function("document.querySelectorAll('#overlay .tile').length === 4", timeout=TIMEOUT_MS)
        finally:
            daemon.hub.close()
            proxy.shutdown()
            proxy.server_close()
    outside = [url for url in log.requests if f":{proxy.server_address[1]}{PREFIX}/" not in url]
    assert outside == [], f"requests that left the prefix: {outside}"
    assert log.errors == []
