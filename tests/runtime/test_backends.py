"""The onnxruntime and torch backends: parity with PyTorch, buffer reuse, feed checks, artifact safety, lifecycle."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sdtrt.runtime.backends.common import torch_dtype
from sdtrt.runtime.compare import rel_l2
from sdtrt.runtime.engine import BackendOptions, Engine, get_backend
from sdtrt.runtime.errors import ArtifactError, BackendError, ConfigError, MissingDependencyError, ShapeError
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.models.wrappers import wrap
from sdtrt.runtime.specs import ModelInfo, component_spec, control_input_names, model_components, residual_layout

CPU = torch.device("cpu")
TINY_RESIDUALS = residual_layout((32, 64), 1)  # the tiny preset's UNet
SIZES = [(1, 64, 64), (2, 128, 96)]  # (batch, height, width); a non-square size catches swapped sides
# Largest relative L2 error against the fp32 PyTorch modules.
TOLERANCE = {"ort-fp32": 1e-4, "ort-fp16": 1e-2, "torch-fp32": 1e-4}


def make_feeds(component: str, batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 (int32 ids) feeds for ``component`` of the tiny model at one size."""
    g = torch.Generator().manual_seed(seed)
    latent = (batch, 4, height // 8, width // 8)
    if component == "text_encoder":
        ids = torch.randint(0, 49406, (batch, 77), generator=g, dtype=torch.int32)
        ids[:, 0], ids[:, -1] = 49406, 49407
        # clip skip 1 (the last layer) at batch 1, 2 (the tiny encoder's first layer) at batch 2
        return {"input_ids": ids, "clip_skip": torch.tensor([min(batch, 2)], dtype=torch.int32)}
    if component == "unet":
        feeds = {
            "sample": torch.randn(latent, generator=g),
            "timestep": torch.linspace(1, 999, batch),
            "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g),
        }
        # the ControlNet residuals the UNet takes (random, so the parity covers them too)
        tiny = ModelInfo(control_residuals=TINY_RESIDUALS)
        for name, (channels, factor) in zip(control_input_names(tiny), TINY_RESIDUALS, strict=True):
            feeds[name] = torch.randn(batch, channels, latent[2] // factor, latent[3] // factor, generator=g)
        return feeds
    if component == "vae_decoder":
        return {"latent": torch.randn(latent, generator=g)}
    return {"image": torch.rand(batch, 3, height, width, generator=g) * 2 - 1}


def cast_feeds(feeds: dict[str, torch.Tensor], engine: Engine, device: torch.device = CPU) -> dict[str, torch.Tensor]:
    dtypes = {entry.name: torch_dtype(entry.dtype) for entry in engine.inputs}
    return {name: tensor.to(device, dtypes[name]) for name, tensor in feeds.items()}


def reference(bundle, component: str, feeds: dict[str, torch.Tensor], model: ModelInfo) -> tuple[torch.Tensor, ...]:
    """The PyTorch outputs of ``component`` as exported for ``model`` (a step-cache UNet also gives its feature)."""
    with torch.no_grad():
        result = wrap(component, bundle.module(component), model)(*feeds.values())
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


COMPONENTS = model_components(ModelInfo())  # the SD 1.x components of the tiny model


def open_cpu(backend: str, folder: Path, components=COMPONENTS, **options):
    return get_backend(backend).open_engines(folder, read_manifest(folder), components, CPU, BackendOptions(**options))


@pytest.fixture(scope="module")
def artifact_model(tiny_fp32, tiny_fp16) -> ModelInfo:
    """The model both tiny artifacts were exported as (with the step-cache feature output)."""
    model = read_manifest(tiny_fp32).model
    assert model == read_manifest(tiny_fp16).model and model.step_cache
    return model


@pytest.fixture(scope="module")
def engines(tiny_fp32, tiny_fp16):
    opened = {
        "ort-fp32": open_cpu("onnxruntime", tiny_fp32, threads=2),
        "ort-fp16": open_cpu("onnxruntime", tiny_fp16),
        "torch-fp32": open_cpu("torch", tiny_fp32),
    }
    yield opened
    for group in opened.values():
        for engine in group.values():
            engine.close()


def test_registry_lists_valid_names_for_a_wrong_one():
    with pytest.raises(ConfigError, match=r"unknown backend 'onnx'; expected one of: onnxruntime, torch, tensorrt"):
        get_backend("onnx")
    assert get_backend("onnxruntime").NAME == "onnxruntime"
    assert get_backend("torch").NAME == "torch"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_available_here(backend):
    assert get_backend(backend).available() == (True, "")


def test_missing_onnxruntime_is_reported(monkeypatch, tiny_fp32):
    module = get_backend("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    usable, reason = module.available()
    assert not usable and 'pip install "sdtrt[ort]"' in reason
    with pytest.raises(MissingDependencyError, match=r'pip install "sdtrt\[ort\]"'):
        open_cpu("onnxruntime", tiny_fp32, components=["unet"])


def test_missing_diffusers_is_reported(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name, *a)
    )
    assert get_backend("torch").available() == (
        False,
        'the torch backend needs diffusers to load the source model: pip install "sdtrt[export]"',
    )


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "b{}-{}x{}".format(*s))
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("case", list(TOLERANCE))
def test_outputs_match_pytorch(engines, artifact_model, tiny_bundle, case, component, size):
    engine = engines[case][component]
    assert isinstance(engine, Engine)
    feeds = make_feeds(component, *size)
    expected = reference(tiny_bundle, component, feeds, artifact_model)
    outputs = engine.infer(cast_feeds(feeds, engine))
    assert list(outputs) == [entry.name for entry in engine.outputs]
    for entry, want in zip(engine.outputs, expected, strict=True):
        got = outputs[entry.name]
        assert got.dtype == torch_dtype(entry.dtype) and got.shape == want.shape
        assert rel_l2(got, want) <= TOLERANCE[case], f"{case} {component} {entry.name}: {rel_l2(got, want):.2e}"


def test_torch_fp16_declares_and_returns_half(tiny_fp32, tiny_bundle):
    model = read_manifest(tiny_fp32).model
    with open_cpu("torch", tiny_fp32, components=["unet"], precision="fp16")["unet"] as unet:
        assert [e.dtype for e in unet.inputs] == ["float16", "float32", "float16"] + ["float16"] * len(TINY_RESIDUALS)
        assert [e.dtype for e in unet.outputs] == ["float16"] * len(component_spec(model, "unet").outputs)
        assert {type(p).__name__ for p in unet.module.unet.attn_processors.values()} == {"AttnProcessor2_0"}
        feeds = make_feeds("unet", 1, 64, 64)
        out = unet.infer(cast_feeds(feeds, unet))["noise_pred"]
        assert out.dtype == torch.float16
        assert rel_l2(out, reference(tiny_bundle, "unet", feeds, model)[0]) <= 1e-2


def test_onnxruntime_reuses_output_buffers(engines, artifact_model, tiny_bundle):
    unet = engines["ort-fp32"]["unet"]
    small, large = make_feeds("unet", 1, 64, 64), make_feeds("unet", 2, 128, 96, seed=1)
    first = unet.infer(small)["noise_pred"]
    kept = first.clone()
    second = unet.infer(small)["noise_pred"]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, kept)
    other = unet.infer(large)["noise_pred"]
    assert other.shape == (2, 4, 16, 12) and other.data_ptr() != first.data_ptr()
    assert rel_l2(other, reference(tiny_bundle, "unet", large, artifact_model)[0]) <= 1e-4
    assert unet.infer(small)["noise_pred"].data_ptr() == first.data_ptr()
    images = [engines["ort-fp32"]["vae_decoder"].infer(make_feeds("vae_decoder", *s))["image"] for s in SIZES]
    assert [tuple(i.shape) for i in images] == [(1, 3, 64, 64), (2, 3, 128, 96)]


