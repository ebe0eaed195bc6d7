"""The TensorRT backend's orchestration, on a recording double of tensorrt (tests/trt_double.py), plus real runs.

The double stands in for TensorRT and the CPU for the GPU (through ``trt_compat._test_device``), so these tests
exercise sdtrt's own logic: refusing an ONNX folder, a damaged plan, or a plan built for another TensorRT version
or GPU before anything is deserialized; user-managed contexts sharing one activation buffer sized to the largest
engine; shape bookkeeping (``set_input_shape`` only on change, profile checks); preallocated, reused output buffers;
256-byte aligned addresses (a misaligned feed is copied); the engine's device made current; refits (names, dtypes,
sizes and missing partners checked before anything is set); errors that name the failed call and the likely cause.
The double computes nothing: outputs hold its run counter. CUDA streams, CUDA graph capture and real engines are
exercised only by the tests marked ``trt``, run where TensorRT and a GPU exist.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys

import numpy as np
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


@pytest.fixture
def use_double(use_double):
    """The shared installer, with this module's engine memory sizes."""
    return functools.partial(use_double, memory=MEMORY)


@pytest.fixture
def engines_dir(use_double, tiny_fp16, tmp_path):
    """An engine folder built by the double (10.13, "compute capability 8.9") from the tiny fp16 artifact."""
    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions())
    return out


def open_all(folder, device="cpu", components=COMPONENTS):
    return trt_backend.open_engines(folder, read_manifest(folder), components, device)


# The tiny UNet's ControlNet residual inputs: (channels, latent downscale), as its manifest declares them.
TINY_RESIDUALS = ((32, 1), (32, 1), (32, 2), (64, 2), (64, 2))


def unet_feeds(batch=2, side=16):
    feeds = {
        "sample": torch.randn(batch, 4, side, side).half(),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, 32).half(),
    }
    names = [f"control_down_{k}" for k in range(len(TINY_RESIDUALS) - 1)] + ["control_mid"]
    for name, (channels, factor) in zip(names, TINY_RESIDUALS, strict=True):
        feeds[name] = torch.zeros(batch, channels, side // factor, side // factor).half()
    return feeds


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


def test_tensorrt_11_and_10_0_apis_are_both_served(use_double, tiny_fp16, tmp_path):
    for version in ("11.4.0.106", "10.0.1.6"):
        double = use_double(version=version)
        out = tmp_path / version
        build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions(components=("unet", "vae_decoder")))
        engines = open_all(out, components=["unet", "vae_decoder"])
        (unet, vae) = double.records.contexts[-2:]
        user_managed = double.module.ExecutionContextAllocationStrategy.USER_MANAGED  # 10.0 has it too
        assert unet.strategy == user_managed and vae.strategy == user_managed
        # 10.0: the device_memory setter (no size), sized by device_memory_size; 11: set_device_memory(ptr, size)
        assert unet.memory == vae.memory == (unet.memory[0], None if version.startswith("10.0") else 7000)
        engines["unet"].infer(unet_feeds())


def test_set_input_shape_only_when_a_shape_changes(use_double, engines_dir):
    double = use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    context = double.records.contexts[0]
    first = unet.infer(unet_feeds())
    assert len(context.shape_calls) == 8  # every input, residuals included
    second = unet.infer(unet_feeds())
    assert len(context.shape_calls) == 8  # same shapes: nothing set again
    assert second["noise_pred"] is first["noise_pred"]  # the same preallocated buffer, reused
    assert float(second["noise_pred"][0, 0, 0, 0]) == 2.0  # the double's second run wrote into it
    unet.infer(unet_feeds(side=8))
    # only the inputs whose shape changed: the latents and the residuals that follow their size
    assert [name for name, _ in context.shape_calls[8:]] == ["sample", *(n for n in unet_feeds() if "control" in n)]
    assert context.shape_calls[8] == ("sample", (2, 4, 8, 8))
    assert context.shape_calls[-1] == ("control_mid", (2, 64, 4, 4))
    assert context.addresses["noise_pred"] == unet.infer(unet_feeds(side=8))["noise_pred"].data_ptr()


