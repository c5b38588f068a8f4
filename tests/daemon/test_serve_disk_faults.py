"""``ptylive serve`` with a results folder that fails after the start: the volume lands in the fallback folder.

The results folder exists when the daemon starts (it checks) and is then replaced by a file, so every write
there fails (``NotADirectoryError``; as root a folder without write permission would block nothing). A second
series finds the fallback folder gone the same way and is announced ``write_failed``.
"""

from __future__ import annotations

import dataclasses
import shutil
import urllib.request
from pathlib import Path

import pytest

from ptylive.daemon.service.config import OutputConfig
from ptylive.streaming.fake_detector import ScanSource
from tests.daemon.serve_harness import daemon_config, get_json, read_final, serving, stream

pytestmark = [pytest.mark.mpi, pytest.mark.chaos]


def metric(http: str, outcome: str) -> float:
    with urllib.request.urlopen(http + "metrics", timeout=5.0) as response:
        lines = response.read().decode().splitlines()
    prefix = f'ptylive_final_writes_total{{outcome="{outcome}"}} '
    return float(next(line[len(prefix):] for line in lines if line.startswith(prefix)))


def test_a_results_folder_that_fails_sends_the_file_to_the_fallback_then_write_failed(
        tmp_path: Path, dosed_scan: Path) -> None:
    results, fallback = tmp_path / "results", tmp_path / "fallback"
    results.mkdir()
    config = daemon_config(results, final_iterations=2)
    config = dataclasses.replace(config, output=OutputConfig(results, fallback_folder=fallback))
    source = ScanSource.from_file(dosed_scan)
    with serving(config, tmp_path) as (process, listener):
        http = process.endpoints["http"]
        results.rename(tmp_path / "results-before")  # (it may hold the loopback control token)
        results.write_bytes(b"")  # the results "folder" can no longer hold a file
        stream(process, source, series_id="kept", dtype="uint16")
        final = listener.wait_final("kept")
        assert final == {"htype": "final", "series_id": "kept", "path": str(fallback / "kept.h5"),
                         "status": "complete", "fallback": True}
        assert read_final(final["path"])["attrs"]["status"] == "complete"
        [entry] = get_json(http + "status")["finished"]
        assert entry["fallback"] and entry["file"] is None and "NotADirectoryError" in entry["error"]
        assert metric(http, "fallback") == 1 and metric(http, "written") == 0

        shutil.rmtree(fallback)
        fallback.write_bytes(b"")  # now the fallback fails too
        stream(process, source, series_id="lost", dtype="uint16")
        final = listener.wait_final("lost")
        assert final["status"] == "write_failed" and final["path"] is None and not final["fallback"]
        status = get_json(http + "status")
        assert status["final_writes"] == {"written": 0, "fallback": 1, "failed": 1, "retries": 4}
        assert metric(http, "failed") == 1
    assert not list(tmp_path.rglob("*.partial"))
