"""Start ourselves under ``mpiexec`` when a command needs several ranks.

``ptylive reconstruct --ranks 4`` run from a shell re-executes itself as
``mpiexec -n 4 python -m ptylive.daemon.cli.main …``; under a launcher already
(``mpiexec -n 4 ptylive reconstruct …``) it runs in place.

``--hostfile FILE`` is handed to mpiexec as ``-f FILE`` (MPICH hydra: one ``host[:slots]`` a line; rank 0
on the first host). How hydra reaches the hosts is its own configuration, from the environment it inherits:
``HYDRA_LAUNCHER`` (``ssh``, or ``slurm`` inside an allocation, detected by itself),
``HYDRA_LAUNCHER_EXEC``, ``HYDRA_IFACE`` (docs/operations.md, "Several hosts").

Each rank runs under a guard (:mod:`.rank_guard`) that names it if it dies; :func:`relaunch` watches the
guards' reports, logs the first death (rank, PID, signal) as an ERROR and sends systemd ``STOPPING=1`` while
mpiexec is still ending the rest of the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ptylive.daemon.cli.rank_guard import REPORTS_ENV, die_with_parent, read_reports
from ptylive.daemon.service.notify import notify

logger = logging.getLogger(__name__)

MPI_ENV_MARKERS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def under_mpi() -> bool:
    """True when this process was started by an MPI launcher."""
    return any(name in os.environ for name in MPI_ENV_MARKERS)


def find_mpiexec() -> str:
    """``mpiexec`` beside our Python (the PyPI MPICH wheel installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("mpiexec not found: install ptylive with its dependencies (mpich wheel)")
    return found


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so that a launcher killed with SIGKILL does not
    leave mpiexec and its ranks running with their ports bound (Linux; a no-op elsewhere)."""
    die_with_parent(signal.SIGTERM)


def mpiexec_command(n_ranks: int, argv: list[str], module: str, hostfile: Path | None = None) -> list[str]:
    """``mpiexec [-f HOSTFILE] -n N python -P -m ptylive.daemon.cli.rank_guard python -P -m MODULE argv``;
    ValueError when the hostfile cannot be read.

    Every host must have this Python at the same path (a shared or identical install) and see the same files.
    """
    hosts: list[str] = []
    if hostfile is not None:
        try:
            listed = hostfile.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"hostfile {hostfile}: cannot be read ({exc.strerror})") from None
        if not any(line.split("#")[0].strip() for line in listed):
            raise ValueError(f"hostfile {hostfile} names no host (expected one host[:slots] a line)")
        hosts = ["-f", str(hostfile.resolve())]
    # -P: the working directory is not put on sys.path, so a "ptylive" folder there cannot shadow the package
    rank = [sys.executable, "-P", "-m", module, *argv]
    return [find_mpiexec(), *hosts, "-n", str(n_ranks), sys.executable, "-P", "-m", "ptylive.daemon.cli.rank_guard",
            *rank]


def relaunch(n_ranks: int, argv: list[str], module: str = "ptylive.daemon.cli.main",
             env: dict[str, str] | None = None, hostfile: Path | None = None, poll_s: float = 0.05) -> int:
    """Run ``python -m MODULE argv`` on ``n_ranks`` ranks (on the hosts of ``hostfile``, if given), with ``env``
    added; return its exit code. A rank that dies is logged (rank, PID, signal) the moment its guard reports it,
    within ``poll_s``."""
    command = mpiexec_command(n_ranks, argv, module, hostfile)
    reports = Path(tempfile.mkdtemp(prefix="rank-reports-", dir=os.environ.get("RUNTIME_DIRECTORY") or None))
    env = {**os.environ, **(env or {}), REPORTS_ENV: str(reports)}
    # One compute thread per rank: ranks carry the parallelism (docs/architecture.md, performance notes).
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, "1")
    env.setdefault("OMP_WAIT_POLICY", "passive")
    logger.debug("launching %s", " ".join(command))
    try:
        process = subprocess.Popen(command, env=env, preexec_fn=_terminate_with_parent)
        # mpiexec forwards SIGTERM/SIGINT to every rank and waits for them: pass ours on (systemd's
        # KillMode=mixed signals only this process) and keep waiting, so no rank is orphaned. SIGHUP (a closed
        # terminal, or ``systemctl kill -s HUP``) means the same as SIGTERM: stop, saving what there is.
        forwarded = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}
        previous = {signum: signal.signal(signum, lambda s, _: process.send_signal(forwarded[signal.Signals(s)]))
                    for signum in forwarded}
        try:
            return _wait_watching(process, reports, poll_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def _wait_watching(process: subprocess.Popen[bytes], reports: Path, poll_s: float) -> int:
    """Wait for mpiexec; log each rank death its guards report (the first as the cause) and, at the first,
    tell systemd the service is stopping."""
    logged: set[tuple[int, int]] = set()

    def log_new() -> None:
        for death in read_reports(reports):
            if (death.rank, death.pid) in logged:
                continue
            if not logged:
                logger.error("%s; mpiexec ends the job", death.describe())
                notify(f"STOPPING=1\nSTATUS={death.describe()}")
            else:
                logger.warning("then %s", death.describe())
            logged.add((death.rank, death.pid))

    while True:
        try:
            code = process.wait(poll_s)
            break
        except subprocess.TimeoutExpired:
            log_new()
    log_new()  # a report written just before mpiexec ended
    return code

