"""Every option of every ``ptylive`` sub-command says what it does, in which unit, and its default.

The test walks the parser :func:`ptylive.daemon.cli.main.build_parser` builds, sub-commands of sub-commands
included, so a new option without help fails here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Iterator

import pytest

import ptylive
from ptylive.daemon.cli.main import build_parser
from tests.conftest import run_cli

FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction,
         argparse._CountAction)
# an option named for a unit names the unit in its help too
UNIT_IN_HELP = {"_eV": "eV", "_mrad": "mrad", "_A": "Å", "_px": "pixel"}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                       argparse.ArgumentParser,
                                                                                       argparse.Action]]:
    """(sub-command path, its parser, action) for every action below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, parser, action


def _in_required_group(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(group.required and action in group._group_actions for group in parser._mutually_exclusive_groups)


def _name(path: tuple[str, ...], action: argparse.Action) -> str:
    return " ".join(("ptylive", *path, action.option_strings[-1] if action.option_strings else action.dest))


ACTIONS = list(walk(build_parser()))


def test_the_walk_sees_every_sub_command() -> None:
    commands = {path for path, _, _ in ACTIONS}
    assert {("simulate",), ("reconstruct",), ("serve",), ("replay",), ("service", "install")} <= commands
    assert len(ACTIONS) > 80


def test_every_option_and_argument_has_help() -> None:
    missing = [_name(path, action) for path, _, action in ACTIONS
               if not isinstance(action, argparse._HelpAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, "no help text: " + ", ".join(missing)


def test_every_option_that_takes_a_value_names_its_default() -> None:
    """Required ones and those of a required either-or group have none; flags are off unless given."""
    missing = [_name(path, action) for path, parser, action in ACTIONS
               if action.option_strings and not isinstance(action, FLAGS) and not action.required
               and not _in_required_group(parser, action)
               and "default" not in (action.help or "") and "required" not in (action.help or "")]
    assert not missing, "help names no default: " + ", ".join(missing)


def test_an_option_named_for_a_unit_names_the_unit() -> None:
    missing = [_name(path, action) for path, _, action in ACTIONS for suffix, unit in UNIT_IN_HELP.items()
               if action.option_strings and action.dest.endswith(suffix) and unit not in (action.help or "")]
    assert not missing, "help names no unit: " + ", ".join(missing)


@pytest.mark.parametrize("path", sorted({path for path, _, _ in ACTIONS}), ids=" ".join)
def test_help_renders_with_defaults_filled_in(path: tuple[str, ...]) -> None:
    parser = build_parser()
    for name in path:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    text = parser.format_help()  # a stray % in a help string raises here
    assert "%(default)s" not in text and "usage: ptylive" in text


def test_version_prints_the_installed_distributions_version() -> None:
    """``ptylive --version``: one line on stdout, the version the package metadata (pyproject.toml) carries."""
    done = run_cli("--version", timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == f"ptylive {importlib.metadata.version('ptylive')}\n"
    assert importlib.metadata.version("ptylive") == ptylive.__version__
