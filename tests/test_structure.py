"""The shape of the code: no import cycles, dependencies that point one way, no private names across modules.

Every import in the tree counts, at module top or inside a function (a lazy import is still a dependency), with
relative imports resolved against the importing module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sdtrt

ROOT = Path(sdtrt.__file__).parent
SUBPACKAGES = ("runtime", "export", "calibrate", "benchmarks", "shapes", "serve", "cli")

# What each subpackage may import besides itself: the one-way order of the house (runtime at the bottom; the CLI
# on top wires everything).
ALLOWED = {
    "runtime": set(),
    "export": {"runtime"},
    "calibrate": {"runtime", "export"},
    "shapes": {"runtime", "export", "calibrate"},
    "serve": {"runtime"},
    "benchmarks": {"runtime", "export", "calibrate", "shapes"},
    "cli": {"runtime", "export", "calibrate", "shapes", "serve", "benchmarks"},
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported sdtrt module (or package)
    names: tuple[str, ...]  # names taken from it (``from target import names``)
    line: int


def module_files() -> dict[str, Path]:
    """sdtrt module name -> file, for every module of the package outside tests/."""
    files = {"sdtrt": ROOT / "__init__.py"}
    for sub in SUBPACKAGES:
        single = ROOT / f"{sub}.py"
        if single.is_file():
            files[f"sdtrt.{sub}"] = single
        for path in sorted((ROOT / sub).rglob("*.py")) if (ROOT / sub).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(("sdtrt", *parts))] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sdtrt":
                    yield Import(name, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdtrt":
                continue
            plain = tuple(a.name for a in node.names)
            submodules = [f"{target}.{n}" for n in plain if f"{target}.{n}" in modules]
            for sub in submodules:
                yield Import(name, sub, (), node.lineno)
            rest = tuple(n for n in plain if f"{target}.{n}" not in modules)
            if rest or not submodules:
                yield Import(name, target, rest, node.lineno)


def all_imports() -> list[Import]:
    files = module_files()
    modules = set(files)
    return [imp for name, path in files.items() for imp in imports_of(name, path, modules)]


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_walk_sees_the_tree():
    files = module_files()
    assert "sdtrt.runtime.pipeline" in files and "sdtrt.serve.app" in files and "sdtrt.benchmarks.harness" in files
    edges = all_imports()
    assert any(i.source == "sdtrt.runtime.pipeline" and i.target.startswith("sdtrt.runtime.") for i in edges)
    # a relative import is resolved: runtime/schedulers/euler.py imports its siblings relatively or absolutely
    assert any(i.source.startswith("sdtrt.runtime.schedulers.") and i.target.startswith("sdtrt.runtime") for i in edges)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    modules = set(module_files())
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.target in modules and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert find_cycle(edges) is None


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_subpackages_depend_one_way(sub):
    offenders = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in all_imports()
        if subpackage(i.source) == sub
        and subpackage(i.target) not in (None, sub)
        and subpackage(i.target) not in ALLOWED[sub]
    ]
    assert offenders == []


def test_runtime_core_does_not_import_the_model_loaders():
    """Everything in runtime/ but the PyTorch source loaders (runtime/models/) and the torch backend runs without
    diffusers' model code: it must not reach into runtime/models/."""
    exempt = ("sdtrt.runtime.models", "sdtrt.runtime.backends.torch")
    offenders = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in all_imports()
        if i.source.startswith("sdtrt.runtime")
        and not i.source.startswith(exempt)
        and i.target.startswith("sdtrt.runtime.models")
    ]
    assert offenders == []


def test_no_module_imports_a_private_name_from_another():
    files = module_files()
    tests = Path(__file__).parent
    for path in sorted(tests.rglob("*.py")):
        files["tests." + ".".join(path.relative_to(tests).with_suffix("").parts)] = path
    modules = set(files)
    offenders = [
        f"{i.source}:{i.line} imports {n} from {i.target}"
        for name, path in files.items()
        for i in imports_of(name, path, modules)
        for n in i.names
        if n.startswith("_") and not n.startswith("__") and i.target != i.source
    ]
    assert offenders == []


def test_runtime_imports_are_absolute():
    """One import style inside runtime/: ``from sdtrt.runtime.x import y``, never ``from .x import y``."""
    relative = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "runtime").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []
