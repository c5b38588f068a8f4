"""What plain ``ptylive serve`` (no ``-v``) logs: series start, end with status and final file, at INFO.

Under systemd these lines are the journal's record of every series; the engine's per-iteration lines stay
out unless ``-v``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import pytest
import zmq

from ptylive.daemon.cli.main import main as cli_main
from ptylive.daemon.cli.main import serve_log_filter
from ptylive.daemon.service.process import ServeProcess
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource
from tests.daemon.serve_harness import PreviewListener, daemon_config


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize("name, level, shown", [
    ("ptylive.daemon.service.collector", logging.INFO, True),
    ("ptylive.streaming.series", logging.INFO, True),
    ("ptylive.daemon.worker.refine", logging.INFO, True),
    ("ptylive.daemon.engine.iteration", logging.INFO, False),  # once per iteration and worker
    ("ptylive.daemon.engine.iteration", logging.WARNING, True),
    ("ptylive.daemon.service.collector", logging.DEBUG, False),
    ("zmq", logging.INFO, False),
    ("zmq", logging.ERROR, True),
])
def test_plain_serve_shows_ptylive_info_lines_but_not_the_engines(name: str, level: int, shown: bool) -> None:
    assert serve_log_filter(record(name, level)) is shown


@pytest.mark.mpi
@pytest.mark.slow
def test_plain_serve_logs_a_series_start_its_end_and_its_final_file(tmp_path: Path) -> None:
    scan = tmp_path / "scan.h5"
    assert cli_main(["simulate", str(scan), "--detector-px", "32", "--scan", "6", "6", "--dose", "1e5", "--quiet"]) == 0
    (tmp_path / "results").mkdir()
    process = ServeProcess(daemon_config(tmp_path / "results", final_iterations=2), tmp_path / "daemon",
                           verbose=False)
    with zmq.Context() as context:
        try:
            listener = PreviewListener(context, process.start()["preview"])
            with FakeDetector(ScanSource.from_file(scan), FakeDetectorOptions(series_id="logged", rate_hz=500.0),
                              process.endpoints["ingest"], bind=False, context=context) as detector:
                detector.start()
                detector.join(60.0)
            final = listener.wait_final("logged", 120.0)
            listener.close()
        finally:
            assert process.stop() == 0, process.log_tail()
    log = process.log_file.read_text()
    assert "ptylive.streaming.series INFO series 'logged' current: 36 positions" in log, log
    assert final["status"] == "complete", final
    with h5py.File(final["path"]) as result:
        final_iterations = int(result.attrs["iterations"])
    ended = f"ptylive.daemon.service.collector INFO series 'logged' ended: complete after {final_iterations} " \
            f"iterations; final file {final['path']}\n"
    assert ended in log, log
    assert "ptylive.daemon.engine" not in log, log
