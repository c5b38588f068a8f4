"""Headless Chromium for the viewer tests: Debian's ``chromium`` driven by Playwright (no browser download).

:func:`find_chromium` installs the package when it is missing (``apt-get``, as root in CI). Without a
way to get it the tests fail under CI (``CI`` set) and are skipped elsewhere, saying what to install.
:class:`PageLog` records every request the page makes, so a test can show nothing leaves loopback.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
APT_TIMEOUT_S = 900
LOCAL_SCHEMES = ("data", "about")  # never a request to anywhere
HOP_HEADERS = {"connection", "transfer-encoding", "keep-alive"}
Answer = Callable[[str], tuple[int, str, bytes] | None]  # a path (query included) -> (status, type, body) or None


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (the browser tests must run there); skip on a developer's machine."""
    message = f"headless Chromium unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)  # raises, like pytest.fail


def find_chromium() -> str:
    """Path of Debian's ``chromium``, installed with ``apt-get`` first if it is not on PATH."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        unavailable("no 'chromium' on PATH and no apt-get to install Debian's chromium package")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=environment)
        except subprocess.TimeoutExpired:
            unavailable(f"{' '.join(command)} took longer than {APT_TIMEOUT_S} s")
        if done.returncode != 0:
            unavailable(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        unavailable("apt-get installed 'chromium' but it is not on PATH")
    return str(found)


def is_loopback(url: str) -> bool:
    """True for http(s)/ws(s)/blob URLs whose host is a loopback address or ``localhost``, and data/about URLs."""
    parts = urlsplit(url[len("blob:"):] if url.startswith("blob:") else url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class PageLog:
    """Every request URL, page error and console error of one page."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    allowed: tuple[str, ...] = ("status of 404",)  # /preview.png before the first preview

    def attach(self, page: Any) -> Any:
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)
        return page

    def _console(self, message: Any) -> None:
        if message.type == "error" and not any(text in message.text for text in self.allowed):
            self.errors.append(f"console: {message.text}")

    def off_loopback(self) -> list[str]:
        return [url for url in self.requests if not is_loopback(url)]


def pixel_checksum(page: Any, image_id: str = "mosaic") -> tuple[str, int] | None:
    """``(image URL, sum of its RGBA bytes)`` of the mosaic (or image ``image_id``) as drawn now, or None before
    it shows."""
    result = page.evaluate("""(imageId) => {
        const image = document.getElementById(imageId);
        if (!image || !image.dataset.src || !image.naturalWidth) { return null; }
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(image, 0, 0);
        const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let sum = 0;
        for (let i = 0; i < pixels.length; i++) { sum = (sum + pixels[i] * (i % 9973 + 1)) % 2147483647; }
        return [image.dataset.src, sum];
    }""", image_id)
    return None if result is None else (str(result[0]), int(result[1]))


def overlay_counts(page: Any) -> dict[int, tuple[int, int]]:
    """``{worker: (frames_received, frames_expected)}`` as the page's tile overlay shows them."""
    boxes = page.eval_on_selector_all(
        "#overlay .tile", "boxes => boxes.map(b => [b.dataset.worker, b.dataset.framesReceived, "
                          "b.dataset.framesExpected, b.textContent])")
    counts = {}
    for worker, received, expected, text in boxes:
        assert f"{received}/{expected} frames" in text, text  # what the operator reads, not only the attributes
        counts[int(worker)] = (int(received), int(expected))
    return counts


def save_screenshot(page: Any, path: Path, config: pytest.Config, full_page: bool = True) -> Path:
    """Write a PNG of ``page`` to ``path`` and print where it is (shown even when pytest captures output)."""
    page.screenshot(path=str(path), full_page=full_page)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"viewer screenshot: {path}")
    return path


def start_proxy(upstream_port: int, prefix: str = "", answer: Answer | None = None) -> ThreadingHTTPServer:
    """A reverse proxy on loopback (port 0) serving ``prefix/...`` from the daemon's ``/...``, streamed (SSE works).

    ``answer(path)``, when given, is asked first (``path`` without the prefix): a ``(status, content type, body)``
    it returns is served by the proxy itself, a stub for routes the daemon does not have yet.
    """

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one response per connection: the body ends when the socket closes

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
            pass

        def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            if not (self.path == prefix or self.path.startswith(prefix + "/")):
                self.send_error(404, "outside the prefix")
                return
            path = self.path[len(prefix):] or "/"
            stub = answer(path) if answer is not None else None
            if stub is not None:
                status, content_type, body = stub
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
            upstream.request("GET", path, headers={"Accept": self.headers.get("Accept", "*/*")})
            reply = upstream.getresponse()
            self.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            self.end_headers()
            try:
                while chunk := reply.read1(65536):
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            finally:
                upstream.close()

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy
