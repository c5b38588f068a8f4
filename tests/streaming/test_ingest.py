"""The ingest over loopback: routing to two workers, faults, unknown series, and backpressure without drops."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import zmq

from ptylive.gpu.simulate import SimulationSpec
from ptylive.streaming.fake_detector import CORRUPT_REASONS, FakeDetector, FakeDetectorOptions, ScanSource
from ptylive.streaming.inbox import WorkerInbox
from ptylive.streaming.ingest import Ingest, IngestSockets, binds_every_interface
from ptylive.streaming.protocol import (
    Frame,
    Message,
    SeriesEnd,
    SeriesStart,
    encode_frame,
    encode_series_end,
    encode_series_start,
)
from ptylive.streaming.router import Router

SPEC = SimulationSpec(detector_px=16, detector_pixel_mrad=6.0, scan_shape=(6, 6), scan_step_px=2.0, n_slices=1)
BIG_SPEC = dataclasses.replace(SPEC, detector_px=128, scan_shape=(12, 12))  # 128 KiB float64 frames: MBs per worker
N_FRAMES = 36
LOOPBACK = "tcp://127.0.0.1:0"


@dataclass
class Rig:
    """An ingest on loopback with two worker inboxes; ``routers`` holds every router the factory built."""

    context: zmq.Context
    source: ScanSource
    ingest: Ingest
    inboxes: list[WorkerInbox]
    routers: list[Router] = field(default_factory=list)
    starts: list[SeriesStart] = field(default_factory=list)
    detectors: list[FakeDetector] = field(default_factory=list)

    def detector(self, options: FakeDetectorOptions) -> FakeDetector:
        detector = FakeDetector(self.source, options, self.ingest.endpoint, bind=False, context=self.context)
        self.detectors.append(detector)
        detector.start()
        return detector

    def table(self) -> np.ndarray:
        """Owner of every frame, as the router of the series decides it."""
        return self.routers[-1].route_all(self.starts[-1])


MakeRig = Callable[..., Rig]


def column_split(source: ScanSource) -> Callable[[np.ndarray], np.ndarray]:
    median = float(np.median(np.asarray(source.start.positions_A)[:, 1]))
    return lambda positions: (positions[:, 1] > median).astype(int)


@pytest.fixture(scope="module")
def sources() -> dict[str, ScanSource]:
    return {"small": ScanSource.from_simulation(SPEC), "big": ScanSource.from_simulation(BIG_SPEC)}


@pytest.fixture
def make_rig(sources: dict[str, ScanSource]) -> Iterator[MakeRig]:
    """Build and start rigs; always stop detectors and ingests and close every socket."""
    context = zmq.Context()
    rigs: list[Rig] = []

    def make(source: str = "small", inbox_rcvhwm: int = 1000, taken: Callable[[int], int | None] | None = None,
             **config: Any) -> Rig:
        scan = sources[source]
        owner_of = column_split(scan)
        routers: list[Router] = []
        starts: list[SeriesStart] = []

        def factory(start: SeriesStart) -> Router:
            starts.append(start)
            routers.append(Router(owner_of, 2))
            return routers[-1]

        ingest = Ingest(IngestSockets(LOOPBACK, (LOOPBACK, LOOPBACK), **config), factory, context=context,
                        taken=taken)
        rig = Rig(context, scan, ingest, [], routers, starts)
        rigs.append(rig)
        assert not ingest.endpoint.endswith(":0") and not any(e.endswith(":0") for e in ingest.worker_endpoints)
        rig.inboxes = [WorkerInbox(e, context, rcvhwm=inbox_rcvhwm) for e in ingest.worker_endpoints]
        ingest.start()
        return rig

    yield make
    for rig in rigs:
        for detector in rig.detectors:
            detector.close()
        rig.ingest.close()
        for inbox in rig.inboxes:
            inbox.close()
    context.destroy(linger=0)


def collect(inbox: WorkerInbox, timeout_s: float = 10.0) -> list[Message]:
    """Messages up to and including a ``series_end``."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while not (received and isinstance(received[-1], SeriesEnd)):
        assert time.monotonic() < deadline, f"no series_end within {timeout_s} s ({len(received)} messages)"
        received.extend(inbox.poll(50))
    return received


def frames_of(received: list[Message]) -> list[Frame]:
    assert isinstance(received[0], SeriesStart) and isinstance(received[-1], SeriesEnd)
    assert not any(isinstance(m, SeriesStart | SeriesEnd) for m in received[1:-1])
    return [m for m in received if isinstance(m, Frame)]


