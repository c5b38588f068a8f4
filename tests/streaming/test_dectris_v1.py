"""DECTRIS SIMPLON stream v1: the state machine over parts (multipart and single-part traffic, header_detail,
appendices, snake and flyback), malformed traffic counted by reason, and the ingest forwarding compressed blobs
that workers decode bit-exactly, to the same workers as ptylive stream v1."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from ptylive.streaming import dectris_v1 as v1
from ptylive.streaming.compression import compress
from ptylive.streaming.dectris_v1 import DectrisV1Decoder
from ptylive.streaming.inbox import WorkerInbox
from ptylive.streaming.ingest import Ingest, IngestSockets
from ptylive.streaming.protocol import Frame, ProtocolError, SeriesEnd, SeriesStart, decode, encode_frame
from ptylive.streaming.recording import Recorder, read_counts, read_parts
from ptylive.streaming.router import Router
from ptylive.streaming.scan_geometry import Optics, ScanGeometry, SeriesTemplate
from ptylive.streaming.stream_decoder import Decoded, PtyliveDecoder, StreamDecoder

ROWS, COLS, DETECTOR = 4, 5, (12, 10)
OPTICS = Optics(300e3, 20.0, 0.0, 1.0)
LOOPBACK = "tcp://127.0.0.1:0"


def template(**scan: Any) -> SeriesTemplate:
    return SeriesTemplate(ScanGeometry(scan.pop("rows", ROWS), scan.pop("cols", COLS), **scan), OPTICS)


def images(n: int = ROWS * COLS, dtype: Any = np.uint16) -> np.ndarray:
    return np.random.default_rng(1).poisson(5.0, (n, *DETECTOR)).astype(dtype)


def series(pixels: np.ndarray, encoding: str = "bslz4", detail: str = "basic", series_id: int = 7) -> list[list[bytes]]:
    return ([v1.header_message(series_id, detail, {"x_pixels_in_detector": DETECTOR[1]})]
            + [v1.image_message(series_id, k, frame, encoding) for k, frame in enumerate(pixels)]
            + [v1.end_message(series_id)])


def feed(decoder: StreamDecoder, messages: list[list[Any]], single_parts: bool = False
         ) -> tuple[list[Decoded], Counter[str]]:
    """Results of feeding ``messages`` (each part as its own message with ``single_parts``): decoded, errors."""
    decoded: list[Decoded] = []
    errors: Counter[str] = Counter()
    for message in messages:
        for chunk in ([[part] for part in message] if single_parts else [message]):
            for outcome in decoder.feed(chunk):
                if isinstance(outcome, ProtocolError):
                    errors[outcome.reason] += 1
                else:
                    decoded.append(outcome)
    return decoded, errors


def worker_frames(decoded: list[Decoded]) -> dict[int, np.ndarray]:
    """What a worker gets from the forwarded parts: frame index → decoded pixels."""
    frames = [decode(parts) for _, parts in decoded]
    return {f.frame_index: f.pixels for f in frames if isinstance(f, Frame)}


@pytest.mark.parametrize("detail", ["none", "basic", "all"])
@pytest.mark.parametrize("single_parts", [False, True])
@pytest.mark.parametrize("encoding", ["bslz4", "lz4_block", "raw"])
def test_a_series_decodes_bit_exactly(detail: str, single_parts: bool, encoding: str) -> None:
    pixels = images()
    decoded, errors = feed(DectrisV1Decoder(template()), series(pixels, encoding, detail), single_parts)
    assert not errors
    messages = [m for m, _ in decoded]
    assert isinstance(messages[0], SeriesStart) and messages[0].series_id == "7"
    assert messages[0].detector_shape == DETECTOR and messages[0].dtype == "uint16"
    assert messages[-1] == SeriesEnd("7", ROWS * COLS)
    frames = worker_frames(decoded)
    assert sorted(frames) == list(range(ROWS * COLS))
    for index, frame in frames.items():
        assert frame.dtype == np.uint16 and frame.tobytes() == pixels[index].tobytes()
    forwarded = [parts for m, parts in decoded if isinstance(m, Frame)]
    expected = "raw" if encoding == "raw" else encoding
    assert all(decode(parts).encoding == expected for parts in forwarded)  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_bslz4_at_every_bit_depth(dtype: Any) -> None:
    pixels = images(ROWS * COLS, dtype)
    decoded, errors = feed(DectrisV1Decoder(template()), series(pixels))
    assert not errors
    for index, frame in worker_frames(decoded).items():
        assert frame.dtype == dtype and frame.tobytes() == pixels[index].tobytes()


def test_blobs_are_forwarded_as_received() -> None:
    message = v1.image_message(7, 0, images(1)[0])
    decoded, _ = feed(DectrisV1Decoder(template()), [message])
    assert decoded[-1][1][1] is message[2]  # the very blob object: no copy on rank 0


def test_snake_and_flyback_images_land_on_their_positions() -> None:
    scan = ScanGeometry(ROWS, COLS, snake=True, flyback_frames=2)
    pixels = images(scan.n_images)
    decoded, errors = feed(DectrisV1Decoder(template(snake=True, flyback_frames=2)), series(pixels))
    assert not errors
    frames = worker_frames(decoded)
    index = scan.position_indices(np.arange(scan.n_images))
    assert sorted(frames) == list(range(ROWS * COLS))
    for image in np.flatnonzero(index >= 0):
        np.testing.assert_array_equal(frames[int(index[image])], pixels[image])
    assert decoded[-1][0] == SeriesEnd("7", ROWS * COLS)


def test_appendices_are_skipped_in_both_framings() -> None:
    pixels = images(3)
    header = v1.header_message(7) + [b"user data"]
    image = v1.image_message(7, 0, pixels[0]) + [json.dumps({"sample": "PbTiO3"}).encode()]
    for single_parts in (False, True):
        decoder = DectrisV1Decoder(template())
        decoded, errors = feed(decoder, [header, image, v1.image_message(7, 1, pixels[1])], single_parts)
        assert not errors and sorted(worker_frames(decoded)) == [0, 1]
        assert decoder.counts["appendices"] == 2


def test_malformed_traffic_is_counted_by_reason_and_the_stream_goes_on() -> None:
    pixels = images(12)
    good = [v1.image_message(7, k, pixels[k]) for k in range(12)]
    blob = compress(pixels[0], "bslz4")
    data = json.loads(good[0][1])
    bad = {
        "unknown_htype": [[json.dumps({"htype": "dfoo-1.0", "series": 7}).encode()]],
        "missing_parts": [good[1][:2]],  # dimage + dimage_d, then the next image begins
        "payload_size": [[good[2][0], json.dumps({**data, "size": 5}).encode(), blob, good[2][3]]],
        "corrupt_payload": [[good[3][0], json.dumps({**data, "size": 20}).encode(), blob[:20], good[3][3]]],
        "not_json": [[good[4][0], b"\x00garbage", blob, good[4][3]]],
        "unsupported_encoding": [[good[5][0], json.dumps({**data, "encoding": "zstd<"}).encode(), blob, good[5][3]]],
        "bad_field": [[good[6][0], json.dumps({**data, "type": "uint32", "size": None}).encode(), blob, good[6][3]]],
    }
    raw_wrong = v1.image_message(7, 7, pixels[7], "raw")
    bad["payload_size"].append(raw_wrong[:2] + [raw_wrong[2][:-2]] + raw_wrong[3:])
    messages = [v1.header_message(7)] + [m for kind in bad.values() for m in kind] + good[8:] + [v1.end_message(7)]
    for single_parts in (False, True):
        decoded, errors = feed(DectrisV1Decoder(template()), messages, single_parts)
        assert errors == Counter({reason: len(kinds) for reason, kinds in bad.items()}), errors
        assert sorted(worker_frames(decoded)) == [8, 9, 10, 11]  # every good image after the bad ones
        assert decoded[-1][0] == SeriesEnd("7", 4)


def test_a_series_without_header_starts_with_its_first_image() -> None:
    decoded, errors = feed(DectrisV1Decoder(template()), [v1.image_message(3, 0, images(1)[0]), v1.end_message(3)])
    assert not errors and [type(m).__name__ for m, _ in decoded] == ["SeriesStart", "Frame", "SeriesEnd"]


# ---------------------------------------------------------------------------------------- through the ingest


def halves(positions_A: np.ndarray) -> np.ndarray:
    return (positions_A[:, 1] > (COLS - 1) / 2).astype(np.int32)


def run_ingest(decoder: StreamDecoder, messages: list[list[Any]], record_to: Any = None,
               single_parts: bool = False, n_series: int = 1) -> tuple[list[list[Frame]], dict[str, Any]]:
    """Send ``messages`` through an Ingest with ``decoder`` to two WorkerInboxes; their frames (once each worker
    has seen ``n_series`` series ends) and the snapshot."""
    context = zmq.Context()
    ingest = Ingest(IngestSockets(LOOPBACK, (LOOPBACK, LOOPBACK)), lambda start: Router(halves, 2), context=context,
                    decoder=decoder, recorder=Recorder.open(record_to))
    inboxes = [WorkerInbox(endpoint, context) for endpoint in ingest.worker_endpoints]
    push = context.socket(zmq.PUSH)
    try:
        ingest.start()
        push.connect(ingest.endpoint)
        for message in messages:
            for chunk in ([[part] for part in message] if single_parts else [message]):
                push.send_multipart(chunk)
        received: list[list[Frame]] = [[], []]
        for worker, inbox in enumerate(inboxes):
            deadline, ends = time.monotonic() + 10, 0
            while ends < n_series:
                batch = inbox.poll(50)
                received[worker] += [m for m in batch if isinstance(m, Frame)]
                ends += sum(isinstance(m, SeriesEnd) for m in batch)
                assert time.monotonic() < deadline, "not every series end reached the worker"
        ingest.join(5)
        return received, ingest.snapshot()
    finally:
        push.close(0)
        ingest.close()
        for inbox in inboxes:
            inbox.close()
        context.term()


def ptylive_messages(start: SeriesStart, pixels: np.ndarray) -> Iterator[list[Any]]:
    from ptylive.streaming.protocol import encode_series_end, encode_series_start

    yield encode_series_start(start)
    for k, frame in enumerate(pixels):
        yield encode_frame(start.series_id, k, frame)
    yield encode_series_end(start.series_id, len(pixels))


def test_through_the_ingest_workers_get_the_same_frames_as_with_ptylive_stream_v1(tmp_path: Any) -> None:
    pixels = images()
    corrupt = v1.image_message(7, 3, pixels[3])
    corrupt[2] = corrupt[2][:-4]  # a broken block chain (its size field agrees): caught on rank 0
    corrupt[1] = json.dumps({**json.loads(corrupt[1]), "size": len(corrupt[2])}).encode()
    messages = series(pixels)
    messages.insert(2, [json.dumps({"htype": "dbogus-1.0"}).encode()])
    messages.insert(5, corrupt)
    recording = tmp_path / "dectris.zmq"
    dectris, snapshot = run_ingest(DectrisV1Decoder(template()), messages, recording, single_parts=True)
    start = template().start("7", DETECTOR, "uint16")
    reference, _ = run_ingest(PtyliveDecoder(), list(ptylive_messages(start, pixels)))
    for worker in range(2):
        assert sorted(f.frame_index for f in dectris[worker]) == sorted(f.frame_index for f in reference[worker])
        assert all(f.encoding == "bslz4" for f in dectris[worker])
        for frame in dectris[worker]:  # decoded on the worker, bit for bit what the detector measured
            assert frame.pixels.tobytes() == pixels[frame.frame_index].tobytes()
    registry = snapshot["registry"]
    assert registry["rejected"]["unknown_htype"] == 1 and registry["rejected"]["corrupt_payload"] == 1
    assert registry["finished"][-1]["received"] == ROWS * COLS
    parts = [part for message in messages for part in message]
    assert list(read_parts(recording)) == parts and read_counts(recording) == [1] * len(parts)
    assert snapshot["recording"]["parts"] == len(parts) and snapshot["decoder"]["dimage-1.0"] == ROWS * COLS + 1


def test_a_detector_number_used_again_after_a_controller_restart_runs_under_a_fresh_id() -> None:
    """DECTRIS controllers number series from 1 again after a restart. The second series 7 (the first has
    finished) must not be refused as a duplicate (its data lost): the ingest names it ``7.1``; the workers get
    every frame of both, and each end closes its own series."""
    pixels = images()
    received, snapshot = run_ingest(DectrisV1Decoder(template()),
                                    series(pixels) + series(pixels) + series(pixels, series_id=8), n_series=3)
    frames: dict[str, list[int]] = {}
    for frame in received[0] + received[1]:
        frames.setdefault(frame.series_id, []).append(frame.frame_index)
    assert {k: sorted(v) for k, v in frames.items()} == {s: list(range(ROWS * COLS)) for s in ("7", "7.1", "8")}
    registry = snapshot["registry"]
    assert registry["starts"]["duplicate_id"] == 0
    assert [(s["series_id"], s["received"]) for s in registry["finished"]] == [
        ("7", ROWS * COLS), ("7.1", ROWS * COLS), ("8", ROWS * COLS)]


def test_the_decoder_names_a_series_by_its_fresh_id_and_matches_images_and_end_by_the_detectors_number() -> None:
    decoder = DectrisV1Decoder(template())
    decoder.fresh_id = lambda number: f"{number}.2"
    decoded, errors = feed(decoder, series(images(3), series_id=4))
    headless, _ = feed(decoder, [v1.image_message(5, 0, images(1)[0]), v1.end_message(5)])
    assert not errors
    assert [(type(m).__name__, m.series_id) for m, _ in decoded + headless] == (
        [("SeriesStart", "4.2")] + [("Frame", "4.2")] * 3 + [("SeriesEnd", "4.2")]
        + [("SeriesStart", "5.2"), ("Frame", "5.2"), ("SeriesEnd", "5.2")])