def _bad_unet_feeds(kind: str) -> dict[str, torch.Tensor]:
    feeds = make_feeds("unet", 2, 128, 128)
    if kind == "missing":
        del feeds["encoder_hidden_states"]
    elif kind == "unknown":
        feeds["mask"] = torch.zeros(2)
    elif kind == "dtype":
        feeds["sample"] = feeds["sample"].double()
    elif kind == "rank":
        feeds["sample"] = feeds["sample"][0]
    elif kind == "fixed":
        feeds["sample"] = feeds["sample"][:, :3]
    elif kind == "batch":
        feeds["timestep"] = torch.ones(3)
    return feeds


BAD_FEEDS = {
    "missing": r"unet expects inputs \['sample', 'timestep', 'encoder_hidden_states', 'control_down_0'.*"
    r"missing \['encoder_hidden_",
    "unknown": r"unknown \['mask'\]",
    "dtype": r"input 'sample': expected dtype float32, found float64",
    "rank": r"expected rank 4 \[unet_batch, 4, latent_height, latent_width\], found rank 3 \[4, 16, 16\]",
    "fixed": r"expected shape \[unet_batch, 4, latent_height, latent_width\], found \[2, 3, 16, 16\]",
    "batch": r"input 'timestep': dimension 'unet_batch' is 3 .*but 2 in input 'sample'",
}


