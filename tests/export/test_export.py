"""ONNX export of the tiny model: validity, types, parity with PyTorch at two sizes, bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from sdtrt.export.check import TOLERANCES, check_artifacts
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.runtime.errors import ArtifactError, ExportError, ShapeError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.profile import ShapeProfile

COMPONENTS = ("text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_artifact_folder_is_complete_and_valid(precision, request):
    folder = request.getfixturevalue(f"tiny_{precision}")
    manifest = read_manifest(folder)
    assert set(manifest.components) == set(COMPONENTS)
    assert (folder / "tokenizer.json").is_file() and (folder / "scheduler_config.json").is_file()
    assert manifest.model.text_width == 32 and manifest.model.vae_scale_factor == 8
    assert manifest.versions["torch"] and manifest.versions["onnx"]
    assert manifest.source["kind"] == "preset" and len(manifest.source["sha256"]) == 64
    for name, entry in manifest.components.items():
        assert entry.file == f"{name}.onnx" and entry.precision == precision and entry.data_file is None
        model = onnx.load(str(folder / entry.file))
        onnx.checker.check_model(model, full_check=True)
        graph_inputs = {i.name: i for i in model.graph.input}
        for tensor in entry.inputs:
            declared = graph_inputs[tensor.name].type.tensor_type
            assert onnx.helper.tensor_dtype_to_np_dtype(declared.elem_type) == np.dtype(tensor.dtype)
            dims = [d.dim_param or d.dim_value for d in declared.shape.dim]
            assert dims == list(tensor.shape), (name, tensor.name, dims)


def test_fp16_unet_has_fp16_weights_and_fp32_timestep(tiny_fp16):
    model = onnx.load(str(tiny_fp16 / "unet.onnx"))
    by_type = Counter()
    for init in model.graph.initializer:
        by_type[onnx.helper.tensor_dtype_to_np_dtype(init.data_type)] += int(np.prod(init.dims))
    assert by_type[np.dtype("float16")] > 0.95 * sum(by_type.values()), by_type
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == onnx.TensorProto.FLOAT
    # normalization statistics stay fp32: every InstanceNormalization gets fp32 input
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert norms
    value_types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    assert all(value_types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_with_pytorch_at_two_sizes(precision, request, tiny_bundle):
    folder = request.getfixturevalue(f"tiny_{precision}")
    rows = check_artifacts(folder, tiny_bundle)
    assert {r.component for r in rows} == set(COMPONENTS)
    assert len({r.shape for r in rows}) == 2  # two sizes, dynamic shapes really work
    failing = [r for r in rows if not r.passed]
    assert not failing, failing
    assert all(r.tolerance == TOLERANCES[precision] for r in rows)
    worst = max(r.rel_l2 for r in rows)
    if precision == "fp16":
        assert 1e-5 < worst < 1e-2  # really fp16 (not silently fp32), within tolerance
    else:
        assert worst < 1e-4


def test_tampered_artifact_is_refused(tmp_path, tiny_fp32, tiny_bundle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32, copy)
    with open(copy / "vae_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match=r"vae_decoder.onnx does not match the manifest \(sha256 .*re-export"):
        check_artifacts(copy, tiny_bundle)


def test_export_errors(tmp_path, tiny_bundle):
    with pytest.raises(ShapeError, match="multiple of 8 pixels, got 100; use 104"):
        ShapeProfile.square(100, 128, 256)
    with pytest.raises(ShapeError, match="image sides must be multiples of 16 pixels"):
        export_artifacts(tiny_bundle, tmp_path / "a", ExportOptions(profile=ShapeProfile.square(72, 128, 256)))
    with pytest.raises(ExportError, match="unknown component"):
        ExportOptions(components=("unet", "controlnet"))
    with pytest.raises(ExportError, match="int8/fp8 artifacts are made"):
        ExportOptions(precision="int8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_artifacts(tiny_bundle, blocker / "out", ExportOptions(profile=ShapeProfile.square(64, 64, 64)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and is not an sdtrt artifact"):
        export_artifacts(tiny_bundle, busy, ExportOptions(profile=ShapeProfile.square(64, 64, 64)))
    assert (busy / "notes.txt").read_text() == "mine"


def test_failed_export_leaves_nothing_behind(tmp_path, tiny_bundle, monkeypatch):
    import sdtrt.export.onnx_export as mod

    real = mod.export_component

    def fail_on_vae(bundle, name, folder, options, consume=False, **kwargs):
        if name == "vae_decoder":
            raise ExportError("simulated failure")
        return real(bundle, name, folder, options, consume, **kwargs)

    monkeypatch.setattr(mod, "export_component", fail_on_vae)
    out = tmp_path / "art"
    with pytest.raises(ExportError, match="simulated"):
        export_artifacts(
            tiny_bundle, out, ExportOptions(profile=ShapeProfile.square(64, 64, 64), components=("unet", "vae_decoder"))
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_partial_components_and_reexport_replaces(tmp_path, tiny_bundle):
    out = tmp_path / "art"
    options = ExportOptions(profile=ShapeProfile.square(64, 64, 128), components=("vae_decoder",))
    export_artifacts(tiny_bundle, out, options)
    assert set(read_manifest(out).components) == {"vae_decoder"}
    export_artifacts(tiny_bundle, out, ExportOptions(profile=options.profile, components=("vae_encoder",)))
    assert set(read_manifest(out).components) == {"vae_encoder"}
    assert not (out / "vae_decoder.onnx").exists()


def test_large_graph_path_writes_one_external_data_file(tmp_path, tiny_bundle, monkeypatch):
    """Graphs over 2 GB keep weights in one NAME.onnx.data file; forced here by lowering the thresholds."""
    import sdtrt.export.graph as graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(graph, "IN_MEMORY_INFERENCE_LIMIT", 1024)
    out = tmp_path / "art"
    export_artifacts(tiny_bundle, out, ExportOptions(profile=ShapeProfile.square(64, 64, 128), components=("unet",)))
    entry = read_manifest(out).components["unet"]
    assert entry.data_file == "unet.onnx.data" and entry.data_sha256
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "scheduler_config.json",
        "tokenizer.json",
        "unet.onnx",
        "unet.onnx.data",
        "unet_shallow.onnx",
        "unet_shallow.onnx.data",
    ]
    assert (out / "unet.onnx").stat().st_size < 1_000_000 < (out / "unet.onnx.data").stat().st_size
    rows = check_artifacts(out, tiny_bundle)
    assert rows and all(r.passed for r in rows)
