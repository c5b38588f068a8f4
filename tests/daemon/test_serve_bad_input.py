"""Bad input against the running daemon, fuzzed with hypothesis: counted by reason, nothing else lost.

A valid series ("fuzzed", float32 frames) is live while hypothesis throws batches of malformed or
misdirected messages at the ingest. Each batch must be counted exactly, by reason, while the daemon
keeps serving; afterwards the series' reconstruction must have used exactly its valid frames.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptylive.daemon.service.process import ServeProcess
from ptylive.gpu.quality import phase_correlation
from ptylive.streaming import protocol
from ptylive.streaming.fake_detector import ScanSource
from ptylive.streaming.scanfile import read_optional, read_positions
from tests.daemon.serve_harness import PreviewListener, get_json, read_final, registry_series, series_count, wait_for
from tests.daemon.test_serve import group_sizes

pytestmark = [pytest.mark.mpi, pytest.mark.chaos]

SERIES = "fuzzed"
D = 48


def _frame(series_id: str = SERIES, payload: bytes | None = None, **changes: Any) -> list[bytes]:
    header = {"htype": "frame", "series_id": series_id, "frame_index": 0, "shape": [D, D], "dtype": "float32",
              "encoding": "raw", **changes}
    return [msgpack.packb(header), np.zeros((D, D), np.float32).tobytes() if payload is None else payload]


def _without(key: str) -> list[bytes]:
    parts = _frame()
    header = msgpack.unpackb(parts[0])
    del header[key]
    return [msgpack.packb(header), parts[1]]


def bad_messages(n_frames: int) -> st.SearchStrategy[tuple[list[bytes], str]]:
    """(message parts, the reason it must be counted under); none of them is a valid frame of SERIES."""
    index = st.integers(0, n_frames - 1)
    nan_frame = np.zeros((D, D), np.float32)
    nan_frame[3, 5] = np.nan
    return st.one_of(
        st.binary(max_size=40).map(lambda b: ([b"\xc1" + b], "not_msgpack")),
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.lists(st.booleans(), max_size=3)).map(
            lambda v: ([msgpack.packb(v)], "not_a_map")),
        st.text(max_size=12).filter(lambda t: t not in ("frame", "series_start", "series_end")).map(
            lambda t: ([msgpack.packb({"htype": t})], "unknown_htype")),
        index.map(lambda i: (_frame(frame_index=i)[:1], "parts")),  # truncated multipart
        st.integers(0, D * D * 4 - 1).map(lambda k: (_frame(payload=bytes(k)), "payload_size")),
        st.sampled_from(["frame_index", "series_id", "shape", "dtype"]).map(lambda k: (_without(k), "missing_field")),
        index.map(lambda i: (_frame(frame_index=i, position_A=[float("nan"), 0.0]), "bad_field")),
        st.integers(n_frames, 2**31 - 1).map(lambda i: (_frame(frame_index=i), "index_out_of_range")),
        index.map(lambda i: (_frame(frame_index=i, dtype="uint16", payload=bytes(D * D * 2)), "dtype_mismatch")),
        index.map(lambda i: (_frame(frame_index=i, shape=[D - 1, D], payload=bytes((D - 1) * D * 4)),
                             "shape_mismatch")),
        index.map(lambda i: (_frame(frame_index=i, payload=nan_frame.tobytes()), "non_finite")),
        index.map(lambda i: (_frame(frame_index=i, position_A=[1e6, -1e6]), "position_outside")),
        st.text(min_size=1, max_size=8).map(lambda s: (_frame(series_id="nobody-" + s), "unknown_series")),
    )


def rejected(url: str) -> Counter[str]:
    return Counter(get_json(url + "status")["ingest"]["registry"]["rejected"])


def test_bad_input_is_counted_by_reason_and_the_valid_frames_reconstruct_alone(
        daemon: tuple[ServeProcess, PreviewListener], dosed_scan: Path) -> None:
    process, listener = daemon
    url = process.endpoints["http"]
    source = ScanSource.from_file(dosed_scan)
    n = source.n_frames
    frames = np.ascontiguousarray(source.read(np.arange(n)), dtype=np.float32)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(process.endpoints["ingest"])
    try:
        start = dataclasses.replace(source.start, series_id=SERIES, dtype="float32")
        push.send_multipart(protocol.encode_series_start(start))
        for i in range(0, n, 2):  # half of the valid frames first
            push.send_multipart(protocol.encode_frame(SERIES, i, frames[i]))
        wait_for(lambda: series_count(url, SERIES, "received") == n // 2, 30, "half the frames")
        sent: Counter[str] = Counter()

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(bad_messages(n), min_size=1, max_size=6))
        def send_batch(batch: list[tuple[list[bytes], str]]) -> None:
            before = rejected(url)
            for parts, _ in batch:
                push.send_multipart(parts)
            expected = Counter(reason for _, reason in batch)
            wait_for(lambda: rejected(url) - before == expected, 10, f"counts {dict(expected)}")
            sent.update(expected)

        send_batch()
        for i in range(1, n, 2):
            push.send_multipart(protocol.encode_frame(SERIES, i, frames[i]))
        for i in (0, 1, 7):  # duplicates: counted, not used twice
            push.send_multipart(protocol.encode_frame(SERIES, i, frames[i]))
        push.send_multipart(protocol.encode_series_end(SERIES, n))
        final = listener.wait_final(SERIES)
        for i in (2, 3):  # late frames
            push.send_multipart(protocol.encode_frame(SERIES, i, frames[i]))
        wait_for(lambda: series_count(url, SERIES, "rejected", "finished_series") == 2, 10,
                 "late frames counted")
    finally:
        push.close(linger=0)
        context.term()

    record = registry_series(get_json(url + "status"), SERIES)
    assert record["received"] == n and record["duplicated"] == 3 and record["missing"] == 0
    series_reasons = ("index_out_of_range", "dtype_mismatch", "shape_mismatch", "non_finite", "position_outside")
    assert {r: record["rejected"][r] for r in series_reasons} == {r: sent[r] for r in series_reasons}
    result = read_final(final["path"])
    assert result["received"].all() and list(result["ranks/frames_received"]) == group_sizes(source, SERIES)
    # The probe is normalised (Σ|P|² = 1) and its aperture lies inside the detector, so the model's power per
    # frame of a vacuum object is 1 and the fitted scale is the mean counts per valid frame.
    expected_scale = float(frames.astype(np.float64).sum()) / n
    assert result["attrs"]["detector_scale"] == pytest.approx(expected_scale, rel=1e-5)
    truth = read_optional(dosed_scan, "object_truth")
    assert phase_correlation(result["object"], truth, read_positions(dosed_scan)) >= 0.9