@pytest.mark.parametrize("kind", list(BAD_FEEDS))
@pytest.mark.parametrize("case", ["ort-fp32", "torch-fp32"])
def test_bad_feeds_are_refused(engines, case, kind):
    with pytest.raises(ShapeError, match=BAD_FEEDS[kind]):
        engines[case]["unet"].infer(_bad_unet_feeds(kind))


@pytest.mark.parametrize("case", ["ort-fp32", "torch-fp32"])
def test_image_side_must_divide_by_the_vae_factor(engines, case):
    with pytest.raises(ShapeError, match="multiple of the VAE scale factor 8, found 60"):
        engines[case]["vae_encoder"].infer({"image": torch.zeros(1, 3, 60, 64)})


def test_precision_other_than_the_artifacts_is_refused(tiny_fp32):
    with pytest.raises(BackendError, match=r"this artifact is fp32 .*re-export with --precision fp16"):
        open_cpu("onnxruntime", tiny_fp32, components=["unet"], precision="fp16")


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is not None
    and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="onnxruntime-gpu is installed",
)
def test_cuda_without_onnxruntime_gpu_says_what_to_install(tiny_fp32):
    module = get_backend("onnxruntime")
    with pytest.raises(BackendError, match=r'pip install "sdtrt\[ort-gpu\]"'):
        module.open_engines(tiny_fp32, read_manifest(tiny_fp32), ["unet"], torch.device("cuda"), BackendOptions())


def spinning(engine: Engine) -> bool:
    """Whether the ONNX Runtime session behind ``engine`` lets its intra-op threads spin between runs."""
    options = engine._session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        return True


def test_spin_false_puts_every_session_to_sleep_between_runs(tiny_fp32):
    every = [*COMPONENTS, "unet_shallow"]
    default = open_cpu("onnxruntime", tiny_fp32, every)
    sleeping = open_cpu("onnxruntime", tiny_fp32, every, spin=False)
    try:
        # by default every session spins but the step-caching shallow UNet's (it runs between full steps)
        assert {name: spinning(engine) for name, engine in default.items()} == {
            name: name != "unet_shallow" for name in default
        }
        assert not any(spinning(engine) for engine in sleeping.values())
        unet = sleeping["unet"]
        feeds = cast_feeds(make_feeds("unet", 1, 64, 64), unet)
        asleep = {name: out.clone() for name, out in unet.infer(feeds).items()}
        awake = default["unet"].infer(feeds)
        assert all(torch.equal(asleep[name], awake[name]) for name in awake)  # the same numbers either way
    finally:
        for engine in [*default.values(), *sleeping.values()]:
            engine.close()
    with pytest.raises(ConfigError, match="spin must be True or False"):
        BackendOptions(spin="no")


@pytest.fixture
def artifact_copy(tiny_fp32, tmp_path) -> Path:
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_fp32, folder)
    return folder


def test_tampered_onnx_file_is_refused(artifact_copy):
    path = artifact_copy / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"unet.onnx does not match the manifest \(sha256 .*re-export"):
        open_cpu("onnxruntime", artifact_copy, components=["unet"])


