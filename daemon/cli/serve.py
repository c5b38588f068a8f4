"""``ptylive serve --config FILE``: the streaming daemon, one MPI job of ``workers.ranks + 1`` processes.

Rank 0 runs :class:`~ptylive.daemon.service.supervisor.Rank0` (ingest, collector, HTTP); ranks 1…R run
:class:`~ptylive.daemon.worker.rank.Worker` ``w = rank − 1``. The workers get a communicator of their own
for the halo exchange and the per-tick consensus. Rank 0 binds every internal socket (``ipc://`` in a
private folder, or TCP on port 0 of ``[workers] internal_interface``:
:mod:`~ptylive.daemon.service.internal_sockets`) and broadcasts the endpoints once, with its host's identity,
msgpack-encoded (never pickled). If rank 0 cannot start (a port in
use, a missing output folder), it broadcasts the error instead and every rank exits.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import msgpack
import zmq

from ptylive.daemon.engine.exchange.gather import broadcast_bytes
from ptylive.daemon.service import messages
from ptylive.daemon.service.checkpoints import state_folder
from ptylive.daemon.service.config import DaemonConfig
from ptylive.daemon.service.internal_sockets import check_reachable, host_identity
from ptylive.daemon.worker.rank import Worker, WorkerSettings
from ptylive.streaming.inbox import WorkerInbox

logger = logging.getLogger(__name__)


def check_startup(config: DaemonConfig, size: int) -> None:
    """Errors a user can fix, raised before any socket is bound."""
    if size != config.workers.ranks + 1:
        raise ValueError(f"ptylive serve needs workers.ranks + 1 = {config.workers.ranks + 1} MPI processes, "
                         f"got {size}")
    if not config.output.folder.is_dir():
        raise ValueError(f"output folder {config.output.folder} does not exist")


def run(config: DaemonConfig, comm: Any) -> int:
    """Run this rank's role; returns the process exit code."""
    rank = comm.Get_rank()
    workers_comm = comm.Split(0 if rank == 0 else 1, rank)
    if rank == 0:
        return _run_rank0(config, comm)
    endpoints = msgpack.unpackb(broadcast_bytes(comm, None))
    if "error" in endpoints:
        return 1
    return _run_worker(config, rank - 1, endpoints, workers_comm)


def _run_rank0(config: DaemonConfig, comm: Any) -> int:
    from ptylive.daemon.service.supervisor import Rank0

    context = zmq.Context()
    try:
        check_startup(config, comm.Get_size())
        rank0 = Rank0(config, context)
    except (ValueError, OSError, zmq.ZMQError) as exc:
        broadcast_bytes(comm, msgpack.packb({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    broadcast_bytes(comm, msgpack.packb({**rank0.internal_endpoints(), "host": host_identity()}))
    try:
        return rank0.serve(abort=lambda: comm.Abort(1))
    finally:
        rank0.close()
        context.term()


def _run_worker(config: DaemonConfig, worker: int, endpoints: dict[str, Any], workers_comm: Any) -> int:
    for endpoint in (endpoints["collector"], endpoints["workers"][worker]):
        check_reachable(endpoint, endpoints.get("host"))
    context = zmq.Context()
    outbox = context.socket(zmq.PUSH)
    outbox.linger = 5000
    outbox.connect(endpoints["collector"])
    inbox = WorkerInbox(endpoints["workers"][worker], context, rcvhwm=config.ingest.queue_messages,
                        socket_buffer_bytes=config.ingest.socket_buffer_bytes)
    settings = WorkerSettings(worker, config.workers.ranks, config.reconstruction, config.workers.backend,
                              config.workers.precision, config.ingest.on_new_start, config.preview.rate_hz,
                              config.preview.max_px, state_folder(config.service.state_folder, config.output.folder),
                              config.service.checkpoint_interval_s, config.service.resume_iterations,
                              adf_annuli_mrad=config.virtual.annuli_mrad)
    node = Worker(settings, inbox, outbox, workers_comm if config.workers.ranks > 1 else None)

    def stop(*_: Any) -> None:
        node.shutdown = True
        for slot in node.slots.values():
            slot.flags.stop_level = 3

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        node.run()
    finally:
        outbox.send_multipart(messages.encode("bye", {"worker": worker}))
        inbox.close()
        outbox.close()
        context.term()
    return 0
