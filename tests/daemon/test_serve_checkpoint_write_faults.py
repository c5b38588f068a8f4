"""A worker whose checkpoints cannot be written: rank 0 reports it, and the series is not lost.

A real ``ptylive serve`` with 2 workers checkpoints every 0.2 s. Before the series starts, a directory is put
where worker 1's checkpoint file goes (``os.replace`` onto it fails even for root, where a chmod'ed folder
would not stop root), so each of worker 1's checkpoint writes fails while worker 0's succeed. The failures
must reach rank 0 in worker 1's heartbeats: ``/status`` ``checkpoints`` (per worker and in total) and
``ptylive_checkpoint_failures_total{kind="write"}``; the series still completes and its file is written.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ptylive.daemon.service.checkpoints import checkpoint_path
from ptylive.daemon.service.config import ServiceConfig
from ptylive.streaming.fake_detector import ScanSource
from tests.daemon.serve_harness import daemon_config, get_json, read_final, serving, stream, wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.chaos, pytest.mark.slow]

SERIES = "unwritable-checkpoint"


def checkpoint_write_failures(metrics_url: str) -> float | None:
    """``ptylive_checkpoint_failures_total{kind="write"}`` as ``/metrics`` serves it (None if absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5.0) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ptylive_checkpoint_failures_total" and sample.labels.get("kind") == "write":
                return float(sample.value)
    return None


def test_a_worker_whose_checkpoints_fail_is_reported_on_rank_0_and_its_series_still_written(
        tmp_path: Path, dosed_scan: Path) -> None:
    results, state = tmp_path / "results", tmp_path / "state"
    results.mkdir()
    config = daemon_config(results, final_iterations=150)  # a few seconds of refinement: several checkpoints
    config = dataclasses.replace(config, service=ServiceConfig(state_folder=str(state), checkpoint_interval_s=0.2))
    with serving(config, tmp_path / "serve") as (daemon, listener):
        http = daemon.endpoints["http"]
        blocker = checkpoint_path(state, SERIES, 1)  # after the start's recovery, which would set it aside
        blocker.mkdir()
        (blocker / "inside").write_bytes(b"x")
        stream(daemon, ScanSource.from_file(dosed_scan), series_id=SERIES, dtype="uint16")
        final = listener.wait_final(SERIES)
        assert final["status"] == "complete", final

        def reported() -> dict[str, Any] | None:  # the removal runs on the collector after the final's announcement
            status = get_json(http + "status")
            checkpoints = status["checkpoints"]
            return status if checkpoints["write_failures"].get("1") and checkpoints["failures"]["remove"] else None

        status: dict[str, Any] = wait_for(reported, 30, "worker 1's write failures and the removal's in /status")
        checkpoints = status["checkpoints"]
        failed = checkpoints["write_failures"]["1"]
        assert failed >= 2, checkpoints  # every 0.2 s for the whole series, not once
        assert checkpoints["write_failures"]["0"] == 0, checkpoints  # worker 0's checkpoints were written
        assert checkpoints["failures"]["write"] == sum(checkpoints["write_failures"].values()), checkpoints
        assert status["worker_reports"]["1"]["checkpoint_failures"] == failed
        # The blocker cannot be removed either once the file is written: counted once, and the collector lives on.
        assert checkpoints["failures"]["remove"] == 1, checkpoints
        assert status["threads"]["collector"] == "running", status["threads"]
        wait_for(lambda: checkpoint_write_failures(http + "metrics") == get_json(http + "status")["checkpoints"][
            "failures"]["write"], 10, "ptylive_checkpoint_failures_total{kind=write} to match /status")
        assert checkpoint_write_failures(http + "metrics") >= failed

        [entry] = [e for e in get_json(http + "status")["finished"] if e["series_id"] == SERIES]
        assert entry["status"] == "complete" and entry["path"], entry
        written = read_final(entry["path"])
        assert written["attrs"]["status"] == "complete" and written["received"].all()
        assert "checkpoint" in daemon.log_tail(400) and "not written" in daemon.log_tail(400)
    assert blocker.is_dir() and not list(state.glob("*.w0.ckpt.npz"))  # worker 0's removed as usual
