"""Compressed payloads: bit-exact round trips, agreement with the bitshuffle package's own format, and corrupt
input that raises CompressionError instead of crashing the interpreter."""

from __future__ import annotations

import bitshuffle
import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptylive.streaming.compression import (
    COMPRESSED,
    HEADER,
    CompressionError,
    bslz4_block_elements,
    check_framing,
    compress,
    decompress,
)
from ptylive.streaming.protocol import Frame, ProtocolError, decode, encode_frame

SHAPES = [(1, 1), (3, 5), (7, 9), (96, 96), (257, 251)]  # odd sizes leave bitshuffle leftovers
DTYPES = [np.uint8, np.uint16, np.uint32, np.int32, np.float32, np.float64]


def counts(shape: tuple[int, int], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(3.0, shape).astype(dtype)


@pytest.mark.parametrize("encoding", COMPRESSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(encoding: str, dtype: type) -> None:
    for shape in SHAPES:
        pixels = counts(shape, dtype)
        payload = compress(pixels, encoding)
        check_framing(payload, encoding, pixels.nbytes, pixels.itemsize)
        decoded = decompress(payload, encoding, shape, dtype)
        assert decoded.dtype == np.dtype(dtype) and decoded.tobytes() == pixels.tobytes()


def test_bslz4_is_the_bitshuffle_hdf5_framing() -> None:
    """Our blob = 12-byte header (raw size, block bytes; big-endian) + what bitshuffle.compress_lz4 writes, so
    the bitshuffle package's own decoder reads it (on valid input only: it trusts the framing)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        pixels = counts((96, 97), dtype)
        block = bslz4_block_elements(pixels.itemsize)
        payload = compress(pixels, "bslz4")
        assert HEADER.unpack_from(payload) == (pixels.nbytes, block * pixels.itemsize)
        assert payload[12:] == bitshuffle.compress_lz4(pixels.reshape(-1), block).tobytes()
        reference = bitshuffle.decompress_lz4(np.frombuffer(payload[12:], np.uint8), pixels.shape, pixels.dtype, block)
        np.testing.assert_array_equal(reference, pixels)


def test_a_foreign_bslz4_block_size_is_read_from_the_header() -> None:
    pixels = counts((40, 40), np.uint16)
    body = bitshuffle.compress_lz4(pixels.reshape(-1), 256).tobytes()  # not our default block
    payload = HEADER.pack(pixels.nbytes, 512) + body
    np.testing.assert_array_equal(decompress(payload, "bslz4", pixels.shape, np.uint16), pixels)


def test_lz4_block_is_one_bare_lz4_block() -> None:
    pixels = counts((30, 30), np.uint32)
    payload = lz4.block.compress(pixels.tobytes(), store_size=False)
    np.testing.assert_array_equal(decompress(payload, "lz4_block", pixels.shape, np.uint32), pixels)


@pytest.mark.parametrize("encoding", ["bslz4", "lz4"])
def test_structural_damage_is_caught_without_decompressing(encoding: str) -> None:
    pixels = counts((64, 64), np.uint16)
    payload = compress(pixels, encoding)
    damaged = {
        "truncated": payload[:-5],
        "extended": payload + b"\0",
        "no header": payload[:7],
        "raw size": HEADER.pack(pixels.nbytes + 2, 8192) + payload[12:],
        "zero block": HEADER.pack(pixels.nbytes, 0) + payload[12:],
        "odd block": HEADER.pack(pixels.nbytes, 8191) + payload[12:] if encoding == "bslz4" else payload[:-1],
        "block length": payload[:12] + b"\xff\xff\xff\xff" + payload[16:],
    }
    for name, blob in damaged.items():
        with pytest.raises(CompressionError):
            check_framing(blob, encoding, pixels.nbytes, 2)
        if name == "extended":  # the native decoder stops after the last whole block: the pixels, untouched
            np.testing.assert_array_equal(decompress(blob, encoding, pixels.shape, np.uint16), pixels)
            continue
        with pytest.raises(CompressionError):
            decompress(blob, encoding, pixels.shape, np.uint16)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_flips=st.integers(1, 8), encoding=st.sampled_from(COMPRESSED))
def test_corrupt_bytes_raise_or_decode_never_crash(seed: int, n_flips: int, encoding: str) -> None:
    """Flipped bytes either still decode (LZ4 cannot see every change) or raise CompressionError: never a crash,
    never an array of the wrong shape. (bitshuffle.decompress_lz4 segfaults on such input.)"""
    pixels = counts((48, 48), np.uint16, seed % 7)
    blob = bytearray(compress(pixels, encoding))
    rng = np.random.default_rng(seed)
    for index in rng.integers(0, len(blob), n_flips):
        blob[index] = rng.integers(0, 256)
    try:
        decoded = decompress(bytes(blob), encoding, pixels.shape, np.uint16)
    except CompressionError:
        return
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint16


def test_a_compressed_ptylive_frame_is_decoded_lazily() -> None:
    pixels = counts((32, 32), np.uint16)
    parts = encode_frame("s", 3, pixels, encoding="bslz4")
    assert len(parts[1]) < pixels.nbytes
    frame = decode(parts)
    assert isinstance(frame, Frame) and frame.encoding == "bslz4" and frame.shape == (32, 32)
    assert "_pixels" not in vars(frame)  # nothing decoded yet
    view = frame.header_view()
    assert view.pixels.shape == (32, 32) and view.pixels.dtype == np.uint16 and view.nbytes == pixels.nbytes
    assert view.pixels.strides == (0, 0)  # a placeholder, not the pixels
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert not frame.pixels.flags.writeable and frame.pixels is vars(frame)["_pixels"]  # decoded once, kept


def test_a_ptylive_frame_with_a_broken_block_chain_is_rejected_as_corrupt_payload() -> None:
    parts = encode_frame("s", 0, counts((32, 32), np.uint16), encoding="lz4")
    with pytest.raises(ProtocolError) as info:
        decode([parts[0], bytes(parts[1])[:-3]])
    assert info.value.reason == "corrupt_payload"


def test_workers_decode_compressed_frames_and_count_what_does_not_decode() -> None:
    """FrameStore.add decodes on the worker: a corrupt LZ4 body (its framing intact, so rank 0 let it through)
    and NaN in a compressed float frame are rejected by reason; a good frame is stored bit for bit."""
    from ptylive.daemon.engine.geometry import series_geometry
    from ptylive.daemon.worker.frames import FrameStore
    from ptylive.streaming.scan_geometry import Optics, ScanGeometry, SeriesTemplate

    template = SeriesTemplate(ScanGeometry(3, 3, step_A=(0.5, 0.5)), Optics(300e3, 20.0, 0.0, 3.0))
    start = template.start("w", (32, 32), "float32")
    store = FrameStore.allocate(series_geometry(start, 1, 1), 0, "amplitude", np, np.float32)
    pixels = counts((32, 32), np.float32)
    body = bytearray(compress(pixels, "lz4_block"))
    body[:4] = b"\xff\xff\xff\xff"  # an LZ4 token promising more literals than there are
    corrupt = Frame("w", 0, bytes(body), None, "lz4_block", (32, 32), "float32")
    nan = pixels.copy()
    nan[3, 3] = np.nan
    assert not store.add(corrupt) and store.rejected["corrupt_payload"] == 1
    assert not store.add(decode(encode_frame("w", 1, nan, encoding="bslz4"))) and store.rejected["non_finite"] == 1
    assert store.add(decode(encode_frame("w", 2, pixels, encoding="bslz4")))
    row = int(np.flatnonzero(store.global_index == 2)[0])
    np.testing.assert_array_equal(store.targets[row], pixels)
    assert store.n_received == 1 and store.intensity_sum == float(pixels.sum(dtype=np.float64))


def test_the_decode_benchmark_reports_every_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from ptylive.tools import bench_decode

    # One timing of one frame per cell: the table's shape and contents, not the timings, are under test.
    monkeypatch.setattr(bench_decode, "QUICK_CASES", [(24, "uint16")])
    monkeypatch.setattr(bench_decode, "TIMING_BYTES", 0)
    monkeypatch.setattr(bench_decode, "MIN_REPEATS", 1)
    monkeypatch.setattr(bench_decode, "SAMPLES", 1)
    rows = [[cell.strip() for cell in row.split("|")[1:-1]] for row in bench_decode.decode_table(quick=True)[2:]]
    assert [row[1] for row in rows] == list(bench_decode.ENCODINGS)
    assert all(row[0] == "24² uint16" for row in rows)
    wire_bytes = {row[1]: int(row[2].replace(",", "")) for row in rows}
    assert wire_bytes["raw"] == 24 * 24 * 2 and all(wire_bytes[e] < wire_bytes["raw"] for e in ("bslz4", "lz4"))
    assert rows[0][5] == "1.0×" and rows[0][6] == "–"  # raw against itself; rank 0 checks no raw framing
    assert all(float(row[4]) > 0 and float(row[6]) > 0 for row in rows[1:])


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=3000), encoding=st.sampled_from(["bslz4", "lz4"]),
       dtype=st.sampled_from([np.uint8, np.uint16, np.uint32, np.float64]), n_elements=st.integers(1, 1500),
       block_groups=st.integers(1, 64))
def test_arbitrary_bytes_behind_a_valid_header_raise_or_decode(body: bytes, encoding: str, dtype: type,
                                                              n_elements: int, block_groups: int) -> None:
    """The native decoder is given any block chain behind a header that fits the frame: it raises
    CompressionError or returns the frame's shape, never reads or writes out of bounds (a crash here kills the
    test process)."""
    itemsize = np.dtype(dtype).itemsize
    payload = HEADER.pack(n_elements * itemsize, block_groups * 8 * itemsize) + body
    try:
        decoded = decompress(payload, encoding, (1, n_elements), dtype)
    except CompressionError:
        return
    assert decoded.shape == (1, n_elements) and decoded.dtype == np.dtype(dtype)


@pytest.mark.parametrize("encoding", ["bslz4", "lz4"])
def test_every_truncation_of_a_frame_raises(encoding: str) -> None:
    pixels = counts((61, 67), np.uint16)  # 8174 bytes: one short block, and 14 bslz4 leftover bytes
    payload = compress(pixels, encoding)
    for length in range(len(payload)):
        with pytest.raises(CompressionError):
            decompress(payload[:length], encoding, pixels.shape, np.uint16)


def test_a_forged_raw_size_is_refused_before_the_native_decoder_allocates() -> None:
    pixels = counts((16, 16), np.uint16)
    body = compress(pixels, "bslz4")[12:]
    with pytest.raises(CompressionError, match="declares"):
        decompress(HEADER.pack(1 << 40, 8192) + body, "bslz4", pixels.shape, np.uint16)
