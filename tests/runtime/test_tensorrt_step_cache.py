"""Step caching on the TensorRT backend: the full and the shallow UNet engines, their shared memory, LoRA refits.

Most tests run on tests/trt_double.py, a RECORDING DOUBLE of tensorrt (the CPU standing in for the GPU): they check
sdtrt's wiring, never TensorRT's results. The double's engines write their run count into every output, so the
feature a shallow step reads tells which full step wrote it. Tests marked ``trt`` build and run real engines (the
shallow engine against ONNX Runtime, the cached pipeline with its two captured graphs); they run only where
TensorRT and a GPU exist.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.export.build import TensorRTBuildOptions, build_engines
from sdtrt.runtime.backends import tensorrt as trt_backend
from sdtrt.runtime.cache_plan import full_steps
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.profile import ShapeProfile

PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
MEMORY = {"text_encoder": 1000, "unet": 7000, "vae_decoder": 5000, "vae_encoder": 3000}
PROMPT, SIZE = "a photo of a cat", 64


@pytest.fixture
def use_double(use_double):
    """The shared installer, with this module's engine memory sizes (``shallow_memory`` for ``unet_shallow``)."""

    def install(shallow_memory: int = 2500, **kwargs):
        return use_double(memory={**MEMORY, "unet_shallow": shallow_memory}, **kwargs)

    return install


@pytest.fixture
def engines(use_double, tiny_fp32, tmp_path):
    """Refittable engines of the tiny fp32 step-cache artifact (unet_shallow included), built by the double."""
    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_fp32, out, PROFILE, TensorRTBuildOptions(refittable=True))
    return out


def contexts(double) -> dict:
    """The double's execution contexts by network name."""
    return {c.engine.plan["name"]: c for c in double.records.contexts}


def floats(seen: bytes) -> np.ndarray:
    return np.frombuffer(seen, dtype=np.float32)


@pytest.mark.parametrize("shallow_memory", [2500, 8000], ids=["unet-larger", "shallow-larger"])
def test_full_and_shallow_unet_share_one_activation_buffer(use_double, tiny_fp32, tmp_path, shallow_memory):
    """Both UNet contexts are user-managed and get the same device pointer, sized to the larger engine's need."""
    double = use_double(shallow_memory)
    out = tmp_path / "engines"
    manifest = build_engines(tiny_fp32, out, PROFILE, TensorRTBuildOptions(components=("unet",)))
    opened = trt_backend.open_engines(out, manifest, ["unet", "unet_shallow"], "cpu")
    ran = contexts(double)
    unet, shallow = ran["unet"], ran["unet_shallow"]
    user_managed = double.module.ExecutionContextAllocationStrategy.USER_MANAGED
    assert unet.strategy == shallow.strategy == user_managed
    assert unet.memory == shallow.memory == (opened["unet"]._memory.address, max(7000, shallow_memory))
    assert opened["unet"]._memory is opened["unet_shallow"]._memory


