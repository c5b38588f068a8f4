"""ptylive stream v1: round trips, every rejection reason, and fuzzed input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.streaming.protocol import (
    MAX_HEADER_BYTES,
    REJECT_REASONS,
    V1_REJECT_REASONS,
    Frame,
    ProtocolError,
    SeriesEnd,
    SeriesStart,
    decode,
    encode_frame,
    encode_series_end,
    encode_series_start,
)

START = SeriesStart(series_id="s1", scan_shape=(4, 5), scan_step_A=(0.4, 0.5), detector_shape=(16, 16),
                    dtype="uint16", energy_eV=200e3, convergence_semiangle_mrad=25.0, defocus_A=40.0,
                    detector_pixel_mrad=2.0, overrides={"iterations": 10})


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def test_series_start_round_trip() -> None:
    decoded = decode(encode_series_start(START))
    assert decoded == START and decoded.n_positions == 20
    positions = np.arange(40, dtype=float).reshape(20, 2) * 0.25
    explicit = SeriesStart(**{**START.__dict__, "positions_A": positions})
    again = decode(encode_series_start(explicit))
    assert again == explicit and hash(again) == hash(explicit) and again.n_positions == 20
    np.testing.assert_array_equal(np.asarray(again.positions_A), positions)


def test_big_endian_frames_arrive_with_their_values() -> None:
    pixels = np.arange(16, dtype=">u2").reshape(4, 4) * 300
    frame = decode([bytes(p) for p in encode_frame("s", 0, pixels)])
    np.testing.assert_array_equal(frame.pixels, pixels)


def test_many_explicit_positions_fit_a_series_start() -> None:
    positions = np.random.default_rng(0).uniform(0, 100, size=(200 * 200, 2))
    start = SeriesStart(**{**START.__dict__, "scan_shape": (200, 200), "positions_A": positions})
    assert decode(encode_series_start(start)).n_positions == 40000


def test_frame_round_trip_is_zero_copy_view() -> None:
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    parts = encode_frame("s1", 7, pixels, position_A=(1.5, -2.0))
    frame = decode([bytes(parts[0]), bytearray(parts[1])])
    assert isinstance(frame, Frame) and frame.frame_index == 7 and frame.position_A == (1.5, -2.0)
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert not frame.pixels.flags.writeable
    assert decode(encode_series_end("s1", 20)) == SeriesEnd("s1", 20)


def frame_header(**changes: object) -> dict:
    header = {"htype": "frame", "series_id": "s1", "frame_index": 0, "shape": [4, 4], "dtype": "uint16",
              "encoding": "raw"}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


PAYLOAD = np.zeros((4, 4), np.uint16).tobytes()
CASES = [
    ([b"a", b"b", b"c"], "parts"),
    ([pack(frame_header())], "parts"),
    ([pack({"htype": "series_end", "series_id": "x" * MAX_HEADER_BYTES, "n_frames": 1})], "header_too_large"),
    ([b"\xc1"], "not_msgpack"),
    ([pack([1, 2])], "not_a_map"),
    ([pack({"htype": "nope"})], "unknown_htype"),
    ([pack(frame_header(frame_index=None)), PAYLOAD], "missing_field"),
    ([pack(frame_header(frame_index=-1)), PAYLOAD], "bad_field"),
    ([pack(frame_header(frame_index=True)), PAYLOAD], "bad_field"),
    ([pack(frame_header(dtype="object")), PAYLOAD], "bad_field"),
    ([pack(frame_header(shape=[4])), PAYLOAD], "bad_field"),
    ([pack(frame_header(encoding="zstd")), PAYLOAD], "unsupported_encoding"),
    ([pack(frame_header(encoding="bslz4")), PAYLOAD], "corrupt_payload"),  # no bitshuffle header
    ([pack(frame_header()), PAYLOAD[:-2]], "payload_size"),
    ([pack(frame_header(shape=[5000, 1])), PAYLOAD], "too_large"),
    ([pack(frame_header(position_A=[float("nan"), 0.0])), PAYLOAD], "bad_field"),
    ([pack(frame_header(position_A=3.5)), PAYLOAD], "bad_field"),
    ([pack({"htype": "series_start", "version": 2})], "version"),
    ([pack({"htype": "series_end", "series_id": "s1"})], "missing_field"),
]


@pytest.mark.parametrize("parts, reason", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_rejection_names_its_reason(parts: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    assert info.value.reason == reason


def test_every_reason_is_exercised() -> None:
    assert {reason for _, reason in CASES} == set(V1_REJECT_REASONS)  # the DECTRIS ones: tests/streaming/test_dectris_*


def test_bad_series_start_fields() -> None:
    good = msgpack.unpackb(encode_series_start(START)[0])
    for path, value in ((("optics", "energy_eV"), -1.0), (("detector", "dtype"), "complex64"),
                        (("scan_shape",), [0, 4]), (("positions_A",), [[1.0, 2.0, 3.0]]),
                        (("positions_A",), [[True, 1.0]] * 20), (("positions_A",), [[1.0, 2.0]] * 5)):
        header = msgpack.unpackb(encode_series_start(START)[0])
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ProtocolError) as info:
            decode([pack(header)])
        assert info.value.reason == "bad_field", path
    assert decode([pack(good)]) == START


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=256), min_size=0, max_size=3))
def test_arbitrary_bytes_either_decode_or_raise_protocol_error(parts: list[bytes]) -> None:
    try:
        decode(parts)
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["frame", "series_start", "series_end"]),
       st.dictionaries(st.sampled_from(["series_id", "frame_index", "shape", "dtype", "encoding", "position_A",
                                        "version", "scan_shape", "scan_step_A", "detector", "optics", "n_frames",
                                        "positions_A", "reconstruction"]), json_values, max_size=8),
       st.binary(max_size=64))
def test_fuzzed_headers_never_raise_anything_else(htype: str, fields: dict, payload: bytes) -> None:
    parts = [pack({"htype": htype, **fields})] + ([payload] if htype == "frame" else [])
    try:
        decode(parts)
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS
