"""The package's architecture, checked: subpackages in layers whose imports point one way, no import
cycle between modules, and size limits that keep modules and functions readable.

Layers, lowest first (a module imports only from its own subpackage or from lower layers):

    core  <-  io, losses  <-  models  <-  registration  <-  data  <-  evaluation  <-  training  <-  cli

(``data`` sits above ``registration``: scans in their own spaces are aligned by the affine stage.)

Every import counts, also those inside functions (deferred to keep start-up light).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cyclereg"
LAYERS = {"core": 0, "io": 1, "losses": 1, "models": 2, "registration": 3, "data": 4, "evaluation": 5,
          "training": 6, "cli": 7}
TOP = {"__init__", "__main__"}  # the public API and the entry point sit above every layer


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("cyclereg",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        out[name] = path
    return out


def _imports(path: Path, name: str, modules) -> set[str]:
    """The cyclereg modules that ``path`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(name: str):
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return None
    return parts[1]


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP]  # no loose modules beside them


def test_imports_point_down_the_layers():
    wrong = []
    for name, targets in _graph().items():
        source = _layer(name)
        if source is None:
            continue
        for target in targets:
            layer = _layer(target)
            if layer is None and target != "cyclereg":
                wrong.append(f"{name} imports {target}")
            elif layer is not None and layer != source and LAYERS[layer] >= LAYERS[source]:
                wrong.append(f"{name} ({source}) imports {target} ({layer})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.rpartition(".")[0] == node or node.rpartition(".")[0] == nxt:
                continue  # a package and its own modules
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("limit", [400])
def test_no_module_is_over_the_line_limit(limit):
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not long, long


def test_no_function_is_80_lines_or_longer():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for fn in _functions(ast.parse(path.read_text())):
            length = fn.end_lineno - fn.lineno + 1
            if length >= 80:
                long.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({length} lines)")
    assert not long, "\n".join(long)


def test_the_layer_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checks are not vacuous: a core module importing the CLI is caught, and so is a cycle."""
    graph = _graph()
    graph["cyclereg.core.coords"] = graph["cyclereg.core.coords"] | {"cyclereg.cli"}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
    with pytest.raises(AssertionError, match="cyclereg.core.coords \\(core\\) imports cyclereg.cli"):
        test_imports_point_down_the_layers()
    graph["cyclereg.cli"] = graph["cyclereg.cli"] | {"cyclereg.core.coords"}
    with pytest.raises(AssertionError, match="cyclereg.core.coords -> cyclereg.cli"):
        test_no_import_cycle()


def test_the_command_line_parser_loads_no_heavy_module():
    """Every command's options are built before any command runs: building them imports neither torch
    nor SimpleITK nor numpy (each command imports its own), so `cyclereg ... --help` and every command start fast."""
    import subprocess
    import sys

    code = ("import sys; from cyclereg.cli import _parser; _parser(); "
            "print(sorted(m for m in ('torch', 'SimpleITK', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
