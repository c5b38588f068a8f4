"""Disk faults of final files: retries, the fallback folder, ``write_failed`` only when every place failed.

The files are real (:func:`write_final`); a full disk is an ``OSError(ENOSPC)`` raised by h5py once the
``.partial`` exists (tests may run as root, where a folder without write permission blocks nothing), a
results folder that cannot hold files is a path that is a file.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ptylive.daemon.engine.geometry import SeriesGeometry, series_geometry
from ptylive.daemon.service import messages as rank_messages
from ptylive.daemon.service.config import ConfigError, OutputConfig, config_from_mapping
from ptylive.daemon.service.final_writer import FinalJob, FinalOutcome, FinalWriter, default_fallback_folder
from ptylive.daemon.service.metrics import DaemonMetrics
from ptylive.daemon.service.series_views import SeriesViews
from ptylive.streaming.protocol import SeriesStart
from tests.daemon.test_metrics import snapshot

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md

START = SeriesStart(series_id="disk-1", scan_shape=(4, 4), scan_step_A=(1.0, 1.0), detector_shape=(16, 16),
                    dtype="uint16", energy_eV=300e3, convergence_semiangle_mrad=20.0, defocus_A=0.0,
                    detector_pixel_mrad=2.0)
QUALITY = {"frames_used": 8, "frames_expected": 8, "frames_received": 8, "loss": 1.0, "loss_per_frame": 0.1,
           "convergence_rate": None, "wait_fraction": 0.0, "staleness_max": 0}


@pytest.fixture(scope="module")
def geometry() -> SeriesGeometry:
    return series_geometry(START, 2, 1)


def final_job(geometry: SeriesGeometry, series_id: str = "disk-1") -> FinalJob:
    """Both workers' finals, with tiles that fit the geometry (so the real writer can stitch them)."""
    start = SeriesStart(**{**START.__dict__, "series_id": series_id})
    finals = []
    for domain in geometry.domains:
        tile = domain.tile
        volume = np.full((1, tile.row1 - tile.row0, tile.col1 - tile.col0), domain.rank + 1, np.complex64)
        header: Any = {"series_id": series_id, "worker": domain.rank, "status": "complete", "iterations": 3,
                       "tile": [tile.row0, tile.row1, tile.col0, tile.col1], "loss_history": [1.0] * 3,
                       "frames_history": [8] * 3, "scale": 1.0, "slice_thickness_A": 0.0, "rejected": {},
                       "received": list(range(8 * domain.rank, 8 * domain.rank + 8)), "stats": {}, **QUALITY}
        finals.append(rank_messages.FinalMessage(header, (volume, np.ones((16, 16), np.complex64))))
    return FinalJob(start, geometry, finals)


