"""The viewer page in headless Chromium while the real daemon (``ptylive serve``, 2 workers) reconstructs a
streamed series that loses a burst of frames: the mosaic changes as frames arrive, the overlay shows the
counts ``/tiles`` reports, the lost region is flagged, the final file is linked, nothing leaves loopback; and
the virtual-image panel redraws the daemon's own BF image while a series' frames arrive."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq

from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource, StreamStats
from tests.daemon.browser_harness import PageLog, overlay_counts, pixel_checksum, save_screenshot
from tests.daemon.serve_harness import PreviewListener, get_json, wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.browser]

TIMEOUT_MS = 20_000
RATE_HZ = 80.0  # 320 frames in 4 s: several previews (2 Hz) while frames arrive
LOST = tuple(range(100, 112))  # a burst the detector never sends


def stream(process: ServeProcess, source: ScanSource, **options: Any) -> StreamStats:
    with zmq.Context() as context, FakeDetector(source, FakeDetectorOptions(**options), process.endpoints["ingest"],
                                                 bind=False, context=context) as detector:
        detector.start()
        return detector.join(120.0)


def watch_mosaic(view: Any, until: Any) -> list[tuple[str, int]]:
    """Distinct (image URL, pixel checksum) pairs the page shows until ``until()`` is true."""
    seen: list[tuple[str, int]] = []
    while not until():
        shown = pixel_checksum(view)
        if shown is not None and shown not in seen:
            seen.append(shown)
        time.sleep(0.1)
    return seen


def test_viewer_follows_a_streamed_series_that_loses_frames(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path, browser: Any, tmp_path: Path,
        pytestconfig: pytest.Config) -> None:
    process, listener = daemon
    url = process.endpoints["http"]
    series_id = f"viewer-{uuid.uuid4().hex[:8]}"
    log = PageLog()
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    view = log.attach(context.new_page())
    began = time.monotonic()
    view.goto(url)
    view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream, process, ScanSource.from_file(dosed_scan), series_id=series_id,
                              rate_hz=RATE_HZ, dtype="uint16", drop_frames=LOST)
        view.wait_for_selector(f'#mosaic[data-src*="{series_id}."]', timeout=TIMEOUT_MS)
        while_streaming = watch_mosaic(view, sending.done)
        save_screenshot(view, tmp_path / "viewer-streaming.png", pytestconfig)
        stats = sending.result()
    assert len({checksum for _, checksum in while_streaming}) >= 2, f"the mosaic did not change: {while_streaming}"
    assert len({src for src, _ in while_streaming}) >= 2

    final = listener.wait_final(series_id)
    tiles = get_json(url + "tiles")
    assert tiles["series_id"] == series_id
    reported = {t["worker"]: (t["frames_received"], t["frames_expected"]) for t in tiles["tiles"]}
    assert sum(r for r, _ in reported.values()) == stats.frames_sent == 320 - len(LOST)
    wait_for(lambda: overlay_counts(view) == reported, 10.0, f"the overlay to show /tiles' counts {reported}")
    lossy = [w for w, (received, expected) in reported.items() if received < expected]
    for worker in lossy:
        assert "bad" in view.get_attribute(f'#overlay .tile[data-worker="{worker}"]', "class")
    view.wait_for_function("document.getElementById('attention').textContent.includes('frames lost')",
                           timeout=TIMEOUT_MS)
    view.wait_for_function(f"document.getElementById('progress-text').textContent.includes('{len(LOST)} missing')",
                           timeout=TIMEOUT_MS)
    view.wait_for_function(f"document.getElementById('coverage-text').textContent.startsWith("
                           f"'{320 - len(LOST)} of 320 scan positions received')", timeout=TIMEOUT_MS)

    link = view.wait_for_selector(f'#finished a:text-is("{series_id}")', timeout=TIMEOUT_MS).get_attribute("href")
    assert link == "files/" + Path(final["path"]).name  # relative, so it works under a proxy's path prefix
    with urllib.request.urlopen(url.rstrip("/") + "/" + link, timeout=10) as response:
        assert response.read(8) == b"\x89HDF\r\n\x1a\n"

    options = view.eval_on_selector_all("#slice option", "options => options.map(o => o.value)")
    assert options == ["projected", "0", "1", "2"]  # the daemon runs 3 slices
    view.select_option("#slice", "1")
    view.wait_for_selector('#mosaic[data-src*="slice=1&"]', timeout=TIMEOUT_MS)
    view.select_option("#slice", "projected")
    view.wait_for_selector('#mosaic[data-src*="slice=projected&"]', timeout=TIMEOUT_MS)
    path = save_screenshot(view, tmp_path / "viewer.png", pytestconfig)
    seconds = time.monotonic() - began
    context.close()

    assert log.errors == []
    assert log.off_loopback() == [], "the page asked for something outside loopback"
    previews = len(listener.log.previews(series_id))
    fetched = sum("/preview.png" in u and f"v={series_id}." in u for u in log.requests)
    assert fetched <= previews + 4, f"{fetched} mosaic downloads for {previews} previews: polling?"
    assert path.stat().st_size > 10_000
    print(f"viewer test: {seconds:.1f} s in the browser, {previews} previews, {fetched} mosaic downloads")


def grey_at(view: Any, image_id: str, row: int, col: int) -> int | None:
    """The red channel of pixel (row, col) of image ``image_id`` as drawn now (None before it shows)."""
    return view.evaluate("""([imageId, row, col]) => {
        const image = document.getElementById(imageId);
        if (!image || !image.naturalWidth) { return null; }
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
        canvas.getContext("2d").drawImage(image, 0, 0);
        return canvas.getContext("2d").getImageData(col, row, 1, 1).data[0];
    }""", [image_id, row, col])


def test_the_virtual_image_changes_while_frames_arrive(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path, browser: Any) -> None:
    """The real daemon's /virtual.json and /virtual.png (not a stub, as in test_viewer_panels): the panel's BF image
    is redrawn as frames arrive, then every kind is offered and the chosen one follows. The mean diffraction pattern
    is redrawn as frames arrive too, and the probe panel shows worker 0's probe."""
    process, listener = daemon
    series_id = f"virtual-{uuid.uuid4().hex[:8]}"
    source = ScanSource.from_file(dosed_scan)  # ptylive simulate's 20 × 16 raster, row-major
    source = dataclasses.replace(source, start=dataclasses.replace(source.start, scan_shape=(20, 16)))
    log = PageLog()
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    view = log.attach(context.new_page())
    view.goto(process.endpoints["http"])
    view.wait_for_selector('#connection[data-state="live"]', timeout=TIMEOUT_MS)

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(stream, process, source, series_id=series_id, rate_hz=RATE_HZ, dtype="uint16")
        view.wait_for_selector(f'#virtual[data-src*="kind=bf&v={series_id}."]', timeout=TIMEOUT_MS)
        seen: list[tuple[str, int]] = []
        patterns: list[str] = []
        while not sending.done():
            shown = pixel_checksum(view, "virtual")
            if shown is not None and shown not in seen:
                seen.append(shown)
            pattern_src = view.get_attribute("#diffraction", "data-src")
            if pattern_src and pattern_src not in patterns:
                patterns.append(pattern_src)
            time.sleep(0.1)
        stats = sending.result()
    assert stats.frames_sent == 320
    partial = [src for src, _ in seen if not src.endswith(f"v={series_id}.320")]
    assert len({checksum for _, checksum in seen}) >= 3, f"the virtual image did not change: {seen}"
    assert len(set(partial)) >= 2, f"fewer than two partial virtual images shown while frames arrived: {seen}"

    listener.wait_final(series_id)
    view.wait_for_function("document.getElementById('virtual-text').textContent.includes('320 of 320 frames')",
                           timeout=TIMEOUT_MS)
    kinds = view.eval_on_selector_all("#virtual-kind option", "options => options.map(o => o.value)")
    assert kinds == ["bf", "adf0", "com_x", "com_y", "idpc"]
    assert "counts" in str(view.text_content("#virtual-colour .high"))
    view.select_option("#virtual-kind", "com_x")
    view.wait_for_selector(f'#virtual[data-src*="kind=com_x&v={series_id}.320"]', timeout=TIMEOUT_MS)
    assert "mrad" in str(view.text_content("#virtual-colour .high"))

    following = [src for src in patterns if f"v={series_id}." in src]
    assert len(following) >= 2, f"the mean pattern was not redrawn while frames arrived: {patterns}"
    view.wait_for_function("document.getElementById('pattern-text').textContent.startsWith('mean of 320 frames')",
                           timeout=TIMEOUT_MS)
    view.wait_for_selector("#probe-frame:not([hidden])", timeout=TIMEOUT_MS)
    assert view.evaluate("[document.getElementById('probe').naturalWidth, "
                         "document.getElementById('diffraction').naturalWidth]") == [48, 48]
    centre, corner = grey_at(view, "diffraction", 24, 24), grey_at(view, "diffraction", 0, 0)
    assert centre is not None and corner is not None and centre > corner + 100  # the bright-field disk
    assert (grey_at(view, "probe", 24, 24) or 0) > (grey_at(view, "probe", 0, 0) or 0)
    context.close()
    assert log.errors == []
    assert log.off_loopback() == [], "the page asked for something outside loopback"
    print(f"virtual panel: {len(seen)} distinct images, mean pattern {len(following)} while {stats.frames_sent} frames "
          "arrived")
