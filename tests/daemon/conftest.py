"""Fixtures of the daemon tests: one ``ptylive serve`` for the whole session, a scan with counts, a browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.http.server import StatusServer
from ptylive.daemon.service.process import ServeProcess
from tests.daemon.checkpoint_data import START
from tests.daemon.http_harness import FakeDaemon
from tests.daemon.serve_harness import FINAL_ITERATIONS, PreviewListener, daemon_config, serving


@pytest.fixture(scope="session")
def dosed_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ptylive simulate`` defaults at 1e5 e/Å²: integer counts, exact in uint16."""
    from ptylive.daemon.cli.main import main as cli_main

    path = tmp_path_factory.mktemp("serve") / "dosed.h5"
    assert cli_main(["simulate", str(path), "--dose", "1e5"]) == 0
    return path


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, PreviewListener]]:
    folder = tmp_path_factory.mktemp("daemon")
    (folder / "results").mkdir()
    with serving(daemon_config(folder / "results", final_iterations=FINAL_ITERATIONS), folder) as running:
        yield running


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright (installed by apt-get when missing; see browser_harness)."""
    from tests.daemon.browser_harness import CHROMIUM_FLAGS, find_chromium, unavailable

    executable = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        unavailable(f"Playwright for Python is not installed ({error}); pip install -e '.[test]'")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def fake_daemon() -> FakeDaemon:
    """Scripted providers for the HTTP surface (no MPI, no sockets of its own)."""
    return FakeDaemon()


@pytest.fixture
def server(fake_daemon: FakeDaemon) -> Iterator[StatusServer]:
    """A StatusServer on 127.0.0.1, port 0, over ``fake_daemon``, control on (``http_harness.TOKEN``)."""
    with StatusServer(fake_daemon.providers(control=True), "127.0.0.1", 0, fake_daemon.access()) as running:
        yield running


@pytest.fixture(scope="module")
def geometry() -> SeriesGeometry:
    """The checkpoint tests' series (:data:`tests.daemon.checkpoint_data.START`) on two workers."""
    return series_geometry(START, 2, 1)

