"""The TensorRT backend's orchestration, on a recording double of tensorrt (tests/trt_double.py), plus real runs.

The double stands in for TensorRT and the CPU for the GPU (through ``trt_compat._test_device``), so these tests
exercise sdtrt's own logic: refusing an ONNX folder, a damaged plan, or a plan built for another TensorRT version
or GPU before anything is deserialized; user-managed contexts sharing one activation buffer sized to the largest
engine; shape bookkeeping (``set_input_shape`` only on change, profile checks); preallocated, reused output buffers;
errors that name the failed call. The double computes nothing: outputs hold its run counter. CUDA streams, CUDA
graph capture and real engines are exercised only by the tests marked ``trt``, run where TensorRT and a GPU exist.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sdtrt.export.build import TensorRTBuildOptions, build_engines
from sdtrt.runtime.backends import tensorrt as trt_backend
from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.engine import BackendOptions
from sdtrt.runtime.errors import ArtifactError, BackendError, MissingDependencyError, ShapeError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.profile import ShapeProfile

COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
MEMORY = {"text_encoder": 1000, "unet": 7000, "vae_decoder": 5000, "vae_encoder": 3000}
PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)


def load_double_module():
    path = Path(__file__).resolve().parents[1] / "trt_double.py"
    spec = importlib.util.spec_from_file_location("sdtrt_tests_trt_double", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


trt_double = load_double_module()


@pytest.fixture
def use_double(monkeypatch):
    def install(gpu=("Double GPU", "8.9"), **kwargs):
        double = trt_double.TensorRTDouble(memory=MEMORY, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", double.module)
        monkeypatch.setattr(trt_compat, "_test_device", gpu)
        return double

    return install


@pytest.fixture
def engines_dir(use_double, tiny_fp16, tmp_path):
    """An engine folder built by the double (10.13, "compute capability 8.9") from the tiny fp16 artifact."""
    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions())
    return out


def open_all(folder, device="cpu", components=COMPONENTS):
    return trt_backend.open_engines(folder, read_manifest(folder), components, device)


def unet_feeds(batch=2, side=16):
    return {
        "sample": torch.randn(batch, 4, side, side).half(),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, 32).half(),
    }


def test_contexts_share_one_buffer_sized_to_the_largest_engine(use_double, engines_dir):
    double = use_double()
    engines = open_all(engines_dir)
    contexts = double.records.contexts
    assert len(contexts) == 4
    assert {c.strategy for c in contexts} == {double.module.ExecutionContextAllocationStrategy.USER_MANAGED}
    assert len({c.memory for c in contexts}) == 1  # one address, one size for every context
    address, size = contexts[0].memory
    assert size == max(MEMORY.values()) == 7000
    shared = {id(e._memory) for e in engines.values()}
    assert len(shared) == 1 and engines["unet"]._memory.address == address
    assert all(e.graph_capturable is False for e in engines.values())  # CPU stand-in; True on CUDA


def test_tensorrt_11_and_pre_10_1_apis_are_both_served(use_double, tiny_fp16, tmp_path):
    for kwargs in ({"version": "11.4.0.106"}, {"version": "10.0.1.6", "legacy": True}):
        double = use_double(**kwargs)
        out = tmp_path / kwargs["version"]
        build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions(components=("unet", "vae_decoder")))
        engines = open_all(out, components=["unet", "vae_decoder"])
        (unet, vae) = double.records.contexts[-2:]
        expected = "without_device_memory" if kwargs.get("legacy") else 2  # USER_MANAGED
        assert unet.strategy == expected and vae.strategy == expected
        assert unet.memory[0] == vae.memory[0] and (unet.memory[1] in (7000, None))
        engines["unet"].infer(unet_feeds())


def test_set_input_shape_only_when_a_shape_changes(use_double, engines_dir):
    double = use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    context = double.records.contexts[0]
    first = unet.infer(unet_feeds())
    assert len(context.shape_calls) == 3
    second = unet.infer(unet_feeds())
    assert len(context.shape_calls) == 3  # same shapes: nothing set again
    assert second["noise_pred"] is first["noise_pred"]  # the same preallocated buffer, reused
    assert float(second["noise_pred"][0, 0, 0, 0]) == 2.0  # the double's second run wrote into it
    unet.infer(unet_feeds(side=8))
    assert context.shape_calls[3:] == [("sample", (2, 4, 8, 8))]  # only the input whose shape changed
    assert context.addresses["noise_pred"] == unet.infer(unet_feeds(side=8))["noise_pred"].data_ptr()


def test_outputs_follow_the_engine_shapes(use_double, engines_dir):
    use_double()
    engines = open_all(engines_dir)
    image = engines["vae_decoder"].infer({"latent": torch.randn(1, 4, 16, 12).half()})["image"]
    assert image.shape == (1, 3, 128, 96) and image.dtype == torch.float16
    hidden = engines["text_encoder"].infer({"input_ids": torch.zeros(2, 77, dtype=torch.int32)})
    assert hidden["last_hidden_state"].shape == (2, 77, 32) and hidden["pooled_output"].shape == (2, 32)


def test_request_outside_the_profile_names_the_allowed_range(use_double, engines_dir):
    double = use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    with pytest.raises(
        ShapeError,
        match=r"'sample' has shape \[2, 4, 40, 40\], outside this engine's profile: "
        r"min \[1, 4, 8, 8\] .. max \[4, 4, 32, 32\]",
    ):
        unet.infer(unet_feeds(side=40))
    assert double.records.contexts[0].shape_calls == []  # refused before TensorRT was asked


def test_feeds_are_validated(use_double, engines_dir):
    use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    feeds = unet_feeds()
    feeds["sample"] = feeds["sample"].float()
    with pytest.raises(ShapeError, match="expected dtype float16, found float32"):
        unet.infer(feeds)
    with pytest.raises(ShapeError, match="missing"):
        unet.infer({"sample": feeds["sample"]})


def test_failed_execution_names_the_call(use_double, engines_dir):
    use_double(fail_execute=True)
    unet = open_all(engines_dir, components=["unet"])["unet"]
    with pytest.raises(BackendError, match=r"failed to run unet \(execute_async_v3 returned False\)"):
        unet.infer(unet_feeds())


@pytest.mark.parametrize(
    "kwargs, built, running",
    [
        ({"version": "10.14.1.48"}, "TensorRT 10.13.0.35 on a GPU of compute capability 8.9", "TensorRT 10.14.1.48"),
        ({"gpu": ("Bigger GPU", "9.0")}, "compute capability 8.9 (Double GPU)", "compute capability 9.0 (Bigger GPU)"),
    ],
)
def test_plan_for_another_tensorrt_or_gpu_is_refused_before_deserializing(
    use_double, engines_dir, kwargs, built, running
):
    double = use_double(**kwargs)
    with pytest.raises(BackendError) as caught:
        open_all(engines_dir)
    message = str(caught.value)
    assert f"was built for {built}" in message or built in message
    assert "this machine runs" in message and running in message
    assert (
        f"sdtrt build {read_manifest(engines_dir).components['unet'].extra['artifacts']} --out {engines_dir}" in message
    )
    assert double.records.deserialized == []


def test_same_architecture_on_another_gpu_model_only_warns(use_double, engines_dir, caplog):
    use_double(gpu=("Sibling GPU", "8.9"))
    open_all(engines_dir, components=["unet"])
    assert "was built on a Double GPU and runs on a Sibling GPU" in caplog.text


def test_damaged_plan_is_refused_before_deserializing(use_double, engines_dir):
    double = use_double()
    with open(engines_dir / "unet.plan", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="unet.plan does not match the manifest .*refusing to load it"):
        open_all(engines_dir)
    assert "unet" not in double.records.deserialized


def test_plan_tensorrt_cannot_read_is_explained(use_double, engines_dir):
    import hashlib

    double = use_double()
    (engines_dir / "unet.plan").write_bytes(b"not a plan")
    data = json.loads((engines_dir / "manifest.json").read_text())
    data["components"]["unet"]["sha256"] = hashlib.sha256(b"not a plan").hexdigest()
    (engines_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        BackendError,
        match=r"could not deserialize unet.plan \(deserialize_cuda_engine returned None: "
        r"double: the data is not a plan\).*sdtrt build",
    ):
        open_all(engines_dir)
    assert double.records.contexts == []


def test_onnx_artifact_is_refused_with_the_build_command(use_double, tiny_fp16):
    use_double()
    with pytest.raises(ArtifactError, match=r"is an ONNX artifact .*sdtrt build .* --out ENGINES"):
        open_all(tiny_fp16)


def test_precision_other_than_the_engines_is_refused(use_double, engines_dir):
    use_double()
    with pytest.raises(BackendError, match="built from a fp16 graph, but precision fp32"):
        trt_backend.open_engines(engines_dir, read_manifest(engines_dir), ["unet"], "cpu", BackendOptions("fp32"))


def test_available_says_what_is_missing(monkeypatch, use_double, tiny_fp16):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    usable, reason = trt_backend.available()
    assert not usable and 'pip install "sdtrt[trt]"' in reason
    with pytest.raises(MissingDependencyError, match=r"tensorrt backend needs the Python module 'tensorrt'"):
        open_all(tiny_fp16)
    use_double()
    assert trt_backend.available() == (True, "")
    monkeypatch.setattr(trt_compat, "_test_device", None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    usable, reason = trt_backend.available()
    assert not usable and "TensorRT needs an NVIDIA GPU" in reason


def test_closed_engine_refuses_to_run(use_double, engines_dir):
    use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    unet.close()
    with pytest.raises(BackendError, match="closed"):
        unet.infer(unet_feeds())


def test_pipeline_opens_an_engine_folder(use_double, engines_dir):
    """Only the wiring: Pipeline -> tensorrt backend -> engines. The double's outputs are constants, not images."""
    from sdtrt.runtime.pipeline import Pipeline

    use_double()
    with Pipeline.from_artifacts(engines_dir, backend="tensorrt", device="cpu") as pipe:
        result = pipe("a cat", steps=2, seed=1, height=64, width=64)
    assert result.images[0].size == (64, 64) and result.settings["backend"] == "tensorrt"