def full_disk(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Every dataset written into a file in ``folders`` fails with ENOSPC (after its ``.partial`` is created)."""
    create_dataset = h5py.Group.create_dataset

    def failing(group: h5py.Group, name: str, *args: Any, **kwargs: Any) -> Any:
        if Path(group.file.filename).parent in folders:
            raise OSError(errno.ENOSPC, "No space left on device")
        return create_dataset(group, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)


def written(writer: FinalWriter, *jobs: FinalJob) -> list[FinalOutcome]:
    writer.start()
    for job in jobs:
        writer.submit(job)
    try:
        assert writer.wait_idle(10.0)
        return writer.take_done()
    finally:
        writer.close(5.0)


def final_writes(writer: FinalWriter) -> Callable[[str], float | None]:
    """``outcome`` → ``ptylive_final_writes_total{outcome}`` of a fresh registry reading the writer's counts."""
    registry = CollectorRegistry()
    DaemonMetrics(registry, lambda: {**snapshot(), "final_writes": writer.counts()})
    return lambda outcome: registry.get_sample_value("ptylive_final_writes_total", {"outcome": outcome})


def announced(geometry: SeriesGeometry, outcome: FinalOutcome) -> dict[str, Any]:
    views = SeriesViews(lambda series_id: (START, geometry), n_workers=2)
    return views.finished(outcome)[0]


def partials(*folders: Path) -> list[Path]:
    return [path for folder in folders if folder.is_dir() for path in folder.rglob("*.partial")]


@pytest.mark.parametrize("fault", ["results path is a file", "results disk full"])
def test_a_failing_results_folder_sends_the_volume_to_the_fallback(
        geometry: SeriesGeometry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    results, fallback = tmp_path / "results", tmp_path / "fallback"
    if fault == "results path is a file":
        results.write_bytes(b"")  # every attempt fails with NotADirectoryError
    else:
        results.mkdir()
        full_disk(monkeypatch, results)
    writer = FinalWriter(results, fallback_folder=fallback, retry_delays_s=(0.0, 0.0))
    [outcome] = written(writer, final_job(geometry))
    assert outcome.fallback and outcome.path == fallback / "disk-1.h5"
    assert outcome.error is not None and ("NotADirectoryError" in outcome.error or "No space" in outcome.error)
    with h5py.File(outcome.path) as f:  # the whole volume, stitched
        assert f.attrs["status"] == "complete" and set(np.unique(f["object"][...])) == {1, 2}
    entry = announced(geometry, outcome)
    assert entry["status"] == "complete" and entry["path"] == str(fallback / "disk-1.h5") and entry["fallback"]
    assert entry["file"] is None  # /files/ serves the results folder only: no link to a file that is not there
    value = final_writes(writer)
    assert (value("written"), value("fallback"), value("failed")) == (0, 1, 0)
    assert writer.counts()["retries"] == 2  # 3 attempts in the results folder
    assert partials(results, fallback) == [] and (fallback.stat().st_mode & 0o777) == 0o700


def test_a_full_disk_everywhere_is_write_failed_and_leaves_no_partial(
        geometry: SeriesGeometry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, fallback = tmp_path / "results", tmp_path / "fallback"
    results.mkdir()
    fallback.mkdir()
    full_disk(monkeypatch, results, fallback)
    writer = FinalWriter(results, fallback_folder=fallback, retry_delays_s=(0.0,))
    [outcome] = written(writer, final_job(geometry))
    assert outcome.path is None and not outcome.fallback
    assert outcome.error == "OSError: [Errno 28] No space left on device; fallback folder: " \
                            "OSError: [Errno 28] No space left on device"
    entry = announced(geometry, outcome)
    assert entry["status"] == "write_failed" and entry["path"] is None and entry["error"] == outcome.error
    value = final_writes(writer)
    assert (value("written"), value("fallback"), value("failed")) == (0, 0, 1)
    assert list(results.iterdir()) == [] and list(fallback.iterdir()) == []  # no .partial anywhere


def test_a_retry_waits_without_holding_up_the_next_series(geometry: SeriesGeometry, tmp_path: Path) -> None:
    """A write that fails once is written in the results folder on its retry; the series after it is written
    during the wait, not after it."""
    failures = {"flaky": 1}

    def write(folder: Path, start: SeriesStart, *_: Any) -> Path:
        if failures.get(start.series_id, 0) > 0:
            failures[start.series_id] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return folder / f"{start.series_id}.h5"

    writer = FinalWriter(tmp_path, write, fallback_folder=tmp_path / "fallback", retry_delays_s=(1.0,))
    began = time.monotonic()
    outcomes = written(writer, final_job(geometry, "flaky"), final_job(geometry, "next"))
    assert [(o.job.start.series_id, o.path, o.fallback, o.error) for o in outcomes] == [
        ("next", tmp_path / "next.h5", False, None), ("flaky", tmp_path / "flaky.h5", False, None)]
    assert time.monotonic() - began >= 1.0
    assert writer.counts() == {"written": 2, "fallback": 0, "failed": 0, "retries": 1}
    assert not (tmp_path / "fallback").exists()


def test_closing_sends_a_job_waiting_for_its_retry_to_the_fallback_at_once(
        geometry: SeriesGeometry, tmp_path: Path) -> None:
    results, fallback, tried = tmp_path / "results", tmp_path / "fallback", threading.Event()

    def write(folder: Path, start: SeriesStart, *_: Any) -> Path:
        if folder == results:
            tried.set()
            raise OSError(errno.EROFS, "Read-only file system")
        return folder / f"{start.series_id}.h5"

    writer = FinalWriter(results, write, fallback_folder=fallback, retry_delays_s=(60.0,))
    writer.start()
    writer.submit(final_job(geometry))
    assert tried.wait(5.0)
    began = time.monotonic()
    [outcome] = writer.close(5.0)
    assert time.monotonic() - began < 2.0  # the stop has a deadline (TimeoutStopSec): no 60 s wait
    assert outcome.fallback and outcome.path == fallback / "disk-1.h5"
    assert outcome.error == "OSError: [Errno 30] Read-only file system"
    assert writer.pending == 0 and writer.counts()["fallback"] == 1


def test_the_default_fallback_folder_is_in_the_runtime_directory_and_never_the_results(tmp_path: Path) -> None:
    assert default_fallback_folder({"RUNTIME_DIRECTORY": "/run/ptylive", "XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/ptylive/ptylive-fallback")
    assert default_fallback_folder({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/ptylive-fallback")
    assert default_fallback_folder({}).name.startswith("ptylive-fallback-")  # per user in the shared /tmp
    with pytest.raises(ValueError, match="is the results folder"):
        FinalWriter(tmp_path, fallback_folder=tmp_path)


def test_the_fallback_folder_is_configured_in_output() -> None:
    config = config_from_mapping({"output": {"folder": "/data", "fallback_folder": "/scratch/ptylive"}})
    assert config.output.fallback_folder == Path("/scratch/ptylive") and OutputConfig().fallback_folder is None
    with pytest.raises(ConfigError, match=r"'output.fallback_folder'; expected another folder than 'output.folder'"):
        OutputConfig(folder=Path("/data"), fallback_folder=Path("/data/"))
