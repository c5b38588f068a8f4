"""Where rank 0's internal sockets live: ``ipc://`` in a private folder, or loopback TCP on request.

The internal sockets are the ingest's PUSH to each worker and the collector's PULL from every worker.
Whoever can connect to them can take frames or fake a worker, so by default they are ZeroMQ ``ipc://``
sockets (Unix domain sockets) in a folder only this user can enter::

    $RUNTIME_DIRECTORY/ptylive-XXXXXXXX/   mode 0700, made with tempfile.mkdtemp, removed by close()
        w0 w1 …                            ingest -> worker w (PUSH, bound by rank 0)
        c                                  workers -> collector (PULL, bound by rank 0)

The base is systemd's ``$RUNTIME_DIRECTORY`` (``/run/ptylive`` under the unit), else ``$XDG_RUNTIME_DIR``,
else the temporary folder. Every rank must then run on this host. ``transport = "tcp"`` binds loopback TCP
on port 0 instead (what the daemon did before: reachable by every local user), kept for a later multi-host layout.

A Unix socket's path has at most :data:`IPC_PATH_LIMIT` bytes; a longer one is refused with the path, so
the fix (a shorter ``RUNTIME_DIRECTORY`` or ``TMPDIR``) is plain.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Transport = Literal["ipc", "tcp"]
TCP_ANY_PORT = "tcp://127.0.0.1:0"
#: ``sizeof(sockaddr_un.sun_path) - 1`` on Linux: the longest path ZeroMQ can bind as ``ipc://``.
IPC_PATH_LIMIT = 107
COLLECTOR_NAME = "c"


def runtime_base(environ: Mapping[str, str]) -> Path | None:
    """``$RUNTIME_DIRECTORY`` (its first entry), else ``$XDG_RUNTIME_DIR``; None: the temporary folder."""
    for variable in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        base = environ.get(variable, "").split(":")[0]  # RUNTIME_DIRECTORY lists one per RuntimeDirectory=
        if base:
            return Path(base)
    return None


class InternalSockets:
    """The endpoints rank 0 binds for its workers; :meth:`close` removes the private folder.

    Parameters
    ----------
    transport : "ipc" or "tcp"
    n_workers : int
        Worker ranks (the longest socket name is checked against :data:`IPC_PATH_LIMIT` at once).
    environ : mapping, optional
        Where the runtime folder is looked up (``os.environ`` when None).

    Attributes
    ----------
    folder : Path or None
        The private folder of the ``ipc://`` sockets (None with TCP); gone after :meth:`close`.
    """

    def __init__(self, transport: Transport, n_workers: int, environ: Mapping[str, str] | None = None) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"internal transport must be 'ipc' or 'tcp', got {transport!r}")
        self.transport = transport
        self.folder: Path | None = None
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

    def _path(self, name: str) -> str:
        assert self.folder is not None
        path = str(self.folder / name)
        if len(os.fsencode(path)) > IPC_PATH_LIMIT:
            raise ValueError(f"internal socket path {path!r} is {len(os.fsencode(path))} bytes; a Unix socket "
                             f"takes at most {IPC_PATH_LIMIT}: set a shorter RUNTIME_DIRECTORY (or TMPDIR)")
        return path

    def worker(self, worker: int) -> str:
        """The endpoint the ingest binds for worker ``worker`` (PUSH)."""
        return TCP_ANY_PORT if self.folder is None else f"ipc://{self._path(f'w{worker}')}"

    def collector(self) -> str:
        """The endpoint the collector binds for every worker's messages (PULL)."""
        return TCP_ANY_PORT if self.folder is None else f"ipc://{self._path(COLLECTOR_NAME)}"

    def close(self) -> None:
        """Remove the private folder and whatever socket files are left in it. Safe to call twice."""
        if self._remove is not None:
            self._remove()


def check_reachable(endpoint: str) -> None:
    """On a worker: an ``ipc://`` endpoint whose folder is missing means rank 0 runs on another host.

    ZeroMQ would retry the connection for ever in silence; this names the cause instead (ValueError).
    """
    if endpoint.startswith("ipc://") and not Path(endpoint.removeprefix("ipc://")).parent.is_dir():
        raise ValueError(f"internal endpoint {endpoint!r} is not on this host (its folder is missing): every rank "
                         f"must run on rank 0's host, or set [workers] internal_transport = \"tcp\"")
