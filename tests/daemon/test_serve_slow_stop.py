"""SIGTERM during a slow iteration: the workers stop between batches and the partial result is written.

At one update per iteration a worker used to see a stop only between iterations; an iteration longer than the
shutdown grace (8 s) then ended in MPI_Abort and no file. Here one iteration takes well over that (80 slices,
192-px windows: measured about 15 s on 2 busy cores), SIGTERM lands inside the second, and the daemon must exit
cleanly within 10 s, as the unit's stop would require, with an ``interrupted`` file.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import zmq

from ptylive.daemon.service.config import ReconstructionConfig
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource
from tests.daemon.serve_harness import daemon_config, read_final, serving, stop_by_sigterm, wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.chaos]


def test_sigterm_inside_a_slow_iteration_still_writes_the_partial_result(tmp_path: Path, dosed_scan: Path) -> None:
    (tmp_path / "results").mkdir()
    config = daemon_config(tmp_path / "results", final_iterations=1000)
    config = dataclasses.replace(config, reconstruction=ReconstructionConfig(
        n_slices=80, slice_thickness_A=0.0732, upsampling=4, batch_size=4, final_iterations=1000))
    with serving(config, tmp_path) as (process, listener):
        source = ScanSource.from_file(dosed_scan)
        with zmq.Context() as context, FakeDetector(source, FakeDetectorOptions(series_id="slow", dtype="uint16"),
                                                    process.endpoints["ingest"], bind=False,
                                                    context=context) as detector:
            detector.start()
            detector.join(120.0)
            wait_for(lambda: listener.log.previews("slow"), 120, "the first iteration's preview")
            time.sleep(1.0)  # inside the next iteration
            code, elapsed = stop_by_sigterm(process, 30)
        assert code == 0 and elapsed < 10, (code, elapsed, process.log_tail())
        final = listener.log.finals.get("slow")
        assert final is not None and final["status"] == "interrupted", listener.log.finals
        assert read_final(final["path"])["attrs"]["status"] == "interrupted"
