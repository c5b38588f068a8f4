"""Stream a scan so that a worker reconstructs it the same way whatever the timing (test_multihost.py).

``python -m tests.daemon.netns_stream ENDPOINT SCAN SERIES_ID`` connects a PUSH to the ingest at ENDPOINT (run
inside rank 0's network namespace) and sends, in this order on one connection::

    series_start  HOLD            (no frames: the worker idles on it, taking what arrives)
    series_start  SERIES_ID       (queued behind HOLD)
    frame …       SERIES_ID       every frame, float32
    series_end    SERIES_ID
    series_end    HOLD            (HOLD ends empty)

The ingest forwards in order, so every frame and the end of SERIES_ID reach the worker before HOLD ends: the
worker's first tick of SERIES_ID already holds the whole scan, and its iterations do not depend on when
frames arrived (streamed while the worker iterated, they would).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import zmq

from ptylive.streaming import protocol
from ptylive.streaming.fake_detector import ScanSource

HOLD = "hold"
LINGER_MS = 10_000


def send_held_series(endpoint: str, scan: str, series_id: str) -> int:
    """Send the messages above; returns the number of frames of ``series_id``."""
    source = ScanSource.from_file(scan)
    frames = source.read(np.arange(source.n_frames, dtype=np.int64)).astype(np.float32)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = LINGER_MS  # close() waits for every message to leave
        push.connect(endpoint)
        for name in (HOLD, series_id):
            push.send_multipart(protocol.encode_series_start(
                dataclasses.replace(source.start, series_id=name, dtype="float32")))
        for index, pixels in enumerate(frames):
            push.send_multipart(protocol.encode_frame(series_id, index, pixels))
        push.send_multipart(protocol.encode_series_end(series_id, len(frames)))
        push.send_multipart(protocol.encode_series_end(HOLD, 0))
    return len(frames)


if __name__ == "__main__":
    print(send_held_series(*sys.argv[1:4]))