def test_outputs_follow_the_engine_shapes(use_double, engines_dir):
    use_double()
    engines = open_all(engines_dir)
    image = engines["vae_decoder"].infer({"latent": torch.randn(1, 4, 16, 12).half()})["image"]
    assert image.shape == (1, 3, 128, 96) and image.dtype == torch.float16
    ids, skip = torch.zeros(2, 77, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    hidden = engines["text_encoder"].infer({"input_ids": ids, "clip_skip": skip})
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


def test_misaligned_input_is_copied_into_an_aligned_buffer(use_double, engines_dir):
    """TensorRT wants 256-byte aligned addresses; a feed that is a view at an odd offset is copied, and runs."""
    double = use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    feeds = unet_feeds()
    sample = feeds["sample"]
    backing = torch.empty(sample.numel() + 1, dtype=sample.dtype)
    view = backing[1:].view(sample.shape)  # contiguous, 2 bytes past an aligned start
    view.copy_(sample)
    assert view.data_ptr() % 256 != 0
    unet.infer({**feeds, "sample": view})
    context = double.records.contexts[0]
    assert context.addresses["sample"] % 256 == 0 and context.addresses["sample"] != view.data_ptr()
    assert context.inputs_seen[-1]["sample"] == view.numpy().tobytes()  # the engine read the feed's values
    staged = context.addresses["sample"]
    view.mul_(2)
    unet.infer({**feeds, "sample": view})
    assert context.addresses["sample"] == staged  # the aligned buffer is kept for the next call
    assert context.inputs_seen[-1]["sample"] == view.numpy().tobytes()
    assert all(address % 256 == 0 for address in context.addresses.values())
    assert context.memory[0] % 256 == 0  # the shared activation buffer too


def test_infer_makes_the_engine_device_current(use_double, engines_dir, monkeypatch):
    use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    made_current = []

    def guard(device):
        made_current.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(trt_compat, "device_guard", guard)
    unet.infer(unet_feeds())
    assert made_current == [unet.device]


def test_device_guard_switches_only_when_another_device_is_current(monkeypatch):
    switched = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: switched.append(device) or contextlib.nullcontext())
    with trt_compat.device_guard(torch.device("cuda", 0)):
        pass
    assert switched == []  # already current: nothing to do on the hot path
    with trt_compat.device_guard(torch.device("cuda", 1)):
        pass
    assert switched == [torch.device("cuda", 1)]
    with trt_compat.device_guard(torch.device("cpu")):
        pass
    assert len(switched) == 1


def test_runtime_that_cannot_initialise_names_the_likely_cause(use_double, engines_dir):
    use_double(fail_init=True)
    with pytest.raises(BackendError) as caught:
        open_all(engines_dir)
    message = str(caught.value)
    assert "TensorRT could not initialise: trt.Runtime(logger) failed (pybind11::init(): factory function" in message
    assert "CUDA initialization failure" in message and "driver is too old" in message
    assert "another CUDA version than torch" in message


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
    monkeypatch.setattr("torch.version.cuda", "13.0")
    usable, reason = trt_backend.available()
    assert not usable and 'pip install "sdtrt[trt-cu13]"' in reason
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
    assert result.images[0].size == (64, 64) and result.settings.backend == "tensorrt"


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
        assert set(pipe.engines) == {
            "text_encoder",
            "text_encoder_2",
            "unet",
            "unet_shallow",
            "vae_decoder",
            "vae_encoder",
        }
        result = pipe("a cat", steps=2, seed=1, guidance_scale=5.0)
    assert result.images[0].size == (64, 64)
    by_inputs = {tuple(c.engine.input_names[:5]): c for c in double.records.contexts}
    unet = by_inputs[("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")]
    residuals = unet.engine.input_names[5:]  # fed zeros: no ControlNet in this call
    assert residuals[-1] == "control_mid" and all(n.startswith("control_down_") for n in residuals[:-1])
    assert set(residuals) <= set(unet.addresses)
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


