"""The process ``mpiexec`` starts for each rank: it runs the real rank as its child and names it if it dies.

Why a guard: when one rank dies (a SIGKILL, an OOM kill, a segfault), MPICH's hydra kills every other rank
within milliseconds, so no rank lives long enough to say which one died, and what ``mpiexec`` prints names
the wrong PID at times (docs/daemon.md, "Stopping and failures"). The guard is the dead rank's parent, so
``waitpid`` tells it exactly which process ended and how; and because the guard keeps its copies of the
rank's PMI socket and output pipes open, hydra notices nothing until the guard has written its report and
exited the same way (the same signal, or the same exit code).

The report is one line on stderr (through mpiexec to the journal, from every host) and, when the launcher
named a folder on this host in ``PTYLIVE_DEATH_REPORTS``, one JSON file there, which the launcher watches
(:func:`ptylive.daemon.cli.launcher.relaunch`): it logs the first death and sends ``STOPPING=1`` while
mpiexec is still tearing the job down.

The guard forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the rank. It dies with its own parent
(hydra's proxy), and the rank dies with the guard (Linux parent-death signals), so nothing is orphaned.
Run as ``python -m ptylive.daemon.cli.rank_guard PROGRAM [ARGS…]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORTS_ENV = "PTYLIVE_DEATH_REPORTS"
RANK_ENV_NAMES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass(frozen=True)
class Death:
    """How one rank's process ended, as its guard saw it.

    Attributes
    ----------
    rank : int
        Its MPI rank in COMM_WORLD (-1 when the launcher set none).
    pid : int
        The rank's own process id (the one in ``/status``'s ``worker_pids``), not the guard's.
    signal_number : int
        The signal that killed it; 0 when it exited by itself.
    exit_code : int
        Its exit code; 0 when a signal killed it.
    host : str
        The host it ran on.
    time_unix_s : float
        When the guard saw it end.
    """

    rank: int
    pid: int
    signal_number: int
    exit_code: int
    host: str
    time_unix_s: float

    def describe(self) -> str:
        """``MPI rank 2 (pid 1234 on host) was killed by SIGKILL`` or ``… exited with code 3``."""
        how = (f"was killed by {signal.Signals(self.signal_number).name}" if self.signal_number
               else f"exited with code {self.exit_code}")
        return f"MPI rank {self.rank} (pid {self.pid} on {self.host}) {how}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Death:
        """ValueError (or TypeError, KeyError) when ``text`` is not a report."""
        fields: dict[str, Any] = json.loads(text)
        return cls(rank=int(fields["rank"]), pid=int(fields["pid"]), signal_number=int(fields["signal_number"]),
                   exit_code=int(fields["exit_code"]), host=str(fields["host"]),
                   time_unix_s=float(fields["time_unix_s"]))


def rank_from_env(env: Mapping[str, str]) -> int:
    """This process's MPI rank from its launcher's environment; -1 when there is none."""
    for name in RANK_ENV_NAMES:
        if env.get(name, "").isdigit():
            return int(env[name])
    return -1


def read_reports(folder: Path) -> list[Death]:
    """Every report in ``folder``, earliest first; files that are not reports are skipped."""
    deaths = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            deaths.append(Death.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return sorted(deaths, key=lambda d: d.time_unix_s)


def die_with_parent(signum: int) -> None:
    """Linux: get ``signum`` when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def report(death: Death, folder: str | None) -> None:
    """One line on stderr, and ``rank-<rank>.json`` in ``folder`` when it exists here (written atomically)."""
    print(f"ptylive rank guard: {death.describe()}", file=sys.stderr, flush=True)
    if not folder or not os.path.isdir(folder):
        return
    path = Path(folder) / f"rank-{death.rank}.json"
    partial = path.with_suffix(".partial")
    try:
        partial.write_text(death.to_json())
        partial.replace(path)
    except OSError as exc:
        print(f"ptylive rank guard: could not write {path}: {exc.strerror}", file=sys.stderr, flush=True)


def guard(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` as the rank; report it if it fails; end as it ended (the same signal, or exit code)."""
    env = os.environ if env is None else env
    die_with_parent(signal.SIGKILL)
    children: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # signals that came before the rank existed, sent to it once it does

    def forward(signum: int, _: Any) -> None:
        if children:
            children[0].send_signal(signum)
        else:
            early.append(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    # close_fds=False: the rank inherits the PMI socket (PMI_FD) and everything else hydra gave us.
    child = subprocess.Popen(argv, close_fds=False, preexec_fn=lambda: die_with_parent(signal.SIGKILL))
    children.append(child)
    for pending in early:
        child.send_signal(pending)
    returncode = child.wait()
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    if returncode != 0:
        report(Death(rank=rank_from_env(env), pid=child.pid, signal_number=max(-returncode, 0),
                     exit_code=max(returncode, 0), host=socket.gethostname(), time_unix_s=time.time()),
               env.get(REPORTS_ENV))
    if returncode < 0:  # end by the same signal, so that mpiexec reports what it would have without us
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose handler cannot be set
            signal.signal(-returncode, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the rank dumped its core (if any); we have none
        os.kill(os.getpid(), -returncode)
    return returncode if returncode >= 0 else 128 - returncode


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m ptylive.daemon.cli.rank_guard PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    return guard(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
