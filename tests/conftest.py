"""Shared fixtures: the tiny preset and its exported artifacts, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load_trt_double() -> None:
    """Register tests/trt_double.py as ``sdtrt_tests_trt_double``, so test modules can import the double."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sdtrt_tests_trt_double", Path(__file__).parent / "trt_double.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_trt_double()


@pytest.fixture
def use_double(monkeypatch):
    """``install(gpu=("Double GPU", "8.9"), **double_options)``: a TensorRT double as ``tensorrt``, with the CPU
    standing in for its GPU (``gpu=None``: no GPU); returns the double."""
    import sys

    from sdtrt.runtime.backends import trt_compat

    def install(gpu=("Double GPU", "8.9"), **kwargs):
        double = sys.modules["sdtrt_tests_trt_double"].TensorRTDouble(
            compute_capability=gpu[1] if gpu else "8.9", **kwargs
        )
        monkeypatch.setitem(sys.modules, "tensorrt", double.module)
        monkeypatch.setattr(trt_compat, "_test_device", gpu)
        return double

    return install


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    import torch

    has_cuda = torch.cuda.is_available()
    has_trt = has_cuda and importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_bundle():
    from sdtrt.runtime.models.presets import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_profile():
    from sdtrt.runtime.profile import ShapeProfile

    return ShapeProfile.square(64, 128, 256, max_batch=4)


def _export(tmp_path_factory, bundle, profile, precision: str) -> Path:
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    out = tmp_path_factory.mktemp(f"tiny-{precision}") / "artifacts"
    export_artifacts(bundle, out, ExportOptions(profile=profile, precision=precision))
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory, tiny_bundle, tiny_profile) -> Path:
    return _export(tmp_path_factory, tiny_bundle, tiny_profile, "fp32")


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory, tiny_bundle, tiny_profile) -> Path:
    return _export(tmp_path_factory, tiny_bundle, tiny_profile, "fp16")


# -- ControlNet ------------------------------------------------------------------------------------------------
# Random ControlNets copied from the tiny UNet, with "zero" convolutions that are not zero (diffusers starts them at
# zero, which would let every test pass with the ControlNet ignored) and scaled up so one changes the image well
# below 30 dB PSNR (tests/runtime/control/test_control_pipeline.py asserts it).
CONTROL_FIXTURES = {"edges": 1, "depth": 2}  # name -> seed
CONTROL_GAIN = 3.0


def make_tiny_controlnet(unet, seed: int, gain: float = CONTROL_GAIN):
    from sdtrt.runtime.models.controlnet import TINY_HINT_CHANNELS, controlnet_from_unet

    return controlnet_from_unet(unet, seed=seed, hint_channels=TINY_HINT_CHANNELS, gain=gain)


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory, tiny_bundle) -> dict:
    """name -> (diffusers folder, ControlNetModel) for each of CONTROL_FIXTURES."""
    root = tmp_path_factory.mktemp("controlnets")
    result = {}
    for name, seed in CONTROL_FIXTURES.items():
        model = make_tiny_controlnet(tiny_bundle.unet, seed)
        model.save_pretrained(root / name)
        result[name] = (root / name, model)
    return result


@pytest.fixture(scope="session")
def tiny_control_fp32(tmp_path_factory, tiny_bundle, tiny_profile, tiny_controlnets) -> Path:
    """An fp32 ONNX artifact of the tiny preset with the ControlNets ``edges`` and ``depth``."""
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    args = [ControlNetArg(str(path), name) for name, (path, _) in tiny_controlnets.items()]
    out = tmp_path_factory.mktemp("tiny-control") / "artifacts"
    export_artifacts(
        tiny_bundle, out, ExportOptions(profile=tiny_profile), controlnets=load_controlnets(args, tiny_bundle.model)
    )
    return out


