"""Every file, folder and ``ptylive.*`` module the docs name exists (README.md and docs/*.md).

A reference is a repository path that starts with one of the project's folders (``daemon/engine/step.py``,
``systemd/grafana/``), optionally followed by ``::name`` for something defined in that file
(``daemon/engine/iteration.py::run_sync``, ``daemon/worker/rank.py::Worker._maybe_preview``, a pytest node
``tests/...py::test_x``), or a dotted module name under ``ptylive.daemon``, ``ptylive.streaming``,
``ptylive.gpu`` or ``ptylive.tools``, optionally ending in names defined in it
(``ptylive.daemon.engine.iteration.async_update``). Names are looked up in the source (``ast``), nothing is
imported. A reorganisation that moves a module fails here until the docs follow it.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FOLDERS = ("daemon", "streaming", "gpu", "tools", "tests", "docs", "systemd", "ptylive_pkg", ".ci")
PACKAGE_FOLDERS = {"daemon": "daemon", "streaming": "streaming", "gpu": "gpu", "tools": "tools"}

PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(map(re.escape, FOLDERS)) + r")/[\w./-]*)((?:::[\w.]+)*)")
MODULE = re.compile(r"(?<![\w./-])ptylive\.(" + "|".join(PACKAGE_FOLDERS) + r")((?:\.\w+)*)")


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _bound_names(statements: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a block of statements defines (defs, classes, assignments; inside ``if``/``try`` too)."""
    found: dict[str, ast.AST] = {}
    for node in statements:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.setdefault(node.name, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.setdefault(node.target.id, node)
        elif isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                for name, inner in _bound_names(block).items():
                    found.setdefault(name, inner)
    return found


def _instance_attributes(cls: ast.ClassDef) -> set[str]:
    """``self.NAME = ...`` targets in any method of ``cls``."""
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else [])
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                        and element.value.id == "self"):
                    names.add(element.attr)
    return names


def _defines(source: Path, names: list[str]) -> bool:
    """Whether ``source`` defines ``names[0]``, and (for a class) its member ``names[1]``."""
    if len(names) > 2:
        return False
    node = _bound_names(_tree(source).body).get(names[0])
    if node is None or len(names) == 1:
        return node is not None
    return isinstance(node, ast.ClassDef) and (names[1] in _bound_names(node.body)
                                               or names[1] in _instance_attributes(node))


def _module_problem(package: str, dotted: str) -> str | None:
    """Why ``ptylive.<package><dotted>`` names nothing, or None."""
    rest = [part for part in dotted.split(".") if part]
    folder = ROOT / PACKAGE_FOLDERS[package]
    while rest and (folder / rest[0] / "__init__.py").is_file():
        folder = folder / rest.pop(0)
    if rest and (folder / f"{rest[0]}.py").is_file():
        source = folder / f"{rest.pop(0)}.py"
    else:
        source = folder / "__init__.py"
    if rest and not _defines(source, rest):
        return f"{source.relative_to(ROOT)} defines no {'.'.join(rest)}"
    return None


def missing(text: str) -> list[str]:
    """Every reference in ``text`` that names nothing, with the reason."""
    problems = []
    for match in PATH.finditer(text):
        path, names = match.group(1).rstrip(".-"), match.group(2)
        target = ROOT / path
        if not target.exists():
            problems.append(f"{path}: no such file or folder")
        elif names:
            parts = [p for chunk in names.split("::") for p in chunk.split(".") if p]
            if target.suffix != ".py" or not target.is_file():
                problems.append(f"{path}{names}: names inside a file that is not Python source")
            elif not _defines(target, parts):
                problems.append(f"{path}{names}: {path} defines no {'.'.join(parts)}")
    for match in MODULE.finditer(text):
        problem = _module_problem(match.group(1), match.group(2))
        if problem is not None:
            problems.append(f"{match.group(0)}: {problem}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_named_path_and_module_exists(doc: Path) -> None:
    problems = missing(doc.read_text(encoding="utf-8"))
    assert not problems, f"{doc.relative_to(ROOT)} names what does not exist:\n  " + "\n  ".join(problems)


def test_architecture_page_names_the_modules_of_its_data_paths() -> None:
    """The check sees the architecture page's references (a pattern that matched nothing would pass silently)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {m.group(1) for m in PATH.finditer(text)}
    for module in ("streaming/ingest.py", "daemon/worker/frames.py", "daemon/engine/iteration.py",
                   "daemon/worker/refine.py", "daemon/http/sse.py", "daemon/cli/offline.py",
                   "daemon/service/results.py"):
        assert module in named
    assert sum(1 for m in PATH.finditer(text) if m.group(2)) >= 30  # path::name references


def test_the_check_reports_old_module_paths() -> None:
    """Paths of the flat daemon/ before the role sub-packages, and names a module does not define, are caught."""
    text = ("`daemon/rank0.py`, `daemon/stream_engine.py`, `tools/replay.py`, `daemon/viewer/`, "
            "`daemon/engine/iteration.py::run_stream`, `daemon/worker/rank.py::Worker.no_such_method`, "
            "ptylive.daemon.events, ptylive.daemon.engine.iteration.run_stream")
    assert len(missing(text)) == 8
    good = ("`daemon/engine/iteration.py::run_sync`, `daemon/worker/rank.py::Worker._maybe_preview`, "
            "`daemon/service/collector.py::Collector.views`, `daemon/http/viewer/`, `.ci/static-checks`, "
            "ptylive.daemon.http.viewer, ptylive.daemon.engine.exchange.asynchronous.AsyncExchanger.progress, "
            "ptylive.tools, `python -m ptylive.daemon.cli.offline`.")
    assert missing(good) == []