# -- refit (LoRA without a rebuild) ------------------------------------------------------------------------------
@pytest.fixture
def refittable_dir(use_double, tiny_fp16, tmp_path):
    use_double()
    out = tmp_path / "refittable"
    build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions(refittable=True, components=("unet",)))
    return out


def unet_initializers(tiny_fp16):
    """The UNet's initializers (name -> array), from the ONNX file the engine was built from."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_fp16 / "unet.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_refit_sets_the_named_weights(use_double, refittable_dir, tiny_fp16):
    from sdtrt.runtime.engine import supports_refit

    double = use_double()
    unet = open_all(refittable_dir, components=["unet"])["unet"]
    assert unet.supports_refit and supports_refit(unet)
    weights = unet_initializers(tiny_fp16)
    floats = [n for n, a in weights.items() if a.dtype == np.float16 and a.size > 1][:2]
    new = {floats[0]: weights[floats[0]] + np.float16(1), floats[1]: torch.from_numpy(weights[floats[1]] * 2)}
    unet.refit(new)
    (applied,) = double.records.refits
    assert set(applied) == set(floats)
    assert np.array_equal(applied[floats[0]], new[floats[0]].ravel())
    assert np.array_equal(applied[floats[1]], new[floats[1]].numpy().ravel())
    unet.infer(unet_feeds())  # still runs after the refit


def test_engine_built_without_refit_says_how_to_rebuild(use_double, engines_dir, tiny_fp16):
    from sdtrt.runtime.engine import supports_refit

    double = use_double()
    unet = open_all(engines_dir, components=["unet"])["unet"]
    assert not unet.supports_refit and not supports_refit(unet)
    with pytest.raises(BackendError, match=r"built without refitting enabled.*sdtrt build .*--refittable"):
        unet.refit({"anything": np.zeros(1, np.float16)})
    assert double.records.refits == []


def test_unknown_names_are_all_reported_before_anything_is_set(use_double, refittable_dir, tiny_fp16):
    double = use_double()
    unet = open_all(refittable_dir, components=["unet"])["unet"]
    weights = unet_initializers(tiny_fp16)
    known = next(iter(weights))
    new = {known: weights[known], **{f"lora.{i}": np.zeros(1, np.float16) for i in range(7)}}
    with pytest.raises(BackendError) as caught:
        unet.refit(new)
    message = str(caught.value)
    assert "7 of the 8 weights given are not refittable weights of this engine" in message
    assert "'lora.0', 'lora.1', 'lora.2', 'lora.3', 'lora.4' and 2 more" in message
    assert "ONNX initializer names of unet.onnx" in message and "the engine is unchanged" in message
    assert double.records.refits == [] and unet._engine.values == {}


def test_wrong_dtype_or_size_is_refused_before_anything_is_set(use_double, refittable_dir, tiny_fp16):
    double = use_double()
    unet = open_all(refittable_dir, components=["unet"])["unet"]
    weights = unet_initializers(tiny_fp16)
    a, b = [n for n, v in weights.items() if v.dtype == np.float16 and v.size > 1][:2]
    with pytest.raises(BackendError) as caught:
        unet.refit({a: weights[a].astype(np.float32), b: weights[b].ravel()[:-1]})
    message = str(caught.value)
    assert f"2 weights do not match the engine's: {a!r} is float32 x {weights[a].size}, the engine's" in message
    assert f"the engine's is float16 x {weights[a].size}" in message
    assert f"{b!r} is float16 x {weights[b].size - 1}" in message
    assert double.records.refits == []


def test_missing_partner_weights_are_reported_and_nothing_changes(use_double, tiny_fp16, tmp_path):
    names = [n for n, v in unet_initializers(tiny_fp16).items() if v.size > 1][:2]
    double = use_double(fused=(tuple(names),))
    build_engines(tiny_fp16, tmp_path / "E", PROFILE, TensorRTBuildOptions(refittable=True, components=("unet",)))
    unet = open_all(tmp_path / "E", components=["unet"])["unet"]
    weights = unet_initializers(tiny_fp16)
    with pytest.raises(BackendError, match=rf"1 that go with the ones given are missing: {names[1]!r}.*unchanged"):
        unet.refit({names[0]: weights[names[0]]})
    assert double.records.refits == []
    unet.refit({n: weights[n] for n in names})
    assert len(double.records.refits) == 1


def test_failed_refit_says_the_engine_may_be_partly_refitted(use_double, tiny_fp16, tmp_path):
    use_double(fail_refit=True)
    build_engines(tiny_fp16, tmp_path / "E", PROFILE, TensorRTBuildOptions(refittable=True, components=("unet",)))
    unet = open_all(tmp_path / "E", components=["unet"])["unet"]
    name, value = next(iter(unet_initializers(tiny_fp16).items()))
    with pytest.raises(
        BackendError, match=r"failed to refit unet \(refit_cuda_engine\): double: refit failed.*part of the new weights"
    ):
        unet.refit({name: value})


def test_engine_folder_keeps_the_lora_weight_map_of_its_artifact(refittable_dir, tiny_fp16):
    source = read_manifest(tiny_fp16).components["unet"].extra
    engine = read_manifest(refittable_dir).components["unet"].extra
    for key in ("lora_map", "module_config"):
        if key in source:
            assert engine[key] == source[key]


def test_loras_refit_refittable_engines_through_the_weight_map(use_double, tiny_fp16, tmp_path):
    """set_loras on TensorRT: base + delta, in the ONNX initializer's layout, refitted by initializer name; none puts
    the base weights back; a non-refittable engine says to rebuild with --refittable."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from sdtrt.runtime.errors import BackendError
    from sdtrt.runtime.lora.files import LoraLayer, read_lora
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.pipeline import Pipeline

    bundle = load_preset("tiny")
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = bundle.unet.get_submodule(to_q).weight
    layer = LoraLayer(torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2), alpha=2.0)
    lora = save_lora({("unet", to_q): layer}, tmp_path / "q.safetensors", "diffusers")

    double = use_double()
    out = tmp_path / "refittable"
    build_engines(tiny_fp16, out, PROFILE, TensorRTBuildOptions(refittable=True))
    place = read_manifest(out).components["unet"].extra["lora_map"][f"{to_q}.weight"]
    model = onnx.load(str(tiny_fp16 / "unet.onnx"))
    base = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[place["initializer"]]
    with Pipeline.from_artifacts(out, backend="tensorrt", device="cpu") as pipe:
        pipe.set_loras([(lora, 0.5)])
        refit = double.records.refits[-1]
        assert list(refit) == [place["initializer"]]  # only the changed weight, by its ONNX name
        delta = read_lora(lora).layers[("unet", to_q)].delta(0.5, weight.shape)
        expected = (base.astype(np.float32) + (delta.t() if place["transposed"] else delta).numpy()).astype(base.dtype)
        assert refit[place["initializer"]].reshape(base.shape).tobytes() == expected.tobytes()
        pipe("a cat", steps=1, seed=1, height=64, width=64)
        pipe.set_loras([])
        restored = double.records.refits[-1]
        assert restored[place["initializer"]].reshape(base.shape).tobytes() == base.tobytes()  # bit for bit
    fixed = tmp_path / "fixed"
    build_engines(tiny_fp16, fixed, PROFILE, TensorRTBuildOptions())
    with Pipeline.from_artifacts(fixed, backend="tensorrt", device="cpu") as pipe:
        with pytest.raises(BackendError, match="--refittable"):
            pipe.set_loras([(lora, 1.0)])
