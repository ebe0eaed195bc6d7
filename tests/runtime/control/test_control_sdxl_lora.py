"""SDXL with a ControlNet, and LoRA + ControlNet, against diffusers (fp32, >= 40 dB), on ONNX Runtime and torch.

The SDXL ControlNet gets the pooled text embedding and the micro-conditioning time ids as diffusers'
``StableDiffusionXLControlNetPipeline`` gives them; a LoRA changes the UNet and text encoder and leaves the
ControlNet as it is, as diffusers' ``load_lora_weights`` on the ControlNet pipeline does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.export.controlnet import ControlNetArg, load_controlnets
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.export.profiles import default_profile
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.lora.write import save_lora
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.models.reference import controlnet_pipeline
from sdtrt.runtime.pipeline import Pipeline
from tests.conftest import make_tiny_controlnet
from tests.runtime.lora.test_apply import make_layers

PARITY_DB, CHANGED_DB = 40.0, 30.0
PROMPT, STEPS, SEED = "a house by a lake", 4, 7


def hint(size: int) -> Image.Image:
    rng = np.random.default_rng(9)
    return Image.fromarray(((rng.random((size, size, 3)) > 0.8) * 255).astype(np.uint8))


def hint_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image)).float().div(255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(artifact folder, ControlNet module) for tiny-xl with one ControlNet ``lines``."""
    root = tmp_path_factory.mktemp("xl-control")
    bundle = load_preset("tiny-xl")
    model = make_tiny_controlnet(bundle.unet, seed=4)
    model.save_pretrained(root / "lines")
    controlnets = load_controlnets([ControlNetArg(str(root / "lines"))], bundle.model)
    export_artifacts(bundle, root / "A", ExportOptions(profile=default_profile(bundle)), controlnets=controlnets)
    return root / "A", model


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sdxl_controlnet_matches_diffusers(xl, backend):
    folder, model = xl
    size = 128
    image = hint(size)
    with Pipeline.from_artifacts(folder, backend=backend, device="cpu") as pipe:
        args = {"steps": STEPS, "seed": SEED, "height": size, "width": size, "scheduler": "euler"}
        got = pipe(PROMPT, controls=[ControlInput("lines", image)], **args).pixels
        plain = pipe(PROMPT, **args).pixels
    reference = controlnet_pipeline(load_preset("tiny-xl"), "euler", model)
    with torch.no_grad():
        want = reference(
            PROMPT, image=hint_tensor(image), num_inference_steps=STEPS, height=size, width=size, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(SEED), output_type="pt",
        ).images  # fmt: skip
    assert psnr(got, plain) < CHANGED_DB
    assert psnr(got, want) >= PARITY_DB


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_lora_and_controlnet_together_match_diffusers(
    tiny_control_fp32, tiny_controlnets, tiny_bundle, tmp_path, backend
):
    pytest.importorskip("peft")
    lora = save_lora(make_layers(tiny_bundle, True, 5), tmp_path / "style.safetensors", "kohya", unet=tiny_bundle.unet)
    image = hint(64)
    args = {"negative_prompt": "blurry", "steps": STEPS, "seed": SEED, "height": 64, "width": 64, "scheduler": "euler"}
    with Pipeline.from_artifacts(tiny_control_fp32, backend=backend, device="cpu") as pipe:
        pipe.set_loras([(lora, 0.8)])
        got = pipe(PROMPT, controls=[ControlInput("edges", image)], **args).pixels
        lora_only = pipe(PROMPT, **args).pixels
        pipe.set_loras([])
        control_only = pipe(PROMPT, controls=[ControlInput("edges", image)], **args).pixels
    reference = controlnet_pipeline(load_preset("tiny"), "euler", tiny_controlnets["edges"][1])
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name)
    reference.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        want = reference(
            PROMPT, image=hint_tensor(image), negative_prompt="blurry", num_inference_steps=STEPS, height=64,
            width=64, generator=torch.Generator().manual_seed(SEED), output_type="pt",
        ).images  # fmt: skip
    assert psnr(got, want) >= PARITY_DB
    assert psnr(got, lora_only) < PARITY_DB and psnr(got, control_only) < PARITY_DB  # both act
