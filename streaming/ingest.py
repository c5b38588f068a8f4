"""The ingest: receive ptylive stream v1 from a detector, validate and count, forward each frame to its worker.

What the detector speaks is a pluggable :class:`~ptylive.streaming.stream_decoder.StreamDecoder` (ptylive stream v1 by
default, DECTRIS SIMPLON stream v1 or v2); an optional :class:`~ptylive.streaming.recording.Recorder` keeps
everything received. Compressed frames are checked and forwarded compressed: workers decode them.

One PULL faces the detector; one PUSH per worker (the ingest binds, workers connect). Frames are forwarded as
the very ``zmq.Frame`` objects received (no re-encoding, no copy); starts and ends go to every worker. A full
worker queue is never resolved by dropping: the ingest waits for room (``blocked_s``, stop flag honoured) and
meanwhile stops reading, so the detector's high-water mark throttles the sender. Room is counted in messages
(``send_hwm``, ZeroMQ's) and, given each worker's ``messages_taken``, in bytes over all workers
(``max_buffered_bytes``: :mod:`~ptylive.streaming.in_flight`), since a message can be 200 bytes or 64 MiB.
No MPI: the daemon maps worker indices to ranks and runs :class:`~ptylive.streaming.inbox.WorkerInbox` on each.

Batches: ZeroMQ's cost is per message (its I/O thread wakes, encodes and writes per message), which at 64² made
the forwarding cost several times the receive. So the small frames (``BATCH_FRAME_BYTES``) that one drain of the
detector socket routes to the same worker go to it as one ``frame_batch`` message
(:func:`~ptylive.streaming.inbox.encode_batch_header`), their parts still the very ``zmq.Frame`` objects
received. A batch is sent when it is full (``BATCH_FRAMES``, ``BATCH_BYTES``), when the drain ends (nothing
waits on the detector socket: no latency is added), and before any start, end or control message is broadcast
(order per worker is kept). The byte ledger still counts one entry per frame, as the worker counts what it takes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from ptylive.streaming.in_flight import InFlight, message_bytes
from ptylive.streaming.inbox import SeriesControl, encode_batch_header, encode_control
from ptylive.streaming.protocol import MAX_PART_BYTES, Frame, Message, ProtocolError, SeriesStart, decode
from ptylive.streaming.recording import Recorder
from ptylive.streaming.router import Router
from ptylive.streaming.scan_plan import ScanPlan
from ptylive.streaming.series import SeriesRegistry
from ptylive.streaming.series_book import SeriesBook
from ptylive.streaming.stream_decoder import PtyliveDecoder, StreamDecoder

logger = logging.getLogger(__name__)

RECV_BATCH = 256  # messages drained per poll before the stop flag is looked at again
PRELOAD_COMMANDS_EVERY = 256  # preloaded messages between two looks at the control requests
BATCH_FRAME_BYTES = 64 * 1024  # frames up to this size may share a message to their worker; larger ones go alone
BATCH_FRAMES, BATCH_BYTES = 64, 1 << 20  # a batch is sent once it holds this many frames or bytes
_NOBLOCK, _MORE_NOBLOCK = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)  # enum arithmetic costs µs per frame


#: Hosts of a ``tcp://HOST:PORT`` endpoint that bind every interface.
ALL_INTERFACE_HOSTS = ("*", "0.0.0.0", "::", "")


def binds_every_interface(endpoint: str) -> bool:
    """Whether binding ``endpoint`` listens on every interface: ``tcp://*:PORT``, ``tcp://0.0.0.0:PORT`` or
    ``tcp://[::]:PORT`` (an interface name or an address binds one; ``ipc://`` and ``inproc://`` none)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].split(";")[-1]  # ZeroMQ's "source;host" form: the host
    return host.strip("[]") in ALL_INTERFACE_HOSTS


