"""Decode cost of DECTRIS-compressed frames on a worker, against raw frames (``ptylive bench ingest``, §4).

Per frame, what a worker does with a message from the ingest: ``protocol.decode`` of the forwarded parts
(no framing check: the ingest made it), decompression (none for raw; ``dectris.compression``
for bslz4 and lz4, python-lz4 for lz4_block), and the copy into its float32 row (``FrameStore.add``). Rank 0's
share is the framing check alone (:func:`check_framing`), listed separately; workers skip it (``WorkerInbox``).
Frames are electron-counting-like: a bright disk (mean 40 counts) on a sparse background (0.05), uint16 and
uint32, which is what bitshuffle-LZ4 compresses well. Medians of repeated timings, one process, one core.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from ptylive.streaming.compression import check_framing
from ptylive.streaming.protocol import Frame, decode, encode_frame

ENCODINGS = ("raw", "bslz4", "lz4", "lz4_block")
FULL_CASES = [(96, "uint16"), (192, "uint16"), (256, "uint32"), (512, "uint16")]
QUICK_CASES = [(96, "uint16"), (192, "uint16"), (512, "uint16")]
TIMING_BYTES = 2_000_000  # frame bytes decoded per timing sample (at least MIN_REPEATS frames)
MIN_REPEATS, SAMPLES = 20, 5  # the median of SAMPLES timings is reported


def diffraction_like(side: int, dtype: str, seed: int = 0) -> np.ndarray:
    """(side, side) counts: Poisson disk of radius side/6 (mean 40) on a 0.05 background."""
    rows, cols = np.indices((side, side)) - side / 2
    mean = np.where(rows**2 + cols**2 < (side / 6) ** 2, 40.0, 0.05)
    return np.random.default_rng(seed).poisson(mean).astype(dtype)


def _median_us(run: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(SAMPLES):
        began = time.perf_counter()
        for _ in range(repeats):
            run()
        samples.append((time.perf_counter() - began) / repeats * 1e6)
    return statistics.median(samples)


def _worker_step(parts: list[bytes], target: np.ndarray) -> Callable[[], None]:
    def step() -> None:
        frame = decode(parts, verify_framing=False)  # as WorkerInbox does: the ingest walked the chain
        assert isinstance(frame, Frame)
        target[...] = frame.pixels

    return step


def _rank0_step(payload: bytes, encoding: str, pixels: np.ndarray) -> Callable[[], None]:
    return lambda: check_framing(payload, encoding, pixels.nbytes, pixels.itemsize)


def decode_table(quick: bool = False, bslz4_us: dict[int, float] | None = None) -> list[str]:
    """Markdown rows: per case and encoding, bytes on the wire, worker µs per frame, ratio to raw, rank 0 µs;
    ``bslz4_us`` (if given) receives the bslz4 worker µs per frame by detector side."""
    lines = ["| frame | encoding | wire bytes | compression | worker µs/frame | vs raw | rank 0 check µs |",
             "|---|---|---|---|---|---|---|"]
    for side, dtype in QUICK_CASES if quick else FULL_CASES:
        pixels = diffraction_like(side, dtype)
        repeats = max(MIN_REPEATS, TIMING_BYTES // pixels.nbytes)
        raw_us = 0.0
        for encoding in ENCODINGS:
            parts = [bytes(part) for part in encode_frame("bench", 0, pixels, encoding=encoding)]
            us = _median_us(_worker_step(parts, np.empty(pixels.shape, np.float32)), repeats)
            raw_us = us if encoding == "raw" else raw_us
            if encoding == "bslz4" and bslz4_us is not None:
                bslz4_us[side] = us
            check = "–" if encoding == "raw" else f"{_median_us(_rank0_step(parts[1], encoding, pixels), repeats):.1f}"
            lines.append(f"| {side}² {dtype} | {encoding} | {len(parts[1]):,} | {pixels.nbytes / len(parts[1]):.1f}× "
                         f"| {us:.1f} | {us / raw_us:.1f}× | {check} |")
    return lines


def main(quick: bool = False) -> dict[int, float]:
    """Print section 4; return the bslz4 worker µs per frame by detector side."""
    print("\n## 4. Decoding DECTRIS-compressed frames on a worker, vs raw\n")
    print(__doc__.split("\n\n", 1)[1].replace("\n", " ").strip() + "\n")
    bslz4_us: dict[int, float] = {}
    print("\n".join(decode_table(quick, bslz4_us)))
    return bslz4_us