def test_pipeline_feeds_sdxl_engines_both_encoders_and_the_extra_unet_inputs(use_double, tmp_path):
    """SDXL wiring on the double: both text encoders run, and the UNet is fed text_embeds and time_ids each step."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.pipeline import Pipeline

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)  # opt 64: the default size
    export_artifacts(load_preset("tiny-xl"), tmp_path / "xl", ExportOptions(profile=profile, precision="fp16"))
    double = use_double()  # after the export: torch's exporter looks up the real tensorrt module's spec
    build_engines(tmp_path / "xl", tmp_path / "engines", None, TensorRTBuildOptions())
    with Pipeline.from_artifacts(tmp_path / "engines", backend="tensorrt", device="cpu") as pipe:
        assert set(pipe.engines) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
        result = pipe("a cat", steps=2, seed=1, guidance_scale=5.0)
    assert result.images[0].size == (64, 64)
    by_inputs = {tuple(c.engine.input_names): c for c in double.records.contexts}
    unet = by_inputs[("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")]
    assert unet.runs == 2  # one call per step, guidance batched
    assert unet.shapes["text_embeds"] == (2, 24) and unet.shapes["time_ids"] == (2, 6)
    assert unet.shapes["encoder_hidden_states"] == (2, 77, 64)  # both encoders' states side by side
    assert {"text_embeds", "time_ids"} <= set(unet.addresses)  # bound to device memory, not just shaped
    encoders = [c for c in double.records.contexts if c.engine.input_names == ["input_ids"]]
    assert [c.runs for c in encoders] == [1, 1]  # text_encoder and text_encoder_2, once per call


# -- real TensorRT (run by users who have it) ---------------------------------------------------------------------
@pytest.mark.trt
def test_generate_with_real_engines(tiny_fp16, tmp_path):
    from sdtrt.runtime.pipeline import Pipeline

    out = tmp_path / "engines"
    build_engines(tiny_fp16, out, ShapeProfile(1, 1, 2, 64, 128, 128, 64, 128, 128), TensorRTBuildOptions())
    with Pipeline.from_artifacts(out, backend="tensorrt") as pipe:
        assert pipe.cuda_graph  # the UNet step is captured
        first = pipe("a photo of a cat", steps=4, seed=3)
        again = pipe("a photo of a cat", steps=4, seed=3)
    assert first.images[0].size == (128, 128)
    assert torch.isfinite(first.pixels).all()
    assert torch.equal(first.pixels, again.pixels)  # graph replay is deterministic
