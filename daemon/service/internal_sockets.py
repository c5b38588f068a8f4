"""Where rank 0's internal sockets live: ``ipc://`` in a private folder, or TCP on a chosen interface.

The internal sockets are the ingest's PUSH to each worker and the collector's PULL from every worker.
Whoever can connect to them can take frames or fake a worker, so by default they are ZeroMQ ``ipc://``
sockets (Unix domain sockets) in a folder only this user can enter::

    $RUNTIME_DIRECTORY/ptylive-XXXXXXXX/   mode 0700, made with tempfile.mkdtemp, removed by close()
        w0 w1 …                            ingest -> worker w (PUSH, bound by rank 0)
        c                                  workers -> collector (PULL, bound by rank 0)

The base is systemd's ``$RUNTIME_DIRECTORY`` (``/run/ptylive`` under the unit), else ``$XDG_RUNTIME_DIR``,
else the temporary folder. Every rank must then run on this host.

``transport = "tcp"`` binds TCP on port 0 of ``interface`` instead: loopback (``127.0.0.1``) when it is
empty, else one of this host's IPv4 addresses or the name of an interface (``ib0``, ``eth0``: ZeroMQ binds
that interface's address). Only rank 0 binds; the workers connect, so only rank 0's host needs the
interface. The endpoints actually bound (with their ports) reach the workers in rank 0's MPI broadcast
(``ptylive.daemon.cli.serve``), never ``/status`` or the ready file. TCP is not authenticated: anyone who can
reach the address can connect (docs/operations.md, "Several hosts").

A wildcard address (``0.0.0.0``, ``*``) is refused: its endpoint names no address a worker could connect
to, and it would open the sockets on every interface. A Unix socket's path has at most
:data:`IPC_PATH_LIMIT` bytes; a longer one is refused with the path, so the fix (a shorter
``RUNTIME_DIRECTORY`` or ``TMPDIR``) is plain.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Transport = Literal["ipc", "tcp"]
LOOPBACK = "127.0.0.1"
TCP_ANY_PORT = f"tcp://{LOOPBACK}:0"
#: ``sizeof(sockaddr_un.sun_path) - 1`` on Linux: the longest path ZeroMQ can bind as ``ipc://``.
IPC_PATH_LIMIT = 107
COLLECTOR_NAME = "c"
WILDCARDS = ("*", "0.0.0.0")
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # Linux: IFNAMSIZ - 1 bytes
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def runtime_base(environ: Mapping[str, str]) -> Path | None:
    """``$RUNTIME_DIRECTORY`` (its first entry), else ``$XDG_RUNTIME_DIR``; None: the temporary folder."""
    for variable in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        base = environ.get(variable, "").split(":")[0]  # RUNTIME_DIRECTORY lists one per RuntimeDirectory=
        if base:
            return Path(base)
    return None


def interface_problem(interface: str) -> str | None:
    """What is wrong with ``[workers] internal_interface`` as written (any host), or None.

    Empty (loopback), an IPv4 address or an interface name are fine; a wildcard or an IPv6 address is not.
    Whether the interface exists is checked where it is bound (:func:`tcp_host`, on rank 0's host).
    """
    if interface in WILDCARDS:
        return "a wildcard binds every interface and names no address a worker could connect to"
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return None if INTERFACE_NAME.fullmatch(interface) else "neither an IPv4 address nor an interface name"
    if address.version != 4:
        return "IPv6 is not supported for the internal sockets; give an IPv4 address or an interface name"
    if address.is_unspecified:
        return "a wildcard binds every interface and names no address a worker could connect to"
    return None


def tcp_host(interface: str) -> str:
    """The host part of rank 0's TCP endpoints: loopback for ``""``, else ``interface`` once checked on this host.

    ValueError names the interface and this host's interfaces when it is neither an address nor one of them.
    """
    if not interface:
        return LOOPBACK
    problem = interface_problem(interface)
    if problem is not None:
        raise ValueError(f"internal interface {interface!r}: {problem}")
    try:
        ipaddress.ip_address(interface)
    except ValueError:
        names = [name for _, name in socket.if_nameindex()]
        if interface not in names:
            raise ValueError(f"internal interface {interface!r} is not an interface of this host "
                             f"({', '.join(names)}) nor an IPv4 address") from None
    return interface


def host_identity() -> str:
    """This kernel and network namespace, as ``boot_id/net:[inode]``.

    Two processes with the same identity reach each other on loopback; rank 0 sends its own to the workers so
    that one on another host (or in another network namespace) is told why a loopback endpoint cannot work.
    """
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        network = os.readlink("/proc/self/ns/net")
    except OSError:
        network = ""
    return f"{boot}/{network}"


class InternalSockets:
    """The endpoints rank 0 binds for its workers; :meth:`close` removes the private folder.

    Parameters
    ----------
    transport : "ipc" or "tcp"
    n_workers : int
        Worker ranks (the longest socket name is checked against :data:`IPC_PATH_LIMIT` at once).
    environ : mapping, optional
        Where the runtime folder is looked up (``os.environ`` when None).
    interface : str, optional
        With TCP: an IPv4 address or interface name of this host to bind on; ``""``: loopback.

    Attributes
    ----------
    folder : Path or None
        The private folder of the ``ipc://`` sockets (None with TCP); gone after :meth:`close`.
    """

    def __init__(self, transport: Transport, n_workers: int, environ: Mapping[str, str] | None = None,
                 interface: str = "") -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"internal transport must be 'ipc' or 'tcp', got {transport!r}")
        if interface and transport != "tcp":
            raise ValueError(f"internal interface {interface!r} needs the 'tcp' transport, got {transport!r}")
        self.transport = transport
        self.folder: Path | None = None
        self._tcp = f"tcp://{tcp_host(interface)}:0"
        self._remove: weakref.finalize[..., InternalSockets] | None = None
        if transport == "ipc":
            base = runtime_base(os.environ if environ is None else environ)
            self.folder = Path(tempfile.mkdtemp(prefix="ptylive-", dir=base))  # mode 0700, a fresh name
            # also at interpreter exit, when a later part of rank 0's start fails and close() is never called
            self._remove = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
            try:
                self.worker(n_workers - 1)  # the longest name
            except ValueError:
                self.close()
                raise
            logger.debug("internal sockets in %s", self.folder)
        elif interface:
            logger.warning("internal sockets on %s (TCP, not authenticated): anyone who can reach it can connect",
                           interface)

    def _path(self, name: str) -> str:
        assert self.folder is not None
        path = str(self.folder / name)
        if len(os.fsencode(path)) > IPC_PATH_LIMIT:
            raise ValueError(f"internal socket path {path!r} is {len(os.fsencode(path))} bytes; a Unix socket "
                             f"takes at most {IPC_PATH_LIMIT}: set a shorter RUNTIME_DIRECTORY (or TMPDIR)")
        return path

    def worker(self, worker: int) -> str:
        """The endpoint the ingest binds for worker ``worker`` (PUSH)."""
        return self._tcp if self.folder is None else f"ipc://{self._path(f'w{worker}')}"

    def collector(self) -> str:
        """The endpoint the collector binds for every worker's messages (PULL)."""
        return self._tcp if self.folder is None else f"ipc://{self._path(COLLECTOR_NAME)}"

    def close(self) -> None:
        """Remove the private folder and whatever socket files are left in it. Safe to call twice."""
        if self._remove is not None:
            self._remove()


def check_reachable(endpoint: str, rank0_host: str | None = None) -> None:
    """On a worker: refuse an endpoint that cannot reach rank 0 from here, naming the cause (ValueError).

    ZeroMQ would retry the connection for ever in silence. An ``ipc://`` endpoint whose folder is missing, or a
    loopback TCP endpoint while ``rank0_host`` (rank 0's :func:`host_identity`) is not this one's, means rank 0
    runs on another host or in another network namespace.
    """
    if endpoint.startswith("ipc://") and not Path(endpoint.removeprefix("ipc://")).parent.is_dir():
        raise ValueError(f"internal endpoint {endpoint!r} is not on this host (its folder is missing): every rank "
                         f"must run on rank 0's host, or set [workers] internal_transport = \"tcp\" and "
                         f"internal_interface")
    if endpoint.startswith("tcp://127.") and rank0_host is not None and rank0_host != host_identity():
        raise ValueError(f"internal endpoint {endpoint!r} is rank 0's loopback, and this worker runs on another "
                         f"host (or network namespace): set [workers] internal_interface to an address or "
                         f"interface of rank 0's host that the workers can reach")
