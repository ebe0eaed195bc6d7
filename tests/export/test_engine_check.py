"""``sdtrt check ENGINES``: the orchestration, on the recording tensorrt double (tests/trt_double.py).

Polygraphy's ``TrtRunner`` accepts only a real ``trt.ICudaEngine`` and allocates through CUDA, so these tests pass
``check_engines`` a Polygraphy runner over the double instead (``DoubleTrtRunner``): Polygraphy's own runner
lifecycle and ``Comparator.run``, the double's engine and context (every input shape is set on it and checked
against the engine's profile). The double computes nothing, so that runner answers with ONNX Runtime's outputs on
the same ONNX file, scaled by ``1 + error``: the tests show which shapes are fed, which files are compared, how the
rows are made and judged, never how accurate TensorRT is. The real comparison runs where TensorRT and a GPU exist
(marked ``trt``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from sdtrt.export.build import TensorRTBuildOptions, build_engines
from sdtrt.export.check import format_table
from sdtrt.runtime.errors import ArtifactError, MissingDependencyError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.profile import ShapeProfile

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
OUTPUTS = {"text_encoder": 2, "unet": 1, "vae_decoder": 1, "vae_encoder": 2}


import sdtrt_tests_trt_double as trt_double  # noqa: E402  (registered by conftest.py)

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")
from polygraphy.backend.base import BaseRunner  # noqa: E402
from polygraphy.common import TensorMetadata  # noqa: E402


class DoubleTrtRunner(BaseRunner):
    """A Polygraphy runner over the double's engine that answers with ONNX Runtime's outputs times ``1 + error``."""

    def __init__(self, engine, onnx_path, error=0.0):
        super().__init__(name=f"double-{engine.plan['name']}")
        self.engine, self.onnx_path, self.error = engine, onnx_path, error

    def activate_impl(self):
        import onnxruntime as ort

        self.context = self.engine.create_execution_context()
        self.session = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self.engine.input_names:
            tensor = self.engine.tensors[name]
            meta.add(name, dtype=np.dtype(trt_double.NUMPY[tensor["dtype"]]), shape=[-1] * len(tensor["shape"]))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        for name, array in feed_dict.items():
            assert self.context.set_input_shape(name, array.shape), f"{name} {array.shape} outside the profile"
        self.context.runs += 1
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, dict(feed_dict))
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, (o * (1 + self.error)).astype(o.dtype)) for n, o in zip(names, outputs, strict=True))

    def deactivate_impl(self):
        del self.context, self.session


def double_runner(artifacts, errors=None):
    """A runner factory for check_engines: DoubleTrtRunner over each engine, off by ``errors[component]``."""
    errors = errors or {}
    return lambda name, engine: DoubleTrtRunner(engine, Path(artifacts) / f"{name}.onnx", errors.get(name, 0.0))


@pytest.fixture
def engines(use_double, tiny_fp16, tmp_path):
    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions())
    return out


def test_each_engine_is_compared_with_onnxruntime_at_min_opt_max(use_double, engines, tiny_fp16):
    from sdtrt.export.engine_check import check_engines

    double = use_double()
    rows = check_engines(engines, runner=double_runner(tiny_fp16))
    assert len(rows) == 3 * sum(OUTPUTS.values())
    assert all(r.passed and r.max_abs == 0 and r.precision == "fp16" and r.tolerance == 1e-2 for r in rows)
    unet = [r.shape for r in rows if r.component == "unet"]
    assert unet == ["min:1@64x64", "opt:2@128x128", "max:4@256x256"]  # CFG doubles the UNet batch
    manifest = read_manifest(engines)
    contexts = {c.engine.plan["name"]: c for c in double.records.contexts}
    assert set(contexts) == set(OUTPUTS) and all(c.runs == 3 for c in contexts.values())
    for name, context in contexts.items():
        shapes = manifest.components[name].shapes
        for point, index in (("min", 0), ("opt", 1), ("max", 2)):
            fed = {n: list(s) for n, s in context.shape_calls[index * len(shapes) : (index + 1) * len(shapes)]}
            assert fed == {n: s[point] for n, s in shapes.items()}, (name, point)
    table = format_table(rows)
    assert "opt:2@128x128" in table and "FAIL" not in table


def test_an_engine_that_disagrees_fails_its_rows(use_double, engines, tiny_fp16):
    from sdtrt.export.engine_check import check_engines

    use_double()
    rows = check_engines(engines, runner=double_runner(tiny_fp16, {"unet": 0.05}))
    assert {r.component for r in rows if not r.passed} == {"unet"}
    assert all(abs(r.rel_l2 - 0.05) < 1e-3 for r in rows if r.component == "unet")
    assert "FAIL" in format_table(rows)


def test_the_onnx_file_must_be_the_one_the_engine_was_built_from(use_double, tiny_fp16, tmp_path):
    from sdtrt.export.engine_check import check_engines

    use_double()
    artifacts = tmp_path / "A"
    shutil.copytree(tiny_fp16, artifacts)
    build_engines(artifacts, tmp_path / "E", PROFILE, TensorRTBuildOptions(components=("unet",)))
    data = json.loads((artifacts / "manifest.json").read_text())
    data["components"]["unet"]["sha256"] = "0" * 64  # re-exported since the build
    (artifacts / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"unet.plan was built from a unet ONNX file with sha256 .* now has 000"):
        check_engines(tmp_path / "E", runner=double_runner(artifacts))
    shutil.rmtree(artifacts)
    with pytest.raises(ArtifactError, match=r"does not name the ONNX artifact it was built from, or it is not there"):
        check_engines(tmp_path / "E", runner=double_runner(artifacts))


def test_an_onnx_artifact_is_not_an_engine_folder(use_double, tiny_fp16):
    from sdtrt.export.engine_check import check_engines

    use_double()
    with pytest.raises(ArtifactError, match="is an ONNX artifact .* not an engine folder"):
        check_engines(tiny_fp16)


def test_without_tensorrt_engines_cannot_be_checked(monkeypatch, engines):
    from sdtrt.export.engine_check import check_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"cannot be checked on this machine: .*where|on a machine with"):
        check_engines(engines)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_sdtrt_check_engines_without_tensorrt_says_so_in_one_line(engines):
    result = subprocess.run([SDTRT, "check", str(engines)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: TensorRT engines cannot be checked on this machine:")
    assert "run `sdtrt check ENGINES` on a machine with an NVIDIA GPU and TensorRT" in line
    assert 'pip install "sdtrt[trt-cu' in line and "Traceback" not in result.stderr


def test_sdtrt_check_engines_prints_the_table(use_double, engines, tiny_fp16, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from sdtrt import cli
    from sdtrt.export import engine_check

    use_double()
    monkeypatch.setattr(engine_check, "trt_runner", double_runner(tiny_fp16, {"vae_decoder": 0.5}))
    report = tmp_path / "rows.json"
    result = CliRunner().invoke(cli.main, ["check", str(engines), "--json", str(report)])
    assert result.exit_code == 1, result.output
    assert "vae_decoder" in result.output and "FAIL" in result.output
    assert f"3 of {3 * sum(OUTPUTS.values())} checks failed" in result.output
    rows = json.loads(report.read_text())
    assert [r["shape"] for r in rows if r["component"] == "vae_decoder" and not r["passed"]] == [
        "min:1@64x64",
        "opt:1@128x128",
        "max:2@256x256",
    ]


def test_sdxl_unet_engines_get_text_embeds_and_time_ids(use_double, tmp_path):
    from sdtrt.export.engine_check import check_engines
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    options = ExportOptions(profile=profile, precision="fp32", components=("unet",))
    export_artifacts(load_preset("tiny-xl"), tmp_path / "xl", options)
    double = use_double()  # after the export: torch's exporter looks up the real tensorrt module's spec
    build_engines(tmp_path / "xl", tmp_path / "E", None, TensorRTBuildOptions(components=("unet",)))
    rows = check_engines(tmp_path / "E", runner=double_runner(tmp_path / "xl"))
    assert [r.shape for r in rows] == ["min:1@64x64", "opt:2@64x64", "max:4@128x128"]
    assert all(r.passed and r.tolerance == 1e-3 for r in rows)  # fp32 engines: TF32 allowance
    (context,) = double.records.contexts
    fed = dict(context.shape_calls)
    assert fed["text_embeds"] == (4, 24) and fed["time_ids"] == (4, 6)  # the last (max) shapes set


# -- real TensorRT (run by users who have it) ---------------------------------------------------------------------
@pytest.mark.trt
def test_real_engines_match_onnxruntime(tiny_fp16, tmp_path):
    from sdtrt.export.engine_check import check_engines

    out = tmp_path / "engines"
    build_engines(tiny_fp16, out, ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128), TensorRTBuildOptions(opt_level=1))
    rows = check_engines(out)
    assert rows and all(r.passed for r in rows), format_table(rows)


def test_controlnet_engines_are_checked_like_the_others(use_double, tiny_control_fp32, tmp_path):
    """A ControlNet engine is compared with its ONNX file at the profile's min/opt/max like any engine: every
    residual output at every point."""
    from sdtrt.export.engine_check import check_engines

    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_control_fp32, out, PROFILE, TensorRTBuildOptions(components=("unet", "controlnet_edges")))
    rows = check_engines(out, runner=double_runner(tiny_control_fp32))
    control = [r for r in rows if r.component == "controlnet_edges"]
    residuals = [t.name for t in read_manifest(out).components["controlnet_edges"].outputs]
    assert len(control) == 3 * len(residuals) and {r.output for r in control} == set(residuals)
    assert all(r.passed and r.precision == "fp32" for r in rows)
    assert [r.shape for r in control][:: len(residuals)] == ["min:1@64x64", "opt:2@128x128", "max:4@256x256"]