def test_every_frame_reaches_its_owner_once(make_rig: MakeRig) -> None:
    rig = make_rig()
    detector = rig.detector(FakeDetectorOptions(series_id="a", dtype="float32"))
    received = [collect(inbox) for inbox in rig.inboxes]
    detector.join(timeout=10)
    rig.ingest.join(timeout=5)
    table = rig.table()
    truth = rig.source.read(np.arange(N_FRAMES)).astype(np.float32)
    assert len(rig.routers) == 1 and 0 < (table == 0).sum() < N_FRAMES
    for worker, messages in enumerate(received):
        assert messages[0].series_id == "a" and messages[-1] == SeriesEnd("a", N_FRAMES)  # type: ignore[union-attr]
        frames = frames_of(messages)
        assert Counter(f.frame_index for f in frames) == Counter(np.flatnonzero(table == worker).tolist())
        assert len(frames) == rig.routers[0].frames_routed[worker] == rig.ingest.forwarded[worker]
        assert rig.ingest.control_forwarded[worker] == 2
        for frame in frames:
            np.testing.assert_array_equal(frame.pixels, truth[frame.frame_index])
    snapshot = json.loads(json.dumps(rig.ingest.snapshot()))
    assert snapshot["registry"]["frames"] == {"offered": N_FRAMES, "accepted": N_FRAMES, "duplicates": 0,
                                              "rejected": 0}
    assert snapshot["registry"]["finished"][-1]["missing"] == 0 and snapshot["routing_errors"] == 0
    assert [w["forwarded"] for w in snapshot["workers"]] == [(table == 0).sum(), (table == 1).sum()]


@pytest.mark.chaos
def test_gaps_duplicates_and_corrupt_messages(make_rig: MakeRig) -> None:
    rig = make_rig()
    dropped, duplicated = (3, 20), (0, 7, 30)
    options = FakeDetectorOptions(series_id="b", dtype="float32", drop_frames=dropped, duplicate_frames=duplicated,
                                  corrupt_every=3, reorder_window=4)
    detector = rig.detector(options)
    received = [collect(inbox) for inbox in rig.inboxes]
    stats = detector.join(timeout=10)
    rig.ingest.join(timeout=5)
    table = rig.table()
    valid = [i for i in range(N_FRAMES) if i not in dropped]
    for worker, messages in enumerate(received):
        indices = Counter(f.frame_index for f in frames_of(messages))
        assert indices == Counter(i for i in valid if table[i] == worker)  # each valid distinct frame once
        assert messages[-1] == SeriesEnd("b", len(valid))
    registry = rig.ingest.registry
    reasons = Counter[str]()
    for kind, count in stats.corrupt_sent.items():
        reasons[CORRUPT_REASONS[kind]] += count
    assert sum(reasons.values()) == (len(valid) + len(duplicated)) // 3 > 0
    assert {r: n for r, n in registry.rejected.items() if n} == dict(reasons)
    assert (registry.accepted, registry.duplicates) == (len(valid), len(duplicated))
    state = registry.finished[-1]
    assert (state.series_id, state.received, state.duplicated, state.missing) == ("b", len(valid), 3, len(dropped))
    assert np.flatnonzero(~state.coverage).tolist() == list(dropped)
    assert sum(rig.ingest.forwarded) == len(valid) and rig.ingest.snapshot()["registry"]["protocol_errors"] == 12


def test_frames_of_an_unknown_series_are_not_forwarded(make_rig: MakeRig) -> None:
    rig = make_rig()
    start = dataclasses.replace(rig.source.start, series_id="c", dtype="float32")
    pixels = np.ones(start.detector_shape, dtype=np.float32)
    push = rig.context.socket(zmq.PUSH)
    try:
        push.connect(rig.ingest.endpoint)
        for parts in (encode_series_start(start), encode_frame("other", 0, pixels), encode_frame("c", 5, pixels),
                      encode_frame(7, 1, pixels), encode_series_end("c", 1)):  # type: ignore[arg-type]
            push.send_multipart(parts)
        received = [collect(inbox) for inbox in rig.inboxes]
    finally:
        push.close(linger=0)
    rig.ingest.join(timeout=5)
    frames = [f for messages in received for f in frames_of(messages)]
    assert [(f.series_id, f.frame_index) for f in frames] == [("c", 5)]
    assert rig.ingest.registry.rejected["unknown_series"] == 2 and sum(rig.ingest.forwarded) == 1
    assert rig.ingest.registry.finished[-1].received == 1


