"""The stop vote of ``ptylive reconstruct`` without MPI: one vote per mini-batch, cast where the module says,
and a one-rank run stopped by a real SIGTERM writes the result so far."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from ptylive.daemon.cli.main import main as cli_main
from ptylive.daemon.cli.offline import run_job, validate
from ptylive.daemon.cli.offline_stop import AgreedStop, IterationVote, StopRequested, StopSignals
from ptylive.daemon.engine.exchange.protocols import NullExchanger
from ptylive.daemon.engine.options import EngineOptions

pytestmark = pytest.mark.chaos


class CountingExchanger(NullExchanger):
    def __init__(self) -> None:
        super().__init__()
        self.maxes: list[float] = []
        self.halo_exchanges = 0

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        self.maxes.append(float(values[0]))
        return np.asarray(values)

    def reduce_gradients(self, gradient: Any, illumination: Any) -> tuple[Any, Any]:
        self.halo_exchanges += 1
        return gradient, illumination


def test_an_unsignalled_rank_votes_once_per_mini_batch_before_the_halo_exchange() -> None:
    inner, signals = CountingExchanger(), StopSignals()
    agreed = AgreedStop(inner, signals)
    for _ in range(3):
        for _chunk in range(5):
            agreed.between_batches()
        agreed.reduce_gradients(None, None)
    assert inner.maxes == [0.0, 0.0, 0.0] and inner.halo_exchanges == 3 and agreed.votes == 3


def test_a_signalled_rank_votes_at_the_next_chunk_and_stops_before_the_exchange() -> None:
    inner, signals = CountingExchanger(), StopSignals()
    agreed = AgreedStop(inner, signals)
    agreed.between_batches()
    signals.request(signal.SIGTERM)
    with pytest.raises(StopRequested, match="SIGTERM"):
        agreed.between_batches()
    assert inner.maxes == [1.0] and inner.halo_exchanges == 0


def test_only_the_first_signal_counts() -> None:
    signals = StopSignals()
    signals.request(signal.SIGINT)
    signals.request(signal.SIGTERM)
    assert signals.signal_name == "SIGINT"


def test_the_async_vote_is_cast_after_every_iteration_but_the_last() -> None:
    signals = StopSignals()
    vote = IterationVote(None, signals, iterations=3, while_waiting=lambda _: None)
    vote(0)
    vote(1)
    signals.request(signal.SIGTERM)
    vote(2)  # the last iteration ended: the run is complete, no vote
    assert vote.votes == 2
    with pytest.raises(StopRequested):
        vote(1)


def test_handlers_are_restored_after_the_run() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals().installed() as signals:
        assert signal.getsignal(signal.SIGTERM) == signals.request
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("votes") / "scan.h5"
    assert cli_main(["simulate", str(path), "--detector-px", "32", "--detector-pixel-mrad", "3.0", "--slices", "3",
                     "--scan", "14", "10", "--step-px", "2"]) == 0
    return path


def test_one_rank_stopped_by_sigterm_writes_the_iterations_done(scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    options = EngineOptions(iterations=100_000, batch_size=4)
    job = validate(scan, out, 1, None, None, None, "single", "numpy", options, quiet=True)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        run_job(job, None)  # returns only because of the signal: 100 000 iterations take hours
    finally:
        timer.cancel()
    with h5py.File(out) as f:
        attrs, loss = dict(f.attrs), f["loss"][...]
    assert attrs["status"] == "interrupted" and attrs["stop_signal"] == "SIGTERM"
    assert 0 < attrs["iterations"] == len(loss) < 100_000 and attrs["iterations_requested"] == 100_000


def test_a_complete_run_says_so(scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    job = validate(scan, out, 1, None, None, None, "single", "numpy", EngineOptions(iterations=2), quiet=True)
    run_job(job, None)
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and f.attrs["iterations"] == 2 and "stop_signal" not in f.attrs
