"""``ptylive serve`` when the sender dies without ``series_end``: the series ends ``incomplete`` and is written.

Issue 12's row "sender dies without series_end": the series stayed current for ever, and the next complete
series was only written at SIGTERM. Here a start and the first 40 frames arrive, then nothing; after
``[ingest] idle_timeout_s`` (2 s) the series ends as ``incomplete``, its file holds the 40 frames it got, and
the next series, streamed in full, is written ``complete``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zmq

from ptylive.streaming import protocol
from ptylive.streaming.fake_detector import ScanSource
from tests.daemon.serve_harness import daemon_config, get_json, read_final, registry_series, serving, stream

pytestmark = [pytest.mark.mpi, pytest.mark.chaos]

SENT = 40
IDLE_TIMEOUT_S = 2.0


def test_a_series_whose_sender_goes_quiet_is_written_incomplete_and_the_next_completes(
        tmp_path: Path, dosed_scan: Path) -> None:
    config = daemon_config(tmp_path / "results", final_iterations=2)
    config = dataclasses.replace(config, ingest=dataclasses.replace(config.ingest, idle_timeout_s=IDLE_TIMEOUT_S))
    source = ScanSource.from_file(dosed_scan)
    quiet = dataclasses.replace(source.start, series_id="sender-died", dtype="uint16")
    frames = np.clip(np.rint(source.read(np.arange(SENT))), 0, 65535).astype(np.uint16)
    with serving(config, tmp_path) as (process, listener):
        with zmq.Context() as context, context.socket(zmq.PUSH) as push:
            push.connect(process.endpoints["ingest"])
            push.send_multipart(protocol.encode_series_start(quiet))
            for k, pixels in enumerate(frames):
                push.send_multipart(protocol.encode_frame(quiet.series_id, k, pixels))
            push.setsockopt(zmq.LINGER, 5000)  # every frame delivered before the sender "dies" (closes)
        final = listener.wait_final("sender-died", timeout_s=60.0)
        assert final["status"] == "incomplete", final
        written = read_final(final["path"])
        assert written["attrs"]["status"] == "incomplete"
        assert int(np.count_nonzero(written["received"])) == SENT  # every frame it got is in the file
        stream(process, source, series_id="next", dtype="uint16")
        assert listener.wait_final("next")["status"] == "complete"
        status = get_json(process.endpoints["http"] + "status")
        record = registry_series(status, "sender-died")
        assert record["received"] == SENT and record["missing"] == source.start.n_positions - SENT
