"""INT8/FP8 quantization of the tiny UNet: calibration data, the Q/DQ graph, its error, the report and the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdtrt.calibrate.artifacts import CalibrateRequest, calibrate_artifacts
from sdtrt.calibrate.capture import CalibrationData, CaptureConfig, capture_calibration_data, load_prompts
from sdtrt.calibrate.quantize import DEFAULT_EXCLUDE, QuantizeConfig
from sdtrt.runtime.compare import rel_l2
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.manifest import read_manifest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
CAPTURE = CaptureConfig(samples=4, steps=2, trajectory_steps=8, height=64, width=64)
HELD_OUT = ["a brass diving helmet on a pier", "two owls on a fence post"]
# Mean relative L2 error of the UNet against fp32 on held-out inputs. Measured on tiny: int8 0.025, fp8 0.045;
# a weight scale off by 2x gives 0.72, activation ranges 8x too narrow 0.44.
ERROR_BOUND = {"int8": 0.08, "fp8": 0.12}
SENSITIVE = re.compile(r"time_embedding|time_emb_proj|conv_in|conv_out|conv_shortcut")


@pytest.fixture(scope="module")
def calib_data(tiny_fp32) -> CalibrationData:
    return capture_calibration_data(tiny_fp32, CAPTURE, load_prompts(None))


@pytest.fixture(scope="module")
def held_out(tiny_fp32) -> CalibrationData:
    config = CaptureConfig(samples=2, steps=3, trajectory_steps=8, height=64, width=64, seed=100)
    return capture_calibration_data(tiny_fp32, config, HELD_OUT)


@pytest.fixture(scope="module")
def quantized(tiny_fp32, calib_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    folders = {}
    for precision in ("int8", "fp8"):
        request = CalibrateRequest(quantize=QuantizeConfig(precision))
        calibrate_artifacts(tiny_fp32, root / precision, request, data=calib_data)
        folders[precision] = root / precision
    return folders


def _session(path: Path, basic: bool = False):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if basic:  # exact Q/DQ arithmetic, as TensorRT computes it (no fused CPU int8 kernels)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_capture_records_the_chosen_steps_with_a_stable_hash(tiny_fp32, calib_data, tmp_path):
    assert CaptureConfig(steps=4, trajectory_steps=20).recorded_steps() == (0, 6, 13, 19)
    assert CaptureConfig(steps=1).recorded_steps() == (0,)
    data = calib_data
    assert data.records == 4 * 2 and data.rows == 2 and data.steps == [0, 7]
    assert data.arrays["sample"].shape == (16, 4, 8, 8)
    assert data.arrays["timestep"].shape == (16,)
    assert data.arrays["encoder_hidden_states"].shape == (16, 77, 32)
    assert all(a.dtype == np.float32 for a in data.arrays.values())
    assert len(set(data.prompts)) == 4 and data.seeds == [0, 1, 2, 3]
    timesteps = data.arrays["timestep"].reshape(4, 2, 2)
    assert (timesteps[:, 0] > timesteps[:, 1]).all()  # first recorded step is noisier than the last
    assert capture_calibration_data(tiny_fp32, CAPTURE, load_prompts(None)).sha256 == data.sha256
    path = data.save(tmp_path / "calib.npz")
    assert CalibrationData.load(path).sha256 == data.sha256
    tampered = CalibrationData.load(path)
    tampered.arrays["sample"][0, 0, 0, 0] += 1.0
    np.savez(tmp_path / "bad.npz", index=np.array(json.dumps(data.index())), **tampered.arrays)
    with pytest.raises(ArtifactError, match="does not match the hash"):
        CalibrationData.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_graph_is_valid_with_zero_points_zero(precision, quantized, calib_data):
    folder = quantized[precision]
    manifest = read_manifest(folder)
    entry = manifest.components["unet"]
    assert entry.precision == precision
    onnx.checker.check_model(str(folder / entry.file))
    model = onnx.load(str(folder / entry.file))
    inits = {t.name: t for t in model.graph.initializer}
    kind = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sum(n.op_type == "QuantizeLinear" for n in qdq) > 10
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.data_type == kind
        assert not onnx.numpy_helper.to_array(zero).astype(np.float32).any()
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].data_type == kind for n in weights)
    assert all(any(a.name == "axis" for a in n.attribute) for n in weights)  # per-channel
    calibration, quantization = entry.extra["calibration"], entry.extra["quantization"]
    assert calibration["data_sha256"] == calib_data.sha256
    assert (calibration["samples"], calibration["steps"], calibration["size"]) == (4, 2, "64x64")
    assert quantization["op_types"] == ["Conv", "MatMul", "Gemm"]
    assert quantization["unquantized_dtype"] == "float32" and quantization["quantizer_version"]
    assert "/unet/conv_in/Conv" in quantization["excluded_nodes"]
    assert entry.opset == (18 if precision == "int8" else 19)


def test_sensitive_layers_keep_float_weights(quantized):
    folder = quantized["int8"]
    model = onnx.load(str(folder / "unet.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}
    float_inits = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    sensitive = [n for n in compute if SENSITIVE.search(n.name)]
    assert len(sensitive) >= 12  # time embedding (2), time_emb_proj (8), conv_in, conv_out, shortcuts
    for node in sensitive:
        assert node.input[1] in float_inits, node.name
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    quantized_nodes = [
        n for n in compute if n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert len(quantized_nodes) == read_manifest(folder).components["unet"].extra["quantization"]["quantized_nodes"]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_unet_runs_in_onnxruntime_within_the_error_bound(precision, quantized, tiny_fp32, held_out):
    reference = _session(tiny_fp32 / "unet.onnx")
    exact = _session(quantized[precision] / "unet.onnx", basic=True)
    default = _session(quantized[precision] / "unet.onnx")
    errors = []
    for feeds in held_out.batches():
        ref = reference.run(None, feeds)[0]
        out = exact.run(None, feeds)[0]
        assert np.isfinite(default.run(None, feeds)[0]).all()
        errors.append(rel_l2(out, ref))
    assert np.mean(errors) < ERROR_BOUND[precision], errors
    assert np.mean(errors) > 1e-4  # it did quantize


def test_fp16_artifact_quantizes_with_fp16_float_layers(tiny_fp16, calib_data, held_out, tmp_path):
    out = tmp_path / "int8-from-fp16"
    manifest = calibrate_artifacts(tiny_fp16, out, CalibrateRequest(quantize=QuantizeConfig("int8")), data=calib_data)
    entry = manifest.components["unet"]
    assert entry.extra["quantization"]["unquantized_dtype"] == "float16" and entry.opset == 19
    model = onnx.load(str(out / entry.file))
    inits = {t.name: t for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)
    session, reference = _session(out / entry.file, basic=True), _session(tiny_fp16 / "unet.onnx")
    feeds = held_out.batches()[0]
    half = {k: v if k == "timestep" else v.astype(np.float16) for k, v in feeds.items()}
    assert rel_l2(session.run(None, half)[0].astype(np.float32), reference.run(None, half)[0].astype(np.float32)) < 0.1


def test_quality_report(quantized, tiny_fp32, tmp_path):
    from sdtrt.calibrate.measure import REPORT_PHASE, quality_report
    from sdtrt.calibrate.report import HELD_OUT_PROMPTS, ReportConfig, format_report

    used = set(read_manifest(quantized["int8"]).components["unet"].extra["calibration"]["prompts"])
    assert not used & set(HELD_OUT_PROMPTS) and not set(load_prompts(None)) & set(HELD_OUT_PROMPTS)
    calls: list[tuple[str, int, int]] = []
    config = ReportConfig(prompts=1, steps=3)
    report = quality_report(quantized["int8"], [tiny_fp32], config, progress=lambda *call: calls.append(call))
    assert calls == [(REPORT_PHASE, 0, 1), (REPORT_PHASE, 1, 1)]
    assert report.passed and report.reference == "fp32" and len(report.steps) == 3
    assert 0.0 < report.mean_rel_l2 < ERROR_BOUND["int8"] * 2 and 20.0 < report.image_psnr < 80.0
    text = format_report(report)
    assert "rel L2 vs fp32" in text and "TensorRT speed can only be measured" in text
    report.save(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] is True and data["precision"] == "int8" and len(data["images"]) == 1
    with pytest.raises(ConfigError, match="not int8/fp8"):
        quality_report(tiny_fp32, [tiny_fp32])


def test_bad_inputs_give_clear_errors(tiny_fp32, quantized, calib_data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(empty)
    with pytest.raises(ConfigError, match="samples must be an integer >= 1"):
        CaptureConfig(samples=0)
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        CaptureConfig(steps=0)
    with pytest.raises(ConfigError, match="cannot record 9 steps of a 8-step trajectory"):
        CaptureConfig(steps=9, trajectory_steps=8)
    with pytest.raises(ConfigError, match="precision must be one of int8, fp8"):
        QuantizeConfig("int4")
    with pytest.raises(ConfigError, match="op types to quantize must be some of"):
        QuantizeConfig(op_types=("Relu",))
    no_unet = tmp_path / "no-unet"
    no_unet.mkdir()
    manifest = json.loads((tiny_fp32 / "manifest.json").read_text())
    del manifest["components"]["unet"]
    (no_unet / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has no unet component"):
        calibrate_artifacts(no_unet, tmp_path / "out", CalibrateRequest(), data=calib_data)
    with pytest.raises(ArtifactError, match="already int8"):
        calibrate_artifacts(quantized["int8"], tmp_path / "out", CalibrateRequest(), data=calib_data)
    with pytest.raises(ConfigError, match="is the input artifact itself"):
        calibrate_artifacts(tiny_fp32, tiny_fp32, CalibrateRequest(), data=calib_data)
    everything = CalibrateRequest(quantize=QuantizeConfig(op_types=("Gemm",), exclude=(*DEFAULT_EXCLUDE, "unet")))
    with pytest.raises(ConfigError, match="no Gemm node of unet.onnx is left to quantize"):
        calibrate_artifacts(tiny_fp32, tmp_path / "out", everything, data=calib_data)
    assert not (tmp_path / "out").exists()


def test_cli_calibrate_then_check(tiny_fp32, tmp_path):
    out, report = tmp_path / "int8", tmp_path / "report.json"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=300)

    bad = run("calibrate", str(tiny_fp32), "--precision", "int8", "--samples", "0", "--out", str(out))
    assert bad.returncode == 1 and "samples must be an integer >= 1" in bad.stderr
    args = ("--precision", "int8", "--samples", "4", "--steps", "2", "--size", "64x64", "--out", str(out))
    result = run("calibrate", str(tiny_fp32), *args)
    assert result.returncode == 0, result.stderr
    assert "int8 UNet written to" in result.stdout and "capturing 4/4" in result.stderr
    assert read_manifest(out).components["unet"].precision == "int8"
    result = run("check", str(out), "--reference", str(tiny_fp32), "--report-json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quality report passed" in result.stdout and "unet " not in result.stdout.split("int8 UNet of")[0]
    assert json.loads(report.read_text())["passed"] is True