def _external_weight_model(folder: Path, location: str, data_file: str | None = None) -> None:
    """Replace the artifact's UNet with a one-Add graph whose weight is stored at ``location``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "8"}.items():
        item = weight.external_data.add()
        item.key, item.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "unet.onnx"
    path.write_bytes(model.SerializeToString())
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    manifest = read_manifest(folder)
    data_sha = sha256_file(folder / data_file) if data_file else None
    entry = dataclasses.replace(
        manifest.components["unet"], sha256=sha256_file(path), data_file=data_file, data_sha256=data_sha
    )
    dataclasses.replace(manifest, components={**manifest.components, "unet": entry}).write(folder)


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("../secret.bin", r"keeps weights at '../secret.bin', which is refused: .*not a plain relative name"),
        ("SECRET", r"which is refused: .*not a plain relative name"),
        ("link.bin", r"keeps weights at 'link.bin', which is refused: .*is a link or leads outside"),
        ("other.bin", r"keeps weights in 'other.bin', but the manifest names no data file"),
    ],
)
def test_external_data_outside_the_manifest_is_refused(artifact_copy, location, match):
    secret = artifact_copy.parent / "secret.bin"
    secret.write_bytes(b"\0" * 8)
    (artifact_copy / "other.bin").write_bytes(b"\0" * 8)
    (artifact_copy / "link.bin").symlink_to(secret)
    _external_weight_model(artifact_copy, str(secret) if location == "SECRET" else location)
    with pytest.raises(ArtifactError, match=match):
        open_cpu("onnxruntime", artifact_copy, components=["unet"])


def test_external_data_named_by_the_manifest_is_accepted(artifact_copy):
    from sdtrt.runtime.verify import verified_model_file

    (artifact_copy / "unet.onnx.data").write_bytes(b"\0" * 8)
    _external_weight_model(artifact_copy, "unet.onnx.data", data_file="unet.onnx.data")
    entry = read_manifest(artifact_copy).components["unet"]
    assert verified_model_file(artifact_copy, entry) == artifact_copy / "unet.onnx"
    (artifact_copy / "unet.onnx.data").write_bytes(b"\1" * 8)
    with pytest.raises(ArtifactError, match="unet.onnx.data does not match the manifest"):
        verified_model_file(artifact_copy, entry)


def test_without_onnx_the_manifest_checks_still_run(monkeypatch, artifact_copy):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with open_cpu("onnxruntime", artifact_copy, components=["text_encoder"])["text_encoder"] as engine:
        engine.infer(make_feeds("text_encoder", 1, 64, 64))
    (artifact_copy / "text_encoder.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="text_encoder.onnx does not match the manifest"):
        open_cpu("onnxruntime", artifact_copy, components=["text_encoder"])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_close_is_idempotent_and_infer_after_close_fails(tiny_fp32, backend):
    with open_cpu(backend, tiny_fp32, components=["vae_decoder"])["vae_decoder"] as engine:
        assert not engine.closed
        engine.infer(make_feeds("vae_decoder", 1, 64, 64))
    assert engine.closed
    engine.close()
    with pytest.raises(BackendError, match="the vae_decoder engine is closed; open the engines again"):
        engine.infer(make_feeds("vae_decoder", 1, 64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_engines_run_on_cuda(backend, tiny_fp16, tiny_bundle):
    if backend == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu is not installed")
    cuda = torch.device("cuda")
    module = get_backend(backend)
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    engines = module.open_engines(tiny_fp16, read_manifest(tiny_fp16), components, cuda, BackendOptions())
    try:
        for component, engine in engines.items():
            assert engine.device.type == "cuda"
            for size in SIZES:
                feeds = make_feeds(component, *size)
                outputs = engine.infer(cast_feeds(feeds, engine, cuda))
                for entry, want in zip(engine.outputs, reference(tiny_bundle, component, feeds), strict=True):
                    assert outputs[entry.name].device.type == "cuda"
                    assert rel_l2(outputs[entry.name], want) <= 1e-2, (backend, component, entry.name)
        unet = engines["unet"]
        assert unet.graph_capturable == (backend == "torch")
        if unet.graph_capturable:
            _check_graph_capture(unet, cast_feeds(make_feeds("unet", 2, 64, 64), unet, cuda))
    finally:
        for engine in engines.values():
            engine.close()


def _check_graph_capture(unet: Engine, feeds: dict[str, torch.Tensor]) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            unet.infer(feeds)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = unet.infer(feeds)["noise_pred"]
    feeds["sample"].copy_(torch.randn_like(feeds["sample"]))
    graph.replay()
    eager = unet.infer(feeds)["noise_pred"]
    torch.cuda.synchronize()
    assert rel_l2(captured, eager) <= 1e-3
