"""Decode cost of DECTRIS-compressed frames on a worker, against raw frames (``ptylive bench ingest``, §4).

Per frame, what a worker does with a message from the ingest: ``protocol.decode`` of the forwarded parts
(no framing check: the ingest made it), decompression (none for raw; ``dectris.compression``
for bslz4 and lz4, python-lz4 for lz4_block), and the copy into its float32 row (``FrameStore.add``). Rank 0's
share is the framing check alone (:func:`check_framing`), listed separately; workers skip it (``WorkerInbox``).
Frames are electron-counting-like: a bright disk (mean 40 counts) on a sparse background (0.05), uint16 and
uint32, which is what bitshuffle-LZ4 compresses well. Thread CPU time, medians of rounds that time every
encoding in turn (the ratio to raw is the median of the per-round ratios); one process, one core.
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
MIN_REPEATS, SAMPLES = 20, 7  # the median of SAMPLES timings is reported


def diffraction_like(side: int, dtype: str, seed: int = 0) -> np.ndarray:
    """(side, side) counts: Poisson disk of radius side/6 (mean 40) on a 0.05 background."""
    rows, cols = np.indices((side, side)) - side / 2
    mean = np.where(rows**2 + cols**2 < (side / 6) ** 2, 40.0, 0.05)
    return np.random.default_rng(seed).poisson(mean).astype(dtype)


def _thread_us(run: Callable[[], object], repeats: int) -> float:
    """µs of this thread's CPU per call (``time.thread_time``: time the thread was preempted by other jobs on a
    shared machine does not count)."""
    began = time.thread_time()
    for _ in range(repeats):
        run()
    return (time.thread_time() - began) / repeats * 1e6


def _median_us(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(_thread_us(run, repeats) for _ in range(SAMPLES))


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
        target = np.empty(pixels.shape, np.float32)
        steps = {encoding: _worker_step([bytes(part) for part in encode_frame("bench", 0, pixels, encoding=encoding)],
                                        target) for encoding in ENCODINGS}
        samples: dict[str, list[float]] = {encoding: [] for encoding in ENCODINGS}
        for _ in range(SAMPLES):  # interleaved: every encoding, raw included, in each round
            for encoding, step in steps.items():
                samples[encoding].append(_thread_us(step, repeats))
        for encoding in ENCODINGS:
            parts = encode_frame("bench", 0, pixels, encoding=encoding)
            wire = memoryview(parts[1]).nbytes
            us = statistics.median(samples[encoding])
            ratio = statistics.median(e / r for e, r in zip(samples[encoding], samples["raw"], strict=True))
            if encoding == "bslz4" and bslz4_us is not None:
                bslz4_us[side] = us
            check = "–"
            if encoding != "raw":
                check = f"{_median_us(_rank0_step(bytes(parts[1]), encoding, pixels), repeats):.1f}"
            lines.append(f"| {side}² {dtype} | {encoding} | {wire:,} | {pixels.nbytes / wire:.1f}× "
                         f"| {us:.1f} | {ratio:.1f}× | {check} |")
    return lines


def main(quick: bool = False) -> dict[int, float]:
    """Print section 4; return the bslz4 worker µs per frame by detector side."""
    print("\n## 4. Decoding DECTRIS-compressed frames on a worker, vs raw\n")
    print(__doc__.split("\n\n", 1)[1].replace("\n", " ").strip() + "\n")
    bslz4_us: dict[int, float] = {}
    print("\n".join(decode_table(quick, bslz4_us)))
    return bslz4_us