@pytest.mark.chaos
def test_a_slow_worker_blocks_the_ingest_but_loses_nothing(make_rig: MakeRig) -> None:
    rig = make_rig("big", inbox_rcvhwm=2, send_hwm=2, poll_ms=10)
    n_frames = rig.source.n_frames
    detector = rig.detector(FakeDetectorOptions(series_id="d", dtype="float64"))
    fast: list[Message] = []
    deadline = time.monotonic() + 10
    while rig.ingest.blocked_s[1] < 0.2:  # worker 1 does not read; worker 0 does (longer than a connection takes)
        assert time.monotonic() < deadline, "the ingest never blocked on the slow worker"
        fast.extend(rig.inboxes[0].poll(10))
    table = rig.table()
    assert rig.ingest.forwarded[1] < (table == 1).sum()  # held back, not dropped
    slow: list[Message] = []
    deadline = time.monotonic() + 10
    while not all(m and isinstance(m[-1], SeriesEnd) for m in (fast, slow)):  # now both read
        assert time.monotonic() < deadline, f"no series_end within 10 s ({len(fast)}, {len(slow)} messages)"
        for inbox, messages in zip(rig.inboxes, (fast, slow), strict=True):
            messages.extend(inbox.poll(5))
    detector.join(timeout=10)
    rig.ingest.join(timeout=5)
    for worker, messages in enumerate((fast, slow)):
        assert Counter(f.frame_index for f in frames_of(messages)) == Counter(np.flatnonzero(table == worker).tolist())
    assert rig.ingest.registry.accepted == n_frames and rig.ingest.unsent_on_stop == 0
    snapshot = rig.ingest.snapshot()
    assert snapshot["workers"][1]["blocked_s"] > 0 and sum(w["forwarded"] for w in snapshot["workers"]) == n_frames


@pytest.mark.chaos
def test_the_byte_bound_holds_against_slow_workers_and_nothing_is_lost(make_rig: MakeRig) -> None:
    """``max_buffered_bytes`` = 1 MiB (8 frames of 128 KiB; ZeroMQ's queues alone would take 1000 per worker).
    The fake workers take one message at a time and report what they took every 50 ms (a heartbeat): the bytes
    forwarded and not reported taken never pass the bound, the ingest waited for it, and every frame arrives."""
    bound = 2**20
    reported = [0, 0]  # the workers' last reports, read by the ingest thread
    rig = make_rig("big", taken=lambda worker: reported[worker], max_buffered_bytes=bound, poll_ms=5, recv_hwm=4)
    detector = rig.detector(FakeDetectorOptions(series_id="bytes", dtype="float64"))
    received: list[list[Message]] = [[], []]
    deadline, report_due = time.monotonic() + 30, 0.0
    while not all(m and isinstance(m[-1], SeriesEnd) for m in received):
        assert time.monotonic() < deadline, f"no series_end within 30 s ({[len(m) for m in received]} messages)"
        for inbox, messages in zip(rig.inboxes, received, strict=True):
            messages.extend(inbox.poll(1, max_messages=1))
        if time.monotonic() >= report_due:
            reported[:], report_due = [len(m) for m in received], time.monotonic() + 0.05
        assert rig.ingest.in_flight is not None and rig.ingest.in_flight.buffered_bytes <= bound
    detector.join(timeout=10)
    rig.ingest.join(timeout=5)
    table = rig.table()
    for worker, messages in enumerate(received):
        assert Counter(f.frame_index for f in frames_of(messages)) == Counter(np.flatnonzero(table == worker).tolist())
    buffered = rig.ingest.snapshot()["buffered"]
    frame_bytes = rig.source.read(np.arange(1)).astype(np.float64)[0].nbytes
    assert buffered["max_bytes"] == bound and bound - frame_bytes - 1024 < buffered["peak_bytes"] <= bound
    assert buffered["waits"] > 0 and sum(rig.ingest.blocked_s) > 0  # the bound, not ZeroMQ, held the frames back
    registry = rig.ingest.registry
    assert registry.accepted == sum(rig.ingest.forwarded) == rig.source.n_frames and rig.ingest.unsent_on_stop == 0
    assert sum(registry.rejected.values()) == 0 and rig.ingest.routing_errors == 0


def test_a_byte_bound_needs_the_workers_reports(make_rig: MakeRig) -> None:
    with pytest.raises(ValueError, match="taken hook"):
        make_rig(max_buffered_bytes=2**20)


