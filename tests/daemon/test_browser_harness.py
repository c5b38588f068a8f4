"""The browser tests' own setup: where Chromium comes from, and what counts as staying on loopback."""

from __future__ import annotations

import pytest

from tests.daemon import browser_harness
from tests.daemon.browser_harness import find_chromium, is_loopback


def test_without_chromium_or_apt_get_ci_fails_and_a_developer_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_harness.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no apt-get to install Debian's chromium"):
        find_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no apt-get to install Debian's chromium"):
        find_chromium()


def test_chromium_on_path_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_harness.shutil, "which", {"chromium": "/usr/bin/chromium"}.get)
    assert find_chromium() == "/usr/bin/chromium"  # no apt-get run


@pytest.mark.parametrize("url, local", [("http://127.0.0.1:8080/status", True), ("http://localhost/", True),
                                        ("http://[::1]:80/events", True), ("http://127.3.4.5/", True),
                                        ("blob:http://127.0.0.1:9/uuid", True), ("data:image/png;base64,AA", True),
                                        ("https://cdn.example.org/x.js", False), ("http://10.0.0.1/", False),
                                        ("http://127.0.0.1.example.com/", False), ("ws://8.8.8.8/", False)])
def test_loopback_urls(url: str, local: bool) -> None:
    assert is_loopback(url) is local
