"""``ptylive ARGS`` inside the test's interpreter, with what a user's terminal would show.

A fresh interpreter per error test costs seconds (imports) to check a message printed before anything
runs. :class:`InProcessCli` calls :func:`ptylive.daemon.cli.main.main` instead and rebuilds the stderr a
subprocess would have printed:

* file-descriptor level capture (``capfd``), so C libraries' writes (HDF5 diagnostics) count too;
* log records of WARNING and above, written to stderr as ``main``'s ``basicConfig`` would;
* warnings that Python shows by default (not the deprecation family), one line each;
* argparse's ``SystemExit`` becomes the exit status.

It refuses to start ``mpiexec``: a test that gets that far did not fail where it meant to. What needs a
real process (the console script, a run under ``mpiexec``) stays a subprocess test
(:func:`tests.conftest.run_cli`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass

import pytest

from ptylive.daemon.cli import commands
from ptylive.daemon.cli.main import main

HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@dataclass(frozen=True)
class CliResult:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would have returned."""

    returncode: int
    stdout: str
    stderr: str


def _no_relaunch(n_ranks: int, argv: list[str], *_: object, **__: object) -> int:
    raise AssertionError(f"the command got as far as starting mpiexec with {n_ranks} ranks: {argv}")


class InProcessCli:
    """Call ``cli("reconstruct", "scan.h5", ...)``; returns a :class:`CliResult`."""

    def __init__(self, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capfd = capfd
        monkeypatch.setattr(commands, "relaunch", _no_relaunch)

    def __call__(self, *args: str) -> CliResult:
        self.capfd.readouterr()  # only this call's output
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    code = main(list(args))
                except SystemExit as exc:  # argparse: usage errors exit 2 after printing usage
                    code = exc.code if isinstance(exc.code, int) else 1
        finally:
            logging.getLogger().removeHandler(handler)
        out, err = self.capfd.readouterr()
        shown = [w for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT)]
        err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in shown)
        return CliResult(code, out, err)
