"""``ptylive service install --prefix DIR``: write the deployment files the package ships under DIR.

The files are package data of ``ptylive.systemd`` (the repository's ``systemd/`` folder). They land where
the host's programs read them, with DIR standing for ``/``::

    DIR/etc/systemd/system/ptylive.service                   ExecStart: this installation's ptylive
    DIR/etc/ptylive/ptylive.toml                             the example config, to edit
    DIR/etc/prometheus/ptylive.yml                           the scrape job (scrape_config_files)
    DIR/etc/grafana/provisioning/datasources/ptylive.yaml    Grafana's datasource and dashboard provider
    DIR/etc/grafana/provisioning/dashboards/ptylive.yaml
    DIR/var/lib/grafana/dashboards/ptylive/ptylive-dashboard.json   (the provider's options.path)

Nothing is written while any target exists, unless ``force``: an edited config is never lost by accident.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

PACKAGE = "ptylive.systemd"
UNIT = "etc/systemd/system/ptylive.service"
CONFIG = "etc/ptylive/ptylive.toml"
PROMETHEUS_JOB = "etc/prometheus/ptylive.yml"
# (file in the package, where it goes under the prefix)
FILES: tuple[tuple[str, str], ...] = (
    ("ptylive.service", UNIT),
    ("ptylive.toml", CONFIG),
    ("prometheus.yml", PROMETHEUS_JOB),
    ("grafana/provisioning/datasources/ptylive.yaml", "etc/grafana/provisioning/datasources/ptylive.yaml"),
    ("grafana/provisioning/dashboards/ptylive.yaml", "etc/grafana/provisioning/dashboards/ptylive.yaml"),
    ("grafana/ptylive-dashboard.json", "var/lib/grafana/dashboards/ptylive/ptylive-dashboard.json"),
)
_PLAIN_ARGUMENT = re.compile(r"[\w@+=:,./-]+")


def ptylive_command(executable: str = sys.executable) -> list[str]:
    """The command that starts this installation's ptylive: the console script beside the interpreter.

    The interpreter's path is kept as it is (a venv's ``bin/python`` is a link out of the venv); without a
    script there, ``python -P -m ptylive.daemon.cli.main`` (``-P``: the working directory shadows nothing).
    """
    interpreter = Path(os.path.abspath(executable))
    script = interpreter.parent / "ptylive"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(interpreter), "-P", "-m", "ptylive.daemon.cli.main"]


def _systemd_quoted(argument: str) -> str:
    """One ExecStart argument: ``%`` escaped (a specifier otherwise), double quotes around anything unusual."""
    argument = argument.replace("%", "%%")
    if _PLAIN_ARGUMENT.fullmatch(argument):
        return argument
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(template: str, command: Sequence[str]) -> str:
    """The shipped unit with ExecStart running ``command`` and PATH starting at its folder (its mpiexec)."""
    exec_start = " ".join(_systemd_quoted(a) for a in [*command, "serve", "--config", "/" + CONFIG])
    text, replaced = re.subn(r"^ExecStart=.*$", lambda _: f"ExecStart={exec_start}", template, flags=re.MULTILINE)
    if replaced != 1:
        raise ValueError(f"the packaged unit has {replaced} ExecStart= lines, expected 1")
    bin_folder = str(Path(command[0]).parent).replace("%", "%%")
    return re.sub(r"^Environment=PATH=[^:\n]*:", lambda _: f"Environment=PATH={bin_folder}:", text, count=1,
                  flags=re.MULTILINE)


def install(prefix: Path, force: bool = False, command: Sequence[str] | None = None) -> list[Path]:
    """Write every file of :data:`FILES` under ``prefix``; the paths written, in order.

    Raises
    ------
    FileExistsError
        When a target exists and ``force`` is false (nothing is written then), naming every such file.
    """
    targets = [(source, prefix / relative) for source, relative in FILES]
    existing = [str(target) for _, target in targets if target.exists() or target.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"not overwriting {', '.join(existing)} (--force replaces them)")
    package = files(PACKAGE)
    for source, target in targets:
        text = package.joinpath(source).read_text(encoding="utf-8")
        if source == "ptylive.service":
            text = unit_text(text, command if command is not None else ptylive_command())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a link is replaced, not written through
        target.write_text(text, encoding="utf-8")
        target.chmod(0o644)
    return [target for _, target in targets]


def next_steps(prefix: Path) -> str:
    """What an operator does after :func:`install` (as root)."""
    root = prefix.resolve() == Path("/")
    steps = [] if root else [f"copy the tree under {prefix} to / (or run with --prefix /), then:"]
    steps += [
        "useradd --system --home /var/lib/ptylive --shell /usr/sbin/nologin ptylive   # once",
        f"edit /{CONFIG} (docs/daemon.md)",
        "systemctl daemon-reload",
        "systemctl enable --now ptylive",
        f"Prometheus: list /{PROMETHEUS_JOB} under scrape_config_files in prometheus.yml (or merge its job), reload",
        "Grafana: systemctl restart grafana-server (reads the provisioning; Prometheus at http://127.0.0.1:9090)",
    ]
    return "next steps (as root):\n" + "\n".join(f"  {step}" for step in steps)