def test_pipeline_opens_the_shallow_engine_with_the_others(use_double, engines):
    double = use_double()
    with Pipeline.from_artifacts(engines, backend="tensorrt", device="cpu") as pipe:
        assert set(pipe.engines) == {"text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
        assert len({id(e._memory) for e in pipe.engines.values()}) == 1
    assert {c.memory for c in double.records.contexts} == {next(iter(double.records.contexts)).memory}


def test_unet_engine_binds_its_cache_feature_output(use_double, engines):
    double = use_double()
    manifest = read_manifest(engines)
    unet = trt_backend.open_engines(engines, manifest, ["unet"], "cpu")["unet"]
    channels, factor = manifest.model.cache_feature
    feeds = {
        "sample": torch.randn(2, 4, 16, 16),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    for entry in unet.inputs[3:]:  # the ControlNet residuals: zeros
        side = 16 // int(str(entry.shape[2]).partition("/")[2] or 1)
        feeds[entry.name] = torch.zeros(2, int(entry.shape[1]), side, side)
    out = unet.infer(feeds)
    assert list(out) == ["noise_pred", "cache_feature"]
    assert tuple(out["cache_feature"].shape) == (2, channels, 16 // factor, 16 // factor)
    context = contexts(double)["unet"]
    assert context.addresses["cache_feature"] == out["cache_feature"].data_ptr()
    assert torch.all(out["cache_feature"] == 1)  # the double wrote its first run's count there


@pytest.mark.parametrize("schedule", ["uniform", "quadratic"])
def test_shallow_engine_runs_exactly_on_the_planned_steps(use_double, engines, schedule):
    """At cache interval 3 the UNet engine runs on the plan's full steps and the shallow engine on the others, each
    shallow step reading the feature of the last full step (the double's UNet writes its run count into it)."""
    double = use_double()
    steps = 8
    plan = full_steps(steps, 0, 3, schedule)
    assert 2 < sum(plan) < steps
    with Pipeline.from_artifacts(engines, backend="tensorrt", device="cpu") as pipe:
        result = pipe(PROMPT, steps=steps, seed=1, height=SIZE, width=SIZE, cache_interval=3, cache_schedule=schedule)
    assert result.settings.to_dict()["cache_interval"] == 3
    ran = contexts(double)
    unet, shallow = ran["unet"], ran["unet_shallow"]
    assert (unet.runs, shallow.runs) == (sum(plan), steps - sum(plan))
    # order the runs by timestep (it falls step by step) to see which engine ran each step
    runs = [(floats(seen["timestep"])[0], "full", seen) for seen in unet.inputs_seen]
    runs += [(floats(seen["timestep"])[0], "shallow", seen) for seen in shallow.inputs_seen]
    runs.sort(key=lambda run: -run[0])
    assert [kind for _, kind, _ in runs] == ["full" if full else "shallow" for full in plan]
    full_so_far = 0
    for _, kind, seen in runs:
        if kind == "full":
            full_so_far += 1
            continue
        assert np.all(floats(seen["cache_feature"]) == full_so_far)  # the last full step's feature
        assert np.all(floats(seen["control_down_0"]) == 0)  # no ControlNet: zero residuals
        assert len(seen["sample"]) == len(runs[0][2]["sample"])  # CFG rows batched like the full step
    assert shallow.shapes["cache_feature"][0] == 2  # guidance: two rows


def test_sdxl_shallow_engine_gets_the_extra_inputs_and_no_text_context(use_double, tmp_path):
    """SDXL's outer blocks have no cross-attention: the shallow engine is fed text_embeds and time_ids, never the
    text context, on exactly the plan's shallow steps."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    export_artifacts(load_preset("tiny-xl"), tmp_path / "xl", ExportOptions(profile=profile, precision="fp16"))
    double = use_double()  # after the export: torch's exporter looks up the real tensorrt module's spec
    build_engines(tmp_path / "xl", tmp_path / "engines", None, TensorRTBuildOptions())
    plan = full_steps(5, 0, 3)
    with Pipeline.from_artifacts(tmp_path / "engines", backend="tensorrt", device="cpu") as pipe:
        pipe(PROMPT, steps=5, seed=1, guidance_scale=5.0, cache_interval=3)
    ran = contexts(double)
    shallow = ran["unet_shallow"]
    assert "encoder_hidden_states" not in shallow.engine.input_names
    assert shallow.shapes["text_embeds"] == (2, 24) and shallow.shapes["time_ids"] == (2, 6)
    assert (ran["unet"].runs, shallow.runs) == (sum(plan), 5 - sum(plan))
    for seen in shallow.inputs_seen:  # the same micro-conditioning the full steps get
        assert seen["time_ids"] == ran["unet"].inputs_seen[0]["time_ids"]
        assert seen["text_embeds"] == ran["unet"].inputs_seen[0]["text_embeds"]


def test_interval_one_never_runs_the_shallow_engine(use_double, engines):
    double = use_double()
    with Pipeline.from_artifacts(engines, backend="tensorrt", device="cpu") as pipe:
        pipe(PROMPT, steps=4, seed=1, height=SIZE, width=SIZE)
    ran = contexts(double)
    assert (ran["unet"].runs, ran["unet_shallow"].runs) == (4, 0)


# -- LoRA refits reach both engines --------------------------------------------------------------------------------
def lora_on(layer: str, path):
    """A rank-2 LoRA changing the UNet linear ``layer`` (a module path); returns (file, LoraLayer, weight shape)."""
    from sdtrt.runtime.lora.files import LoraLayer, read_lora
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.presets import load_preset

    weight = load_preset("tiny").unet.get_submodule(layer).weight
    gen = torch.Generator().manual_seed(0)
    lora = LoraLayer(torch.randn(2, weight.shape[1], generator=gen), torch.randn(weight.shape[0], 2, generator=gen))
    file = save_lora({("unet", layer): lora}, path, "diffusers")
    return file, read_lora(file).layers[("unet", layer)], weight.shape


def onnx_initializer(artifact, component: str, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / f"{component}.onnx"))
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def pick_layers(manifest) -> tuple[str, str]:
    """A to_q projection the shallow UNet runs, and one only the full UNet runs (module paths), from the artifact's
    manifest (the engine folder's must carry what the LoRA code reads; the tests check that it does)."""
    runs = set(manifest.components["unet_shallow"].extra["weights"])
    shallow = manifest.components["unet_shallow"].extra["lora_map"]
    full = manifest.components["unet"].extra["lora_map"]
    outer = next(k for k in shallow if k.endswith(".to_q.weight") and k in runs)
    deep = next(k for k in full if k.endswith(".to_q.weight") and k not in runs and k not in shallow)
    return outer.removesuffix(".weight"), deep.removesuffix(".weight")


def test_lora_refits_the_shallow_engine_through_its_own_map(use_double, engines, tiny_fp32, tmp_path):
    """A LoRA on a layer both UNets have refits both engines, each by its own ONNX initializer name with its own
    base + delta; going back to no LoRA restores both bit for bit."""
    manifest = read_manifest(engines)
    outer, _ = pick_layers(read_manifest(tiny_fp32))
    file, layer, shape = lora_on(outer, tmp_path / "outer.safetensors")
    delta = layer.delta(0.5, shape)
    use_double()
    with Pipeline.from_artifacts(engines, backend="tensorrt", device="cpu") as pipe:
        pipe.set_loras([(file, 0.5)])
        for component in ("unet", "unet_shallow"):
            place = manifest.components[component].extra["lora_map"][f"{outer}.weight"]
            values = pipe.engines[component]._engine.values
            assert list(values) == [place["initializer"]], component
            mapped = {p["initializer"] for p in manifest.components[component].extra["lora_map"].values()}
            assert set(values) <= mapped
            base = onnx_initializer(tiny_fp32, component, place["initializer"])
            expected = (base.astype(np.float32) + (delta.t() if place["transposed"] else delta).numpy()).astype(
                base.dtype
            )
            assert values[place["initializer"]].reshape(base.shape).tobytes() == expected.tobytes()
        pipe(PROMPT, steps=4, seed=1, height=SIZE, width=SIZE, cache_interval=3)
        pipe.set_loras([])
        for component in ("unet", "unet_shallow"):
            place = manifest.components[component].extra["lora_map"][f"{outer}.weight"]
            base = onnx_initializer(tiny_fp32, component, place["initializer"])
            restored = pipe.engines[component]._engine.values[place["initializer"]]
            assert restored.reshape(base.shape).tobytes() == base.tobytes()


def test_lora_on_deep_layers_only_leaves_the_shallow_engine_alone(use_double, engines, tiny_fp32, tmp_path):
    manifest = read_manifest(engines)
    _, deep = pick_layers(read_manifest(tiny_fp32))
    file, _, _ = lora_on(deep, tmp_path / "deep.safetensors")
    double = use_double()
    with Pipeline.from_artifacts(engines, backend="tensorrt", device="cpu") as pipe:
        pipe.set_loras([(file, 1.0)])
        place = manifest.components["unet"].extra["lora_map"][f"{deep}.weight"]
        assert list(pipe.engines["unet"]._engine.values) == [place["initializer"]]
        assert pipe.engines["unet_shallow"]._engine.values == {}
        pipe.set_loras([])
        assert pipe.engines["unet_shallow"]._engine.values == {}
    assert len(double.records.refits) == 2  # the UNet's: on, then back off


# -- real TensorRT (run by users who have it) ---------------------------------------------------------------------
@pytest.mark.trt
def test_real_shallow_engine_matches_onnxruntime(tiny_fp32, tmp_path):
    """The shallow engine, built for real, gives what ONNX Runtime gives for the same feeds (fp32: rel L2 1e-3)."""
    from sdtrt.export.onnx_export import sample_inputs
    from sdtrt.runtime.backends import onnxruntime as ort_backend
    from sdtrt.runtime.specs import component_specs

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    out = tmp_path / "engines"
    manifest = build_engines(tiny_fp32, out, profile, TensorRTBuildOptions(opt_level=1, components=("unet",)))
    assert set(manifest.components) == {"unet", "unet_shallow"}
    source = read_manifest(tiny_fp32)
    spec = component_specs(source.model)["unet_shallow"]
    feeds = dict(zip([t.name for t in spec.inputs], sample_inputs(spec, source.model, profile, "fp32"), strict=True))
    expected = ort_backend.open_engines(tiny_fp32, source, ["unet_shallow"], "cpu")["unet_shallow"].infer(feeds)
    engine = trt_backend.open_engines(out, manifest, ["unet_shallow"], "cuda")["unet_shallow"]
    found = engine.infer({k: v.cuda() for k, v in feeds.items()})["noise_pred"].cpu()
    want = expected["noise_pred"]
    assert float((found - want).norm() / want.norm()) <= 1e-3


@pytest.mark.trt
def test_real_engines_cached_step_matches_onnxruntime(tiny_fp32, tmp_path):
    """Cache interval 3 on real engines: two captured graphs (full, shallow), the image as ONNX Runtime's cached
    one (PSNR >= 40 dB, fp32), and different from the uncached image yet close to it (PSNR >= 30 dB; ONNX Runtime
    gives 39.8 dB here)."""
    out = tmp_path / "engines"
    build_engines(tiny_fp32, out, ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128), TensorRTBuildOptions(opt_level=1))
    args = {"steps": 6, "seed": 3, "height": SIZE, "width": SIZE}
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        expected = pipe(PROMPT, cache_interval=3, **args).pixels
    with Pipeline.from_artifacts(out, backend="tensorrt") as pipe:
        assert pipe.cuda_graph
        found = pipe(PROMPT, cache_interval=3, **args).pixels
        again = pipe(PROMPT, cache_interval=3, **args).pixels
        uncached = pipe(PROMPT, **args).pixels
        graphs = [sorted(d.graphs) for d in pipe._denoisers.values()]
    assert ["full", "shallow"] in graphs and ["full"] in graphs
    assert psnr(found.cpu(), expected) >= 40
    assert torch.equal(found, again)
    assert 30 <= psnr(found, uncached) < 60
