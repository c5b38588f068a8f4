"""Series lifecycle on the running daemon: finalize and abort through the control endpoint, queued series."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from ptylive.daemon.service.config import control_token
from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource
from tests.daemon.serve_harness import PreviewListener, get_json, read_final, registry_series, series_count, wait_for

pytestmark = pytest.mark.mpi


def post_control(process: ServeProcess, action: str, series_id: str | None) -> tuple[int, dict[str, Any]]:
    """``POST /control`` as an operator does it: with the token of the daemon's ``http.control_token_file``."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {control_token(process.config.http, {})}"}
    request = urllib.request.Request(process.endpoints["http"] + "control", method="POST", headers=headers,
                                     data=json.dumps({"action": action, "series_id": series_id}).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("action, status", [("finalize", "complete"), ("abort", "aborted")])
def test_control_endpoint_ends_a_running_series(daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path,
                                                action: str, status: str) -> None:
    process, listener = daemon
    url, series_id = process.endpoints["http"], f"control-{action}"
    source = ScanSource.from_file(dosed_scan)
    with zmq.Context() as context, FakeDetector(source, FakeDetectorOptions(rate_hz=80.0, series_id=series_id),
                                                 process.endpoints["ingest"], bind=False, context=context) as detector:
        detector.start()
        wait_for(lambda: series_count(url, series_id, "received") >= 60, 30, "60 frames")
        coverage = get_json(url + "status")["coverage"]
        covered = sum(row.count("1") for row in coverage["rows"])
        assert coverage["series_id"] == series_id and covered >= 60  # the operator's coverage map
        code, answer = post_control(process, action, series_id)
        assert code == 200 and answer["accepted"], answer
        final = listener.wait_final(series_id)
        wait_for(lambda: series_count(url, series_id, "rejected", "finished_series") > 0,
                 10, "frames after the control counted as finished_series")
    record = registry_series(get_json(url + "status"), series_id)
    assert record["end_cause"] == action and record["received"] < source.n_frames
    result = read_final(final["path"])
    assert final["status"] == status == result["attrs"]["status"]
    assert result["attrs"]["frames_received"] == record["received"]  # every accepted frame reached a worker
    code, answer = post_control(process, action, series_id)  # no longer live
    assert code == 409 and not answer["accepted"]


def test_a_series_started_while_another_runs_is_queued_and_both_finish(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    process, listener = daemon
    source = ScanSource.from_file(dosed_scan)
    endpoint = process.endpoints["ingest"]
    with zmq.Context() as context:
        first = FakeDetector(source, FakeDetectorOptions(rate_hz=150.0, series_id="queue-a"), endpoint, bind=False,
                             context=context)
        second = FakeDetector(source, FakeDetectorOptions(series_id="queue-b"), endpoint, bind=False, context=context)
        with first, second:
            first.start()
            wait_for(lambda: series_count(process.endpoints["http"], "queue-a", "received"),
                     30, "the first series to be current")
            second.start()
            first.join(60), second.join(60)
            final_a, final_b = listener.wait_final("queue-a"), listener.wait_final("queue-b")
    status = get_json(process.endpoints["http"] + "status")
    assert status["ingest"]["registry"]["starts"]["queued"] >= 1
    order = [h["series_id"] for _, h, _ in listener.log.messages if h["htype"] == "final"]
    assert order.index("queue-a") < order.index("queue-b")
    for final in (final_a, final_b):
        result = read_final(final["path"])
        assert final["status"] == "complete" and result["received"].all(), final


@pytest.mark.chaos
def test_the_running_daemon_refuses_control_without_its_token_and_counts_it(
        daemon: tuple[ServeProcess, PreviewListener]) -> None:
    process, _ = daemon
    url = process.endpoints["http"]
    request = urllib.request.Request(url + "control", data=b'{"action": "abort"}', method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer guessed"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    with info.value as error:
        assert error.code == 401 and "token" in json.loads(error.read())["error"]
    with urllib.request.urlopen(url + "metrics", timeout=10) as response:
        metrics = response.read().decode()
    counted = re.search(r'^ptylive_http_refused_total\{reason="wrong_token"\} (\S+)$', metrics, re.MULTILINE)
    assert counted is not None and float(counted.group(1)) >= 1, metrics[-2000:]
