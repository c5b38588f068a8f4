"""Soak (issue 12, item 7): a real ``ptylive serve`` (2 workers, loopback) through 50 tiny series back to back.

After a warm-up of 10 series rank 0's resident memory may grow by less than 5 % over the other 40, and its
open file descriptors stay the same: nothing rank 0 keeps per series (views, admissions, history, sockets,
files) accumulates. Rank 0's pid is the ready file's ``pid``; memory and descriptors come from its ``/proc``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from ptylive.gpu.simulate import SimulationSpec
from ptylive.streaming.fake_detector import FakeDetector, FakeDetectorOptions, ScanSource
from tests.daemon.serve_harness import daemon_config, get_json, serving

pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.chaos]

SERIES, WARM_UP = 50, 10
TINY = SimulationSpec(detector_px=16, detector_pixel_mrad=6.0, scan_shape=(4, 4), scan_step_px=2.0)


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``pid`` from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads rank 0's /proc")
def test_fifty_series_back_to_back_leave_rank_0_memory_and_descriptors_flat(tmp_path: Path) -> None:
    source = ScanSource.from_simulation(TINY)
    config = daemon_config(tmp_path / "results", final_iterations=2)
    began = time.monotonic()
    samples: list[tuple[int, int]] = []
    with serving(config, tmp_path) as (process, listener), zmq.Context() as context:
        rank0 = int(process.endpoints["pid"])
        assert process.process is not None and rank0 != process.process.pid  # rank 0, not the launcher
        for k in range(SERIES):
            series_id = f"soak-{k}"
            options = FakeDetectorOptions(series_id=series_id, dtype="float32")  # uint16 would round it to dark
            with FakeDetector(source, options, process.endpoints["ingest"], bind=False, context=context) as detector:
                detector.start()
                detector.join(30)
            final = listener.wait_final(series_id, timeout_s=60)
            assert final["status"] == "complete" and final["path"], final
            if k + 1 >= WARM_UP:
                samples.append((rss_bytes(rank0), open_fds(rank0)))
        status = get_json(process.endpoints["http"] + "status")
    elapsed = time.monotonic() - began
    (rss_warm, fds_warm), (rss_end, fds_end) = samples[0], samples[-1]
    growth = (rss_end - rss_warm) / rss_warm
    report = (f"{SERIES} series in {elapsed:.0f} s; rank 0 RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB "
              f"({growth:+.1%}) after {WARM_UP}; fds {fds_warm} -> {fds_end} (range {min(f for _, f in samples)}"
              f"..{max(f for _, f in samples)})")
    print(report)
    assert growth < 0.05, report
    assert fds_end == fds_warm, report
    registry = status["ingest"]["registry"]
    assert registry["starts"]["current"] == SERIES and registry["frames"]["accepted"] == SERIES * source.n_frames
    assert len(list((tmp_path / "results").glob("soak-*.h5"))) == SERIES
