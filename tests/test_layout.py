"""The shape of the package: which module may import which.

The session shell is layered (docs/architecture.md, "The shape of the code"): the process's
context below the sessions, the sessions below the server.  A cycle, even one hidden under
``TYPE_CHECKING``, means a layer reaches up into the one above it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement stands (inside a
    function, under ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("gateway."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("gateway."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path of module names, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for dep in sorted(edges[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[name] = 2
        return []

    for name in sorted(edges):
        if name not in state and (found := visit(name)):
            return found
    return []


def test_the_finder_sees_a_cycle_when_there_is_one() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_finder_reads_every_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom . import tls\nfrom .relay import Leg\n"
                   "import gateway.smtp\nif TYPE_CHECKING:\n    from .server import Gateway\n"
                   "def f():\n    from gateway.cli import main\n")
    assert imports_of(src) == {"tls", "relay", "smtp", "server", "cli"}


def test_no_module_of_the_package_imports_itself_around_a_circle() -> None:
    assert cycle(graph()) == []


def test_the_session_layers_point_down() -> None:
    edges = graph()
    # The context knows no session, phase or server; the phases know no session.
    assert not edges["context"] & {"session", "server", "outbound", "inbound", "phase",
                                   "planning"}
    for phase in ("phase", "outbound", "inbound", "planning"):
        assert not edges[phase] & {"session", "server"}, phase
    assert "server" not in edges["session"]


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every package module ``start`` loads, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in edges[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_pure_core_loads_no_shell() -> None:
    """The decisions (policy, the discovery walks, DNS answers, DANE, the SMTP machines)
    load nothing that does I/O: no resolver, no event-loop code, no sockets."""
    edges = graph()
    shell = {"dns", "discovery", "tasks", "metrics", "relay", "tls", "session", "server",
             "netfilter", "context", "planning", "phase", "outbound", "inbound", "workers",
             "stsfetch", "health", "control"}
    for pure in ("policy", "walks", "answers", "dane", "smtp", "commands", "upgrade", "offload",
                 "shield", "envelope", "admission", "sts"):
        assert not reach(edges, pure) & shell, (pure, reach(edges, pure) & shell)


def test_the_wire_knows_no_machine() -> None:
    """smtp.py is SMTP on the wire (framing, limits, errors): it loads nothing of the
    package, and each machine loads the wire, never the other machine."""
    edges = graph()
    assert edges["smtp"] == set()
    assert "offload" not in edges["upgrade"] and "upgrade" not in edges["offload"]
    assert {"smtp", "commands"} <= edges["upgrade"] & edges["offload"]


def test_no_test_module_imports_another() -> None:
    """What tests share lives in gatelab/, typed and reviewed as code: a test module
    importing another one would run that module's tests' import-time setup too."""
    tests = Path(__file__).resolve().parent
    offenders = sorted(p.name for p in tests.glob("test_*.py")
                       if re.search(r"^\s*(from tests[. ]|import tests\b)", p.read_text(), re.M))
    assert offenders == []
