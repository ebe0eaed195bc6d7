"""Every module imports without the optional extras, and runtime/ never imports export/, calibrate/ or shapes/."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import sdtrt

ROOT = Path(sdtrt.__file__).parent
OPTIONAL = [
    "diffusers",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx_graphsurgeon",
    "polygraphy",
    "tensorrt",
    "safetensors",
    "modelopt",
    "matplotlib",
    "fastapi",
    "uvicorn",
    "starlette",
    "ray",
    "peft",
    "tqdm",
    "cv2",
]


def all_modules() -> list[str]:
    names = ["sdtrt"]
    for sub in ("cli", "runtime", "export", "calibrate", "benchmarks", "shapes", "serve"):
        names.append(f"sdtrt.{sub}")
        for info in pkgutil.walk_packages([str(ROOT / sub)], prefix=f"sdtrt.{sub}."):
            names.append(info.name)
    return names


def test_every_module_imports_without_optional_extras():
    modules = all_modules()
    assert "sdtrt.export.onnx_export" in modules and "sdtrt.runtime.manifest" in modules
    assert "sdtrt.shapes.score" in modules
    script = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError("blocked optional extra " + name)
sys.meta_path.insert(0, Block())
failed = []
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{exc!r}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_extra_names_the_install_command():
    import pytest

    from sdtrt.runtime.deps import require
    from sdtrt.runtime.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r'pip install "sdtrt\[trt\]"'):
        require("sdtrt_no_such_module", "building engines", "trt")


def test_runtime_never_imports_export_calibrate_or_shapes():
    offenders = []
    for path in (ROOT / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level >= 2:
                    names = [f"..{node.module or ''}"]
            for name in names:
                if name.startswith(
                    ("sdtrt.export", "sdtrt.calibrate", "sdtrt.shapes", "..export", "..calibrate", "..shapes")
                ):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_calibrate_never_imports_shapes():
    """Calibration takes a model's prompts, sampler and scorer as config; it knows no demo model by name."""
    offenders = []
    for path in (ROOT / "calibrate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                base = f"{'.' * node.level}{node.module or ''}"
                names = [base] if node.module else [f"{base}{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("sdtrt.shapes", "..shapes"))]
    assert offenders == []