@pytest.mark.chaos
def test_join_stops_promptly_while_a_worker_is_full(make_rig: MakeRig) -> None:
    rig = make_rig("big", inbox_rcvhwm=2, send_hwm=2, poll_ms=10)
    rig.detector(FakeDetectorOptions(series_id="e", dtype="float64"))
    deadline = time.monotonic() + 10
    while sum(rig.ingest.blocked_s) < 0.2:  # nobody reads
        assert time.monotonic() < deadline, "the ingest never blocked"
        time.sleep(0.01)
    began = time.monotonic()
    rig.ingest.join(timeout=5)
    assert time.monotonic() - began < 1 and rig.ingest.unsent_on_stop == 1


def test_join_reraises_an_error_from_the_thread(make_rig: MakeRig) -> None:
    rig = make_rig()
    def broken(start: SeriesStart) -> Router:
        raise RuntimeError("factory on fire")

    rig.ingest.book.router_factory = broken
    rig.detector(FakeDetectorOptions(series_id="f"))
    deadline = time.monotonic() + 10
    while rig.ingest._thread is not None and rig.ingest._thread.is_alive():
        assert time.monotonic() < deadline, "the ingest thread did not fail"
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="factory on fire"):
        rig.ingest.join(timeout=5)


@pytest.mark.chaos
def test_a_part_over_the_protocol_limit_is_never_buffered_and_the_ingest_goes_on(make_rig: MakeRig) -> None:
    """``ZMQ_MAXMSGSIZE`` = the protocol's largest part: ZeroMQ disconnects a sender whose part is larger before
    buffering it (a 300 MB frame was once held whole), so nothing of it is counted; later senders are served."""
    from ptylive.streaming.protocol import MAX_PART_BYTES

    rig = make_rig()
    with rig.context.socket(zmq.PUSH) as push:
        push.linger = 0
        push.connect(rig.ingest.endpoint)
        push.send_multipart([b"\x81\xa5htype\xa5frame", bytes(MAX_PART_BYTES + 1)])
        time.sleep(1.0)
    assert rig.ingest.messages_received == 0
    detector = rig.detector(FakeDetectorOptions(series_id="after", dtype="float32"))
    received = [collect(inbox) for inbox in rig.inboxes]
    detector.join(timeout=10)
    assert sum(len(frames_of(messages)) for messages in received) == N_FRAMES


@pytest.mark.chaos
def test_a_series_whose_sender_goes_quiet_ends_incomplete_after_the_idle_timeout(make_rig: MakeRig) -> None:
    """A sender that dies after some frames, without series_end: after ``idle_timeout_s`` the ingest ends the
    series (cause idle_timeout) and tells every worker ``incomplete``, so a later series becomes current."""
    from ptylive.streaming.inbox import SeriesControl

    rig = make_rig(idle_timeout_s=0.5)
    start = dataclasses.replace(rig.source.start, series_id="quiet", dtype="float32")
    frames = rig.source.read(np.arange(5)).astype(np.float32)
    with rig.context.socket(zmq.PUSH) as push:
        push.connect(rig.ingest.endpoint)
        push.send_multipart(encode_series_start(start))
        for k, pixels in enumerate(frames):
            push.send_multipart(encode_frame("quiet", k, pixels))
        deadline = time.monotonic() + 10
        received: list[list[Message]] = [[], []]
        while not all(any(isinstance(m, SeriesControl) for m in r) for r in received):
            assert time.monotonic() < deadline, "no incomplete control within 10 s"
            for inbox, messages in zip(rig.inboxes, received, strict=True):
                messages.extend(inbox.poll(50))
    for messages in received:
        control = [m for m in messages if isinstance(m, SeriesControl)]
        assert control == [SeriesControl("incomplete", "quiet")]
    state = rig.ingest.book.registry.find("quiet")
    assert state is not None and state.ended and state.end_cause == "idle_timeout" and state.received == 5
    assert rig.ingest.book.registry.current is None


