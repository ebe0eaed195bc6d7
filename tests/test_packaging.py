"""Packaging: a non-editable wheel holds every subpackage and data file, and building it warns about nothing.

The wheel is built from a copy of the source tree with setuptools' own build backend (no pip, no network), so the
test sees exactly what `pip install .` would install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sdtrt

tomllib = pytest.importorskip("tomllib")

ROOT = Path(sdtrt.__file__).parent
# Folders that are not part of the installed package.
NOT_SHIPPED = {"tests", "build", "dist", "out", ".git", ".venv", ".stubs", ".ci"}
# Data folders of a package: everything in them must reach the wheel.
DATA_FOLDERS = ("runtime/models/configs", "runtime/models/data", "shapes/data", "calibrate/data")


def _package_folders() -> list[Path]:
    """Every folder of the source tree with an ``__init__.py``, relative to the repository root."""
    found = []
    for init in sorted(ROOT.rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        if not rel.parts or rel.parts[0] not in NOT_SHIPPED and not rel.parts[0].startswith("."):
            found.append(rel)
    return found


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == ROOT
    return {
        n
        for n in names
        if n == "__pycache__" or n.endswith(".egg-info") or (top and (n in NOT_SHIPPED or n.startswith(".")))
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], str]:
    """The file names in a wheel built from a copy of the sources, and what the build printed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=_ignore)
    dist.mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(dist)], cwd=src, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    name = done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(dist / name) as archive:
        return set(archive.namelist()), done.stdout + done.stderr


def test_every_package_folder_is_declared() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    expected = {".".join(("sdtrt", *rel.parts)) for rel in _package_folders()}
    missing = sorted(expected - declared)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_wheel_holds_every_module_and_data_file(wheel: tuple[set[str], str]) -> None:
    names, _ = wheel
    wanted = {f"sdtrt/{(rel / '__init__.py').as_posix()}" for rel in _package_folders()}
    for rel in _package_folders():
        wanted |= {f"sdtrt/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / rel).glob("*.py")}
    for folder in DATA_FOLDERS:
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"{folder} is empty in the source tree"
        wanted |= {f"sdtrt/{p.relative_to(ROOT).as_posix()}" for p in files}
    missing = sorted(wanted - names)
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith("sdtrt/tests/") for n in names), "the tests are not part of the package"


def test_wheel_builds_without_setuptools_warnings(wheel: tuple[set[str], str]) -> None:
    _, output = wheel
    warnings = [line for line in output.splitlines() if "Warning" in line or "would be ignored" in line]
    assert not warnings, "\n".join(warnings)


def _make_dry_run(target: str) -> str:
    """The commands ``make TARGET`` would run for a fresh clone (no venv yet), without running them."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = ".venv-never-created"  # make -n only prints what it would do, so this folder stays absent
    done = subprocess.run(
        [make, "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def _installed_extras(commands: str) -> list[str]:
    return re.findall(r'pip install [^"]*"\.\[([^\]]*)\]"', commands)


def test_make_demo_installs_only_what_the_demo_runs() -> None:
    commands = _make_dry_run("demo")
    assert _installed_extras(commands) == ["export,ort,control"], commands
    for line in commands.splitlines():
        if "pip install" in line:
            assert " -q " in line and ">>" in line, f"pip's own output belongs in the log: {line}"
    assert "--json out/demo/check.json" in commands and "--report-json out/demo/adherence.json" in commands


def test_make_test_installs_the_test_extra() -> None:
    assert _installed_extras(_make_dry_run("test")) == ["export,ort,test"]
