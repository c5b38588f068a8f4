"""DECTRIS SIMPLON stream v2: CBOR messages built with cbor2 (multi-channel, typed arrays, tag 40, compression
tag 56500) decode bit-exactly; malformed messages are counted by reason."""

from __future__ import annotations

from collections import Counter
from typing import Any

import cbor2
import numpy as np
import pytest

from ptylive.streaming import dectris_v2 as v2
from ptylive.streaming.compression import compress
from ptylive.streaming.decoders import make_decoder
from ptylive.streaming.dectris_v2 import DectrisV2Decoder
from ptylive.streaming.protocol import Frame, ProtocolError, SeriesEnd, SeriesStart, decode
from ptylive.streaming.scan_geometry import Optics, ScanGeometry, SeriesTemplate

TEMPLATE = SeriesTemplate(ScanGeometry(2, 3), Optics(300e3, 20.0, 0.0, 1.0))
SHAPE = (14, 9)  # rows, cols: not square in the test, so a transposition would show


def channels(dtype: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = min(np.iinfo(dtype).max, 5000)
    return {name: rng.integers(0, high, SHAPE).astype(dtype) for name in ("threshold_1", "threshold_2")}


def run(decoder: DectrisV2Decoder, messages: list[bytes]) -> tuple[list[Any], Counter[str]]:
    out, errors = [], Counter[str]()
    for message in messages:
        for outcome in decoder.feed([message]):
            if isinstance(outcome, ProtocolError):
                errors[outcome.reason] += 1
            else:
                out.append(outcome)
    return out, errors


@pytest.mark.parametrize("compression", ["bslz4", "lz4", None])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("channel", ["", "threshold_2"])
def test_multichannel_series_decode_bit_exactly(compression: str | None, dtype: Any, channel: str) -> None:
    data = [channels(dtype, seed) for seed in range(6)]
    messages = ([v2.start_message(11, ["threshold_1", "threshold_2"], SHAPE, 6)]
                + [v2.image_message(11, k, data[k], compression) for k in range(6)] + [v2.end_message(11)])
    decoded, errors = run(DectrisV2Decoder(TEMPLATE, channel), messages)
    assert not errors
    start, end = decoded[0][0], decoded[-1][0]
    assert isinstance(start, SeriesStart) and start.detector_shape == SHAPE and start.dtype == np.dtype(dtype).name
    assert end == SeriesEnd("11", 6)
    frames = [decode(parts) for message, parts in decoded if isinstance(message, Frame)]
    assert [f.frame_index for f in frames] == list(range(6))  # type: ignore[union-attr]
    for frame in frames:
        assert isinstance(frame, Frame) and frame.encoding == (compression or "raw")
        truth = data[frame.frame_index][channel or "threshold_1"]
        assert frame.pixels.dtype == truth.dtype and frame.pixels.tobytes() == truth.tobytes()


def test_hand_built_cbor_with_the_self_described_tag_and_a_big_endian_raw_array() -> None:
    pixels = np.arange(SHAPE[0] * SHAPE[1], dtype=">u2").reshape(SHAPE)
    typed = cbor2.CBORTag(65, pixels.tobytes())  # RFC 8746: uint16 big-endian
    message = cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 1, "image_id": 0,
                                                "data": {"c": cbor2.CBORTag(40, [list(SHAPE), typed])}}))
    decoded, errors = run(DectrisV2Decoder(TEMPLATE), [message])
    frame = decode(decoded[-1][1])
    assert not errors and isinstance(frame, Frame)
    np.testing.assert_array_equal(frame.pixels, pixels.astype("<u2"))


def tagged(payload: Any, tag: int = 69, dims: Any = None) -> cbor2.CBORTag:
    return cbor2.CBORTag(40, [dims or list(SHAPE), cbor2.CBORTag(tag, payload)])


def image(data: Any, **fields: Any) -> bytes:
    return cbor2.dumps({"type": "image", "series_id": 11, "image_id": 0, "data": data, **fields})


def test_malformed_messages_are_counted_by_reason() -> None:
    pixels = channels(np.uint16)["threshold_1"]
    blob = compress(pixels, "bslz4")
    bad = {
        "not_cbor": [b"\xff\x00\x01", b""],
        "unknown_htype": [cbor2.dumps({"type": "preview", "series_id": 11})],
        "not_a_map": [cbor2.dumps([1, 2, 3])],
        "missing_field": [cbor2.dumps({"type": "image", "series_id": 11, "data": {}}),
                          image({"threshold_1": tagged(pixels.tobytes())}, image_id=None)],
        "payload_size": [image({"t": tagged(pixels.tobytes()[:-2])})],
        "corrupt_payload": [image({"t": tagged(cbor2.CBORTag(56500, ["bslz4", 2, blob[:-9]]))}),
                            image({"t": tagged(cbor2.CBORTag(56500, ["lz4", 0, b"\0" * 40]))})],
        "unsupported_encoding": [image({"t": tagged(cbor2.CBORTag(56500, ["zstd", 0, blob]))}),
                                 image({"t": tagged(pixels.tobytes(), tag=87)})],  # float128
        "bad_field": [image({"t": tagged(cbor2.CBORTag(56500, ["bslz4", 4, blob]))}),  # element size 4 for uint16
                      image({"t": tagged(pixels.tobytes(), dims=[SHAPE[0]])}),
                      image({"t": pixels.tobytes()})],  # no tag 40
        "parts": [],
    }
    decoder = DectrisV2Decoder(TEMPLATE)
    _, errors = run(decoder, [m for kind in bad.values() for m in kind])
    assert errors == Counter({reason: len(kinds) for reason, kinds in bad.items() if kinds})
    assert [type(e).__name__ for e in decoder.feed([b"a", b"b"])] == ["ProtocolError"]
    decoded, errors = run(decoder, [v2.image_message(11, 0, {"t": pixels})])  # still decoding
    assert not errors and np.array_equal(decode(decoded[-1][1]).pixels, pixels)  # type: ignore[union-attr]


def test_a_missing_channel_is_named() -> None:
    decoder = make_decoder("dectris_v2", _settings(), channel="threshold_9")
    (error,) = decoder.feed([v2.image_message(1, 0, channels(np.uint16))])
    assert isinstance(error, ProtocolError) and error.reason == "missing_field" and "threshold_9" in str(error)


def _settings() -> Any:
    from ptylive.daemon.service.config import ScanConfig

    return ScanConfig(rows=2, cols=3)


def test_the_decoder_names_a_series_by_its_fresh_id_and_matches_images_and_end_by_the_detectors_number() -> None:
    """The ingest gives a reused series number a fresh id (``SeriesBook.fresh_id``); images and the end, which
    carry the detector's number, belong to that series, and their forwarded parts carry the fresh id."""
    decoder = DectrisV2Decoder(TEMPLATE)
    decoder.fresh_id = lambda number: f"{number}.1"
    data = [channels(np.uint16, seed) for seed in range(6)]
    messages = ([v2.start_message(11, ["threshold_1", "threshold_2"], SHAPE, 6)]
                + [v2.image_message(11, k, data[k], "bslz4") for k in range(6)] + [v2.end_message(11)])
    decoded, errors = run(decoder, messages)
    assert not errors
    assert decoded[0][0].series_id == "11.1" and decoded[-1][0] == SeriesEnd("11.1", 6)
    assert {decode(parts).series_id for message, parts in decoded if isinstance(message, Frame)} == {"11.1"}