def test_small_frames_drained_together_go_to_their_worker_as_one_batch_in_order() -> None:
    """40 frames queued on the detector socket before the ingest runs are drained at once: each worker gets its
    20 as one ``frame_batch`` message between the start and the end (raw parts checked on worker 1), and the inbox
    of worker 0 returns its 20 frames one by one, in sending order, bit for bit."""
    context = zmq.Context()
    ingest = Ingest(IngestSockets(LOOPBACK, (LOOPBACK, LOOPBACK)), lambda start: Router(
        lambda positions: (np.rint(positions[:, 1]).astype(int) % 2), 2), context=context)
    detector, raw = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    inbox = WorkerInbox(ingest.worker_endpoints[0], context)
    try:
        raw.connect(ingest.worker_endpoints[1])
        detector.connect(ingest.endpoint)
        start = SeriesStart("b", (4, 10), (1.0, 1.0), (8, 8), "uint16", 300e3, 20.0, 0.0, 1.0)
        pixels = [np.full((8, 8), k, dtype=np.uint16) for k in range(40)]
        detector.send_multipart(encode_series_start(start))
        for k, frame in enumerate(pixels):
            detector.send_multipart(encode_frame("b", k, frame))
        detector.send_multipart(encode_series_end("b", 40))
        time.sleep(0.3)  # all of it waits on the ingest's PULL
        ingest.start()
        received = collect(inbox)
        raw_messages = []
        while len(raw_messages) < 3 and raw.poll(5000):
            raw_messages.append(raw.recv_multipart())
        ingest.join(timeout=5)
    finally:
        ingest.close()
        inbox.close()
        detector.close(linger=0)
        raw.close(linger=0)
        context.term()
    frames = frames_of(received)
    assert [f.frame_index for f in frames] == list(range(0, 40, 2))
    assert all(np.array_equal(f.pixels, pixels[f.frame_index]) for f in frames)
    assert [len(m) for m in raw_messages] == [1, 1 + 2 * 20, 1]
    assert ingest.forwarded == [20, 20] and ingest.messages_received == 42


def test_a_detector_cannot_send_a_batch() -> None:
    from ptylive.streaming.inbox import encode_batch_header
    from ptylive.streaming.protocol import ProtocolError, decode

    parts = [encode_batch_header(2)] + encode_frame("s", 0, np.zeros((2, 2), np.uint16)) * 2
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    assert info.value.reason == "parts"
    with pytest.raises(ProtocolError) as info:
        decode(parts[:1])
    assert info.value.reason == "unknown_htype"


def test_the_inbox_counts_a_broken_batch_and_keeps_the_good_frames_of_a_batch() -> None:
    from ptylive.streaming.inbox import encode_batch_header

    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    inbox = WorkerInbox(f"tcp://127.0.0.1:{port}", context)
    try:
        good = [encode_frame("s", k, np.full((2, 2), k, np.uint16)) for k in range(3)]
        bad = [good[1][0], b"short"]  # a payload of the wrong size
        push.send_multipart([encode_batch_header(3), *good[0], *bad, *good[2]])
        push.send_multipart([encode_batch_header(3), *good[0], *good[1]])  # claims 3, holds 2: not a batch
        messages, deadline = [], time.monotonic() + 5
        while inbox.protocol_errors < 2 and time.monotonic() < deadline:
            messages += inbox.poll(50)
    finally:
        inbox.close()
        push.close(linger=0)
        context.term()
    assert [m.frame_index for m in messages if isinstance(m, Frame)] == [0, 2] and inbox.protocol_errors == 2


@pytest.mark.chaos
@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:0", "tcp://*:0"])
def test_an_ingest_bound_to_every_interface_logs_one_warning(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who reaches the port can stream series into the daemon: say so where it is bound, naming the
    endpoint and the setting; loopback and a connecting ingest say nothing."""
    with zmq.Context() as context:
        for sockets in (IngestSockets(endpoint, (LOOPBACK,)), IngestSockets(LOOPBACK, (LOOPBACK,)),
                        IngestSockets("tcp://127.0.0.1:1", (LOOPBACK,), bind=False)):
            with caplog.at_level(logging.WARNING, logger="ptylive.streaming.ingest"):
                caplog.clear()
                ingest = Ingest(sockets, lambda start: Router(lambda p: np.zeros(len(p), dtype=int), 1),
                                context=context)
                ingest.close()
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            if sockets.endpoint == endpoint:
                assert len(warnings) == 1, warnings
                assert "every interface (tcp://0.0.0.0:" in warnings[0] and "ingest.endpoint" in warnings[0]
            else:
                assert not warnings, warnings


def test_which_endpoints_bind_every_interface() -> None:
    assert all(map(binds_every_interface, ["tcp://*:5555", "tcp://0.0.0.0:0", "tcp://[::]:5555", "tcp://:5555",
                                           "tcp://192.168.1.2;*:5555"]))
    assert not any(map(binds_every_interface, ["tcp://127.0.0.1:5555", "tcp://eth0:5555", "tcp://[::1]:5555",
                                               "ipc:///run/ptylive/ingest", "inproc://x"]))
