"""The package's import structure: every import (lazy ones in functions too) goes down the layer
table of ``selfe/__init__.py``'s docstring, so no module or folder imports another that imports it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import selfe

PACKAGE = Path(selfe.__file__).parent


def layers() -> dict[str, int]:
    """{unit: layer} from the docstring's table ("    3  encoders    text ...")."""
    table = {}
    for number, names in re.findall(r"^\s{4}(\d+)\s+([a-z_]+(?:, [a-z_]+)*)\s{2,}", selfe.__doc__, re.M):
        for name in names.split(", "):
            table[name] = int(number)
    return table


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The selfe modules ``path`` imports anywhere in it (resolved to the module, not the name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name.startswith("selfe.") and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("selfe."):
                found.add(name)
    return found


def unit(module: str) -> str:
    return module.split(".")[1]


def test_every_unit_of_the_package_has_a_layer():
    table = layers()
    assert len(table) >= 10 and table["core"] == 1 and table["bench"] == max(table.values())
    assert {unit(m) for m in modules() if m != "selfe"} == set(table)


def upward(files: dict[str, Path], table: dict[str, int], known: dict[str, Path]) -> list[str]:
    """Every import in ``files`` ({module: path}) that does not go down the layer table."""
    wrong = []
    for module, path in files.items():
        for target in imports(path, known):
            a, b = unit(module), unit(target)
            if a != b and table[b] >= table[a]:
                wrong.append(f"{module} (layer {table[a]}) imports {target} (layer {table[b]})")
    return wrong


def test_imports_only_go_down_the_layers():
    known = modules()
    assert upward({m: p for m, p in known.items() if m != "selfe"}, layers(), known) == []


def test_no_import_cycle_between_modules():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(trail[trail.index(n):] + [n])
            elif n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_core_imports_neither_ray_nor_mlflow():
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [n for n in names if n.split(".")[0] in ("ray", "mlflow")], path


def test_the_checker_reports_an_upward_import(tmp_path):
    """The check can fail: a core module that imported the training driver (lazily) is reported."""
    fake = tmp_path / "model.py"
    fake.write_text("def f():\n    from selfe.train.job import fit\n")
    assert upward({"selfe.core.model": fake}, layers(), modules()) == [
        "selfe.core.model (layer 1) imports selfe.train.job (layer 8)"]
