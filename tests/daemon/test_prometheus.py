"""A real Prometheus server (Debian's package) scrapes the running daemon during a streamed series.

The test setup fetches Debian's ``prometheus`` package when the binary is not on PATH (``apt-get
download`` + ``dpkg-deb -x`` into a cache folder: no service is installed or started system-wide),
starts it on loopback with a 1 s scrape of the session daemon's ``/metrics``, and queries its HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import ScanSource
from tests.daemon.serve_harness import PreviewListener, get_json, stream, wait_for
from tests.daemon.test_metrics import DASHBOARD, dashboard_metric_names, exported_sample_names

pytestmark = pytest.mark.mpi


def _fetch_debian_prometheus(cache: Path) -> Path:
    binary = cache / "root" / "usr" / "bin" / "prometheus"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        fetch = ["apt-get", "download", "prometheus"]
        done = subprocess.run(fetch, cwd=download, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:  # empty package lists on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300, check=False)
            done = subprocess.run(fetch, cwd=download, capture_output=True, text=True, timeout=300)
        debs = list(Path(download).glob("prometheus_*.deb"))
        if done.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download prometheus failed: {done.stderr.strip()[-500:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(cache / "root")], check=True, timeout=120)
    return binary


def prometheus_binary() -> Path:
    on_path = shutil.which("prometheus")
    if on_path:
        return Path(on_path)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptylive-tests" / "prometheus"
    try:
        return _fetch_debian_prometheus(cache)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot get Debian's prometheus package in CI: {exc}")
        pytest.skip(f"Debian's prometheus package is not available here: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(daemon: tuple[ServeProcess, PreviewListener], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, _ = daemon
    target = urllib.parse.urlparse(process.endpoints["http"]).netloc
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: ptylive\n    static_configs:\n      - targets: ['{target}']\n")
    port = _free_port()
    command = [str(prometheus_binary()), f"--config.file={folder / 'prometheus.yml'}",
               f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    with open(folder / "prometheus.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: _ready(url), 60, "prometheus to be ready", poll_s=0.2)
        yield url
    finally:
        server.terminate()
        server.wait(20)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def query(url: str, promql: str) -> float | None:
    """The single value of an instant query, or None when it returns nothing."""
    answer: dict[str, Any] = get_json(url + "api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_frames_and_iterations_during_a_series(
        daemon: tuple[ServeProcess, PreviewListener], prometheus: str, dosed_scan: Path) -> None:
    process, listener = daemon
    health = lambda: get_json(prometheus + "api/v1/targets")["data"]["activeTargets"]  # noqa: E731
    wait_for(lambda: any(t["health"] == "up" for t in health()), 30, "the daemon target to be up")
    before = query(prometheus, "ptylive_ingest_frames_total")
    assert before is not None
    source = ScanSource.from_file(dosed_scan)
    _, stats = stream(process, source, series_id="scraped", rate_hz=150.0)
    listener.wait_final("scraped")
    frames = wait_for(lambda: (v := query(prometheus, "ptylive_ingest_frames_total")) is not None
                      and v >= before + stats.frames_sent and v, 30, "the scrape after the series")
    assert frames - before == stats.frames_sent == source.n_frames
    iterations = query(prometheus, "sum(ptylive_iteration_duration_seconds_count)")
    assert iterations is not None and iterations > 0
    assert query(prometheus, 'count(ptylive_iteration_duration_seconds_bucket{le="+Inf"} > 0)') == 2  # both ranks
    latency = query(prometheus, "ptylive_frame_to_preview_latency_seconds_count")
    assert latency is not None and latency >= source.n_frames


def test_the_dashboard_names_only_metrics_the_running_daemon_exports(
        daemon: tuple[ServeProcess, PreviewListener], prometheus: str) -> None:
    process, _ = daemon
    with urllib.request.urlopen(process.endpoints["http"] + "metrics", timeout=5) as response:
        exported = exported_sample_names(response.read().decode())
    missing = dashboard_metric_names() - exported
    assert not missing, f"dashboard queries metrics the daemon does not export: {sorted(missing)}"
    names = json.dumps(sorted(dashboard_metric_names()))
    assert query(prometheus, "count(ptylive_build_info)") == 1, names


def label_values(url: str, label: str, match: str) -> list[str]:
    """What Grafana's ``label_values(match, label)`` lists, from Prometheus' label API."""
    answer = get_json(url + f"api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match}))
    assert answer["status"] == "success", answer
    return sorted(answer["data"])


def test_the_dashboard_variables_list_the_target_and_its_ranks_and_every_panel_query_runs(
        daemon: tuple[ServeProcess, PreviewListener], prometheus: str) -> None:
    """Grafana's interpolation by hand: a value regex-escaped with its backslashes doubled (a backslash in a
    PromQL string starts an escape), All as ``.*`` (the variables' allValue)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v["query"]["query"] for v in dashboard["templating"]["list"]}
    metric_of = lambda name: re.fullmatch(r"label_values\((.+), \w+\)", variables[name]).group(1)  # noqa: E731
    wait_for(lambda: label_values(prometheus, "rank", metric_of("rank").replace("$instance", ".*")), 30,
             "a scrape with the workers' reports")
    (instance,) = label_values(prometheus, "instance", metric_of("instance"))
    assert instance == urllib.parse.urlsplit(daemon[0].endpoints["http"]).netloc
    escaped = re.escape(instance).replace("\\", "\\\\")
    assert label_values(prometheus, "rank", metric_of("rank").replace("$instance", escaped)) == ["1", "2"]  # MPI ranks
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for rank in (".*", "1"):
                expr = target["expr"].replace("$instance", escaped).replace("$rank", rank)
                answer = get_json(prometheus + "api/v1/query?" + urllib.parse.urlencode({"query": expr}))
                assert answer["status"] == "success", (panel["title"], expr, answer)