@dataclass(frozen=True)
class IngestSockets:
    """Sockets of the ingest: ``endpoint``, the detector side (PULL), bound when ``bind`` else connected;
    ``worker_endpoints``, one PUSH per worker, always bound (port 0 allowed: :attr:`Ingest.worker_endpoints`);
    ``send_hwm``, messages a worker socket queues before the ingest blocks; ``poll_ms``, how often loops look at
    the stop flag; ``linger_ms``, how long :meth:`Ingest.close` lets queued messages go out;
    ``socket_buffer_bytes``, the kernel send buffer of each worker socket (0: the OS default, which on loopback
    can hold megabytes beyond ``send_hwm``); ``idle_timeout_s`` (> 0), after which a current series that
    received no frame (a sender that died without ``series_end``) is ended and its workers told ``incomplete``;
    ``max_buffered_bytes`` (> 0, needs the ingest's ``taken`` hook), the bytes sent to the workers and not yet
    taken by them, over all workers, beyond which the ingest waits (0: counted in messages only); ``recv_hwm``,
    messages the detector socket queues before ZeroMQ stops reading the detector's connection (rank 0's memory
    too: with both workers stopped, 1000 queued frames of 256 px were 256 MiB beyond the byte bound)."""

    endpoint: str
    worker_endpoints: tuple[str, ...]
    bind: bool = True
    send_hwm: int = 1000
    poll_ms: int = 50
    linger_ms: int = 1000
    socket_buffer_bytes: int = 0
    idle_timeout_s: float = 0.0  # > 0: a current series with no frame for this long ends as "incomplete"
    max_buffered_bytes: int = 0  # > 0: bytes forwarded and not yet taken by the workers, over all of them
    recv_hwm: int = 1000

    def __post_init__(self) -> None:
        if (not self.worker_endpoints or min(self.send_hwm, self.poll_ms, self.recv_hwm) < 1 or self.linger_ms < 0
                or self.max_buffered_bytes < 0):
            raise ValueError(f"need worker endpoints, send_hwm, poll_ms and recv_hwm >= 1, linger_ms >= 0, "
                             f"max_buffered_bytes >= 0; got {self.worker_endpoints}, {self.send_hwm}, "
                             f"{self.poll_ms}, {self.recv_hwm}, {self.linger_ms}, {self.max_buffered_bytes}")


