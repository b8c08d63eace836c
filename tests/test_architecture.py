"""The shape of the package, as docs/architecture.md draws it: layers that only look down,
no import cycles, a worker side that loads nothing of the server, and modules small enough
to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "controller"

#: each server-side module's layer, by the longest matching name prefix; a module may
#: import its own layer and the layers below it, never one above
LAYERS: dict[str, int] = {
    "controller.cli": 8,
    "controller.__main__": 8,
    "controller.options": 8,
    "controller.arg_types": 8,
    "controller.limit_flags": 8,
    "controller.access_flags": 8,
    "controller.registry_flags": 8,
    "controller.status_cli": 8,
    "controller.config_file": 8,
    "controller.startup": 8,
    "controller.settings_doc": 8,
    "controller.server": 7,
    "controller.edge": 6,
    "controller.upkeep": 5,
    "controller.sharing": 5,
    "controller.relay": 4,
    "controller.protocol": 3,
    "controller.jsonbody": 3,
    "controller.jsonpieces": 3,
    "controller.jsoncuts": 3,
    "controller.jsontokens": 3,
    "controller.nesting": 3,
    "controller.config": 3,
    "controller.credentials": 3,
    "controller.status_format": 3,
    "controller.decisions": 2,
    "controller.errors": 1,
    "controller.logtext": 1,
    "controller.version": 1,
    "controller.requestid": 1,
    "controller.pacing": 1,
    "controller.joining": 1,
}
#: the worker side (and the old import paths kept for it): imports only itself
WORKER_SIDE = ("controller.worker", "controller.client", "controller.demo_worker")
#: the public facade loads its names lazily; it is outside the layers
FACADE = "controller"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file (also under
    ``TYPE_CHECKING``: a cycle for the type checker is a cycle for the reader)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == FACADE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == FACADE:
                target = node.module
            else:
                continue
            for alias in node.names:
                # ``from . import protocol`` imports a module; ``from . import x`` a name.
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int | None:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def is_worker_side(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in WORKER_SIDE)


def test_every_module_has_a_place() -> None:
    """Every module is in a layer, on the worker side, or is the facade: a new module
    must be given its place here (and in docs/architecture.md)."""
    homeless = [n for n in MODULES if n != FACADE and layer(n) is None and not is_worker_side(n)]
    assert homeless == []


def test_there_are_no_import_cycles() -> None:
    """No module imports, directly or not, a module that imports it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert cycles == []


def test_layers_only_look_down() -> None:
    """Entry, lifecycle, edge, upkeep and sharing, relay, contract, decisions, errors:
    each imports only its own layer and those below it."""
    upward = []
    for name, targets in GRAPH.items():
        mine = layer(name)
        if mine is None:
            continue
        for target in targets:
            theirs = layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_worker_side_imports_nothing_of_the_server() -> None:
    """What a worker imports (the heartbeat helper, the demo worker) names no module of
    the server side, so a worker never loads it."""
    leaks = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if is_worker_side(name)
        for target in targets
        if not is_worker_side(target) and target != FACADE
    ]
    assert leaks == []


def test_importing_the_worker_side_loads_no_server_module() -> None:
    """In a fresh interpreter, importing the worker-side helper leaves every server
    module unloaded (the facade's names load lazily)."""
    probe = (
        "import sys, controller.worker, controller.client\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('controller'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [m for m in out if m != FACADE and not is_worker_side(m)] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small_and_say_what_they_hold(name: str) -> None:
    """Each module stays under about 400 lines and opens with a docstring saying what it
    holds."""
    path = MODULES[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_LINES
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{path} has no module docstring"