def make_sd2_bundle(layers_per_block: int = 1):
    """tiny with SD 2.x's traits: 1024-wide text, linear projections, upcast attention, v-prediction, "!" padding
    (``layers_per_block`` 2 gives SD 2.x's resnets per block too)."""
    import diffusers
    import torch
    import transformers

    from sdtrt.runtime.models.bundle import ModelBundle, model_info
    from sdtrt.runtime.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, preset_configs
    from sdtrt.runtime.models.tokenizer import clip_tokenizer

    text_cfg = {**TINY_TEXT, "hidden_size": 1024, "intermediate_size": 64, "num_hidden_layers": 1, "hidden_act": "gelu"}
    unet_cfg = {**TINY_UNET, "cross_attention_dim": 1024, "use_linear_projection": True, "upcast_attention": True}
    unet_cfg["layers_per_block"] = layers_per_block
    scheduler = {
        **preset_configs("tiny")[3],
        "_class_name": "EulerDiscreteScheduler",
        "prediction_type": "v_prediction",
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)).eval().requires_grad_(False)
        unet = diffusers.UNet2DConditionModel(**unet_cfg).eval().requires_grad_(False)
        vae = diffusers.AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    return ModelBundle(
        text, unet, vae, clip_tokenizer(pad_token="!"), scheduler, model_info(text, unet, vae, scheduler)
    )


# -- Inpainting models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_inpaint_bundle():
    """The ``tiny-inpaint`` preset: tiny with a 9-channel inpainting UNet (latents, mask, masked-image latents),
    random non-zero weights on every input channel."""
    from sdtrt.runtime.models.presets import load_preset

    return load_preset("tiny-inpaint")


@pytest.fixture(scope="session")
def tiny_inpaint_files(tmp_path_factory, tiny_inpaint_bundle, tiny_bundle) -> dict[str, Path]:
    """tiny-inpaint as files: ``folder`` (saved by diffusers' StableDiffusionInpaintPipeline), ``checkpoint`` (one
    .safetensors in the original layout) and ``config`` (the REGULAR tiny's config folder, in_channels 4: loading
    the checkpoint with it must find the 9 channels in the weights themselves)."""
    from sdtrt.runtime.models.reference import inpaint_pipeline
    from sdtrt.runtime.models.single_file import save_original_checkpoint, write_config_dir

    root = tmp_path_factory.mktemp("tiny-inpaint-files")
    b = tiny_inpaint_bundle
    inpaint_pipeline(b, "euler").save_pretrained(root / "folder", safe_serialization=True)
    save_original_checkpoint(b.text_encoder, b.unet, b.vae, root / "tiny-inpaint.safetensors")
    write_config_dir(tiny_bundle.text_encoder, tiny_bundle.unet, tiny_bundle.vae, root / "config")
    return {"folder": root / "folder", "checkpoint": root / "tiny-inpaint.safetensors", "config": root / "config"}


@pytest.fixture(scope="session")
def tiny_inpaint_fp32(tmp_path_factory, tiny_inpaint_bundle, tiny_profile) -> Path:
    """An fp32 ONNX artifact of tiny-inpaint (with step caching, like tiny_fp32)."""
    return _export(tmp_path_factory, tiny_inpaint_bundle, tiny_profile, "fp32")


@pytest.fixture(scope="session")
def tiny_inpaint_fp16(tmp_path_factory, tiny_inpaint_bundle, tiny_profile) -> Path:
    return _export(tmp_path_factory, tiny_inpaint_bundle, tiny_profile, "fp16")


@pytest.fixture(scope="session")
def tiny_inpaint_control_fp32(tmp_path_factory, tiny_inpaint_bundle, tiny_profile, tiny_controlnets) -> Path:
    """An fp32 ONNX artifact of tiny-inpaint with the ControlNet ``edges`` (made from the regular tiny UNet, as
    ControlNets for inpainting checkpoints are made from their base model: it reads the 4 latent channels)."""
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    args = [ControlNetArg(str(tiny_controlnets["edges"][0]), "edges")]
    out = tmp_path_factory.mktemp("tiny-inpaint-control") / "artifacts"
    controlnets = load_controlnets(args, tiny_inpaint_bundle.model)
    export_artifacts(tiny_inpaint_bundle, out, ExportOptions(profile=tiny_profile), controlnets=controlnets)
    return out