class Ingest:
    """Receive, validate, count and route one detector stream to ``len(config.worker_endpoints)`` workers.

    Parameters
    ----------
    config : IngestSockets
    router_factory : callable
        Builds the :class:`Router` of a series from its start (one router per live series); its
        ``n_workers`` must equal the number of worker endpoints.
    registry : SeriesRegistry, optional
        Counts series, frames and rejections (a new one by default).
    admit : callable, optional
        ``admit(start)`` returns None to accept a series or the reason to refuse it (for example, its frames
        would not fit the memory budget). A refused start is not forwarded and its frames are rejected as
        ``"refused_series"``, so the refusal happens before any frame is lost.
    context : zmq.Context, optional
        Without one the ingest owns (and terminates) its own.
    taken : callable, optional
        ``taken(worker)`` → messages that worker has taken in all, as of its last report (None: none yet);
        needed by ``config.max_buffered_bytes`` (the daemon reads the workers' heartbeats). Called on the
        ingest thread.
    scan_plan : ScanPlan, optional
        The plan the DECTRIS decoder decides each series' scan with (:mod:`~ptylive.streaming.scan_plan`; default:
        the decoder's ``plan``): its decisions' refusals and count mismatches go into the registry (``/status``).
    used : callable, optional
        ``used(series_id)`` → whether the daemon still holds a finished series of that id beyond the registry's
        history (rank 0's view or file); its start is then a ``duplicate_id`` (:class:`SeriesBook`). Called on
        the ingest thread.

    Attributes
    ----------
    forwarded, bytes_forwarded, control_forwarded, blocked_s : list
        Per worker: frames forwarded and their pixel bytes; starts and ends forwarded; seconds spent waiting for
        room in its queue (in messages or, with ``max_buffered_bytes``, in bytes).
    in_flight : InFlight or None
        Bytes forwarded and not yet taken, with ``config.max_buffered_bytes``.
    routing_errors, unsent_on_stop : int
        Accepted frames (or starts) the router could not place (dropped, logged); messages abandoned because
        ``stop`` was set while a worker's queue was full.
    """

    def __init__(self, config: IngestSockets, router_factory: Callable[[SeriesStart], Router],
                 registry: SeriesRegistry | None = None, context: zmq.Context | None = None,
                 admit: Callable[[SeriesStart], str | None] | None = None, decoder: StreamDecoder | None = None,
                 recorder: Recorder | None = None, taken: Callable[[int], int | None] | None = None,
                 scan_plan: ScanPlan | None = None, used: Callable[[str], bool] | None = None) -> None:
        if config.max_buffered_bytes and taken is None:
            raise ValueError("max_buffered_bytes needs the taken hook: without the workers' reports nothing is "
                             "ever known to be taken")
        self.config, self._taken = config, taken
        self.decoder = decoder if decoder is not None else PtyliveDecoder()
        self.recorder = recorder
        self._commands: queue.SimpleQueue[tuple[SeriesControl, Future[tuple[bool, str]]]] = queue.SimpleQueue()
        n = len(config.worker_endpoints)
        scan_plan = scan_plan if scan_plan is not None else getattr(self.decoder, "plan", None)  # a DECTRIS one's
        self.book = SeriesBook(router_factory, registry if registry is not None else SeriesRegistry(), n, admit,
                               scan_of=None if scan_plan is None else scan_plan.decision, used=used)
        if hasattr(self.decoder, "fresh_id"):  # a detector's numbered series: a reused number gets a fresh id
            self.decoder.fresh_id = self.book.fresh_id
        self.forwarded, self.control_forwarded, self.blocked_s = [0] * n, [0] * n, [0.0] * n
        self.bytes_forwarded = [0] * n
        self._batches: list[list[list[Any]]] = [[] for _ in range(n)]  # per worker: frames waiting for one send
        self._batch_bytes, self._batch_pixel_bytes = [0] * n, [0] * n
        self.in_flight = InFlight(n, config.max_buffered_bytes) if config.max_buffered_bytes else None
        self.unsent_on_stop = self.messages_received = 0
        self._preload: Iterable[list[Any]] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed, self._own_context = False, context is None
        self._context: zmq.Context = zmq.Context() if context is None else context
        self._pull, self._pushes = self._context.socket(zmq.PULL), list[zmq.Socket]()
        try:
            self._pull.linger, self._pull.rcvhwm = 0, config.recv_hwm
            self._pull.setsockopt(zmq.MAXMSGSIZE, MAX_PART_BYTES)
            (self._pull.bind if config.bind else self._pull.connect)(config.endpoint)
            for endpoint in config.worker_endpoints:
                push = self._context.socket(zmq.PUSH)
                push.sndhwm, push.linger = config.send_hwm, config.linger_ms
                if config.socket_buffer_bytes:
                    push.sndbuf = config.socket_buffer_bytes
                self._pushes.append(push)
                push.bind(endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self._endpoint = self._pull.getsockopt_string(zmq.LAST_ENDPOINT) if config.bind else config.endpoint
        if config.bind and binds_every_interface(self._endpoint):
            logger.warning("detector ingest bound to every interface (%s): whoever reaches this machine can stream "
                           "series into the daemon; bind one address (ingest.endpoint) or firewall the port",
                           self._endpoint)
        self._worker_endpoints = tuple(p.getsockopt_string(zmq.LAST_ENDPOINT) for p in self._pushes)

    @property
    def endpoint(self) -> str:
        """The detector-side endpoint, with the actual port after binding port 0."""
        return self._endpoint

    @property
    def registry(self) -> SeriesRegistry:
        """Series and frame counters (read them through :meth:`snapshot` from other threads)."""
        return self.book.registry

    @property
    def routing_errors(self) -> int:
        return self.book.routing_errors

    @property
    def worker_endpoints(self) -> tuple[str, ...]:
        """The bound worker endpoints (actual ports), worker ``w`` at index ``w``."""
        return self._worker_endpoints

    def preload(self, messages: Iterable[list[Any]]) -> None:
        """Messages to take, in order, before any from the detector (a resumed series' recorded ones:
        :mod:`ptylive.daemon.service.resume`); they go the detector's messages' way (recorded, decoded, admitted,
        routed, bounded). Call before :meth:`start`."""
        if self._thread is not None:
            raise RuntimeError("preload before the ingest starts")
        self._preload = messages

    def run(self, stop: threading.Event) -> None:
        """Receive and forward until ``stop`` is set; malformed input is counted, never raised."""
        native = type(self.decoder) is PtyliveDecoder
        for n, parts in enumerate(self._preload, 1):
            self._take(parts, stop, native)
            if stop.is_set():
                return
            if n % PRELOAD_COMMANDS_EVERY == 0:  # finalize/abort requests are answered meanwhile
                self._flush_batches(stop)
                self._run_commands(stop)
        self._flush_batches(stop)
        poller = zmq.Poller()  # one for the whole run: Socket.poll builds a Poller per call (µs per wake-up)
        poller.register(self._pull, zmq.POLLIN)
        while not stop.is_set():
            self._run_commands(stop)
            self._end_idle(stop)
            if not poller.poll(self.config.poll_ms):
                continue
            self._drain(stop)
            self._flush_batches(stop)

    def _drain(self, stop: threading.Event) -> None:
        """Take up to ``RECV_BATCH`` waiting messages. The hot path: per message, one ``recv`` per part (the
        part's own ``more`` flag, not a ``getsockopt`` per part as ``recv_multipart`` does), one decode, one
        route, one ``send`` per part; nothing else runs per frame (measured: ``ptylive bench ingest``)."""
        recv, native = self._pull.recv, type(self.decoder) is PtyliveDecoder
        for _ in range(RECV_BATCH):
            try:
                part = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            parts = [part]
            while part.more:  # the rest of a multipart message is there once its first part is
                part = recv(_NOBLOCK, copy=False)
                parts.append(part)
            self._take(parts, stop, native)
            if stop.is_set():
                return

    def _take(self, parts: list[Any], stop: threading.Event, native: bool) -> None:
        """One message: recorded, decoded, dispatched (``native``: the decoder is ptylive stream v1's)."""
        self.messages_received += 1
        if self.recorder is not None:  # everything, malformed traffic included
            self.recorder.write(parts)
        if native:  # ptylive stream v1: one message in, forwarded as received
            try:
                message = decode(parts)
            except ProtocolError as exc:
                self.book.record_protocol_error(exc.reason)
            else:
                self._dispatch(message, parts, stop)
        else:
            self._handle_decoded(self.decoder.feed(parts), stop)

    def _handle_decoded(self, outcomes: list[Any], stop: threading.Event) -> None:
        """Count what a decoder rejected, forward what it decoded."""
        for outcome in outcomes:
            if isinstance(outcome, ProtocolError):
                self.book.record_protocol_error(outcome.reason)
            else:
                self._dispatch(outcome[0], outcome[1], stop)

    def _dispatch(self, message: Message, parts: list[Any], stop: threading.Event) -> None:
        if isinstance(message, Frame):
            wire_bytes = message.payload.nbytes  # pixels, or the compressed buffer
            message = message.header_view()  # a compressed frame is checked, never decoded, on rank 0
            worker = self.book.route(message)
            if worker is not None:  # raw pixels or the placeholder: the decoded size
                self._forward_frame(worker, parts, wire_bytes, message.payload.nbytes, stop)
        elif isinstance(message, SeriesStart):
            if self.book.start(message):
                self._broadcast(parts, stop)
        elif self.book.end(message):
            self._broadcast(parts, stop)

    def _forward_frame(self, worker: int, parts: list[Any], wire_bytes: int, pixel_bytes: int,
                       stop: threading.Event) -> None:
        """Send a frame now (large) or add it to its worker's batch (small; see the module docstring)."""
        if wire_bytes > BATCH_FRAME_BYTES:
            if self._send(worker, parts, stop):
                self.forwarded[worker] += 1
                self.bytes_forwarded[worker] += pixel_bytes
            return
        self._batches[worker].append(parts)
        self._batch_bytes[worker] += wire_bytes
        self._batch_pixel_bytes[worker] += pixel_bytes
        if len(self._batches[worker]) >= BATCH_FRAMES or self._batch_bytes[worker] >= BATCH_BYTES:
            self._flush_batch(worker, stop)

    def _flush_batches(self, stop: threading.Event) -> None:
        for worker, batch in enumerate(self._batches):
            if batch:
                self._flush_batch(worker, stop)

    def _flush_batch(self, worker: int, stop: threading.Event) -> None:
        """Send ``worker``'s waiting frames: alone if one, else as one ``frame_batch`` message."""
        batch, pixel_bytes = self._batches[worker], self._batch_pixel_bytes[worker]
        self._batches[worker], self._batch_bytes[worker], self._batch_pixel_bytes[worker] = [], 0, 0
        if len(batch) == 1:
            message = batch[0]
        else:
            message = [encode_batch_header(len(batch))]
            for parts in batch:
                message += parts
        ledger = None
        if self.in_flight is not None:  # one entry per frame, the batch header's bytes on the first
            ledger = [message_bytes(parts) for parts in batch]
            ledger[0] += message_bytes(message) - sum(ledger)
        if self._send(worker, message, stop, ledger=ledger, messages=len(batch)):
            self.forwarded[worker] += len(batch)
            self.bytes_forwarded[worker] += pixel_bytes

    def request(self, control: SeriesControl, timeout_s: float = 5.0) -> tuple[bool, str]:
        """Ask the ingest thread to finalize or abort a series (None: the current one) or to shut down.

        Thread-safe. The ingest ends the series in the registry (later frames of it are rejected as
        ``"finished_series"``) and forwards the control message to every worker behind the frames already
        sent. Returns ``(accepted, message)``; ``(False, ...)`` when no such series is live.
        """
        result: Future[tuple[bool, str]] = Future()
        self._commands.put((control, result))
        if self._thread is None or not self._thread.is_alive():
            return False, "the ingest is not running"
        try:
            return result.result(timeout=timeout_s)
        except TimeoutError:  # e.g. a worker queue stays full; the command still runs when there is room
            return False, f"the ingest did not carry out {control.action!r} within {timeout_s} s"

    def _run_commands(self, stop: threading.Event) -> None:
        while not self._commands.empty():
            control, result = self._commands.get()
            if control.action == "shutdown":
                self._broadcast(encode_control(control), stop)
                result.set_result((True, "shutting down"))
                continue
            series_id, ended = self.book.end_now(control.series_id, control.action)
            if not ended:
                result.set_result((False, f"no live series {series_id!r}" if series_id else "no series is live"))
                continue
            self._broadcast(encode_control(SeriesControl(control.action, series_id)), stop)
            result.set_result((True, f"series {series_id!r}: {control.action}"))

    def _end_idle(self, stop: threading.Event) -> None:
        if self.config.idle_timeout_s > 0:
            series_id = self.book.end_idle(self.config.idle_timeout_s)
            if series_id is not None:
                self._broadcast(encode_control(SeriesControl("incomplete", series_id)), stop)

    def _broadcast(self, parts: list[Any], stop: threading.Event) -> None:
        """Send ``parts`` to every worker, after the frames batched for it (order per worker is kept)."""
        self._flush_batches(stop)
        for worker in range(len(self._pushes)):
            if self._send(worker, parts, stop):
                self.control_forwarded[worker] += 1

    def _send(self, worker: int, parts: list[Any], stop: threading.Event, ledger: list[int] | None = None,
              messages: int = 1) -> bool:
        """Send without copying; while the byte bound or the worker's queue is full wait for room. False only if
        stopped. ``messages``: what the worker will count in it (a batch's frames), ``ledger`` their sizes."""
        nbytes = message_bytes(parts) if self.in_flight is not None else 0
        push, waited = self._pushes[worker], False
        while True:
            if self._room_for(nbytes):
                try:  # send_multipart's per-call type checks and flag arithmetic, without them
                    send = push.send
                    for part in parts[:-1]:
                        send(part, _MORE_NOBLOCK, copy=False)  # later parts of an accepted first one never block
                    send(parts[-1], _NOBLOCK, copy=False)
                    if self.in_flight is not None:
                        for size in ledger or [nbytes]:
                            self.in_flight.sent(worker, size)
                    return True
                except zmq.Again:
                    wait_for_socket = True
            else:
                wait_for_socket = False
                if not waited and self.in_flight is not None:
                    waited, self.in_flight.waits = True, self.in_flight.waits + 1
            if stop.is_set():
                self.unsent_on_stop += messages
                logger.warning("stopped while worker %d was full: %d message(s) not forwarded", worker, messages)
                return False
            began = time.monotonic()
            if wait_for_socket:
                push.poll(self.config.poll_ms, zmq.POLLOUT)
            else:  # the workers' reports come with their heartbeats
                stop.wait(self.config.poll_ms / 1000)
            self.blocked_s[worker] += time.monotonic() - began

    def _room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit under ``max_buffered_bytes`` (always without one), after the latest reports."""
        if self.in_flight is None or self._taken is None:
            return True
        for worker in range(len(self._pushes)):
            self.in_flight.settle(worker, self._taken(worker))
        return self.in_flight.room_for(nbytes)

    def start(self) -> None:
        """Run :meth:`run` in a daemon thread; stop it with :meth:`join`."""
        if self._thread is not None:
            raise RuntimeError("the ingest was already started")
        self._thread = threading.Thread(target=self._run_in_thread, name="ptylive-ingest", daemon=True)
        self._thread.start()

    def _run_in_thread(self) -> None:
        try:
            self.run(self._stop)
        except BaseException as exc:  # stored and re-raised by join(), never swallowed
            logger.exception("ingest thread failed")
            self._error = exc

    def thread_state(self) -> tuple[bool, BaseException | None]:
        """Whether the ingest thread runs, and the exception that ended it (None: none, or collected by join)."""
        return self._thread is not None and self._thread.is_alive(), self._error

    def join(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it; re-raise its exception; TimeoutError if it is still running."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the ingest thread still runs after {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Stop the thread (an error it raised is logged, not lost: see :meth:`join`) and close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                logger.error("ingest thread error not collected by join(): %r", self._error)
        if not self._closed:
            self._closed = True
            if self.recorder is not None:
                self.recorder.close()
            for socket in [*self._pushes, self._pull]:
                socket.close()
            if self._own_context:
                self._context.term()

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable counters: the registry, the current series' router, and each worker."""
        registry, router, routing_errors = self.book.snapshot()
        # no worker endpoints: /status publishes this, and whoever reaches them can take frames
        workers = [{"worker": w, "forwarded": self.forwarded[w], "blocked_s": self.blocked_s[w],
                    "bytes_forwarded": self.bytes_forwarded[w],
                    "control_forwarded": self.control_forwarded[w]} for w in range(len(self._pushes))]
        return {"endpoint": self._endpoint, "messages_received": self.messages_received, "registry": registry,
                "router": router, "workers": workers, "routing_errors": routing_errors,
                "unsent_on_stop": self.unsent_on_stop, "decoder": self.decoder.snapshot(),
                "buffered": None if self.in_flight is None else self.in_flight.snapshot(),
                "recording": None if self.recorder is None else self.recorder.snapshot()}
