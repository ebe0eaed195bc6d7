"""Inpainting with everything else: SDXL (parity with diffusers' StableDiffusionXLInpaintPipeline, micro-conditioning
included), a ControlNet, step caching, a LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.inpaint import Inpaint
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline

PROMPT, NEGATIVE = "a photo of a cat on a red sofa", "blurry"


def scene(size: int, box: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return image, mask


def unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def xl_bundle():
    from sdtrt.runtime.models.presets import load_preset

    return load_preset("tiny-xl")


@pytest.fixture(scope="module")
def xl_fp32(tmp_path_factory, xl_bundle):
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile

    out = tmp_path_factory.mktemp("xl-inpaint") / "fp32"
    export_artifacts(xl_bundle, out, ExportOptions(profile=default_profile(xl_bundle), precision="fp32"))
    return out


def test_sdxl_inpainting_matches_diffusers(xl_bundle, xl_fp32):
    """StableDiffusionXLInpaintPipeline with tiny-xl's regular UNet blends as sdtrt does; its micro-conditioning
    (original size, crop, target size) is sdtrt's default for the image size; strength < 1, mask_blur 0 on the
    8-pixel grid, the same composite on diffusers' output."""
    import diffusers

    size, box = 128, (32, 16, 96, 80)
    image, mask = scene(size, box)
    base = diffusers_pipeline(xl_bundle, "euler")
    reference = diffusers.StableDiffusionXLInpaintPipeline(
        **base.components, force_zeros_for_empty_prompt=xl_bundle.model.force_zeros_for_empty_prompt
    )
    reference.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": 6, "guidance_scale": 5.0, "strength": 0.6, "height": size, "width": size}
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        out = reference(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, generator=generator,
                        output_type="pt", **common).images.float()  # fmt: skip
    alpha = unit(mask)[:, :1]
    expected = alpha * out + (1 - alpha) * unit(image)
    with Pipeline.from_artifacts(xl_fp32, device="cpu") as pipe:
        found = pipe(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=5.0, seed=4, height=size, width=size,
                     scheduler="euler", image=image, strength=0.6, inpaint=Inpaint(mask, blur=0)).pixels  # fmt: skip
    assert psnr(found, expected) >= 40
    x1, y1, x2, y2 = box
    assert psnr(found[..., y1:y2, x1:x2], expected[..., y1:y2, x1:x2]) >= 40


def test_inpainting_with_a_controlnet(tiny_control_fp32):
    """The ControlNet runs on the same (4-channel) latents; the mask still keeps the outside."""
    image, mask = scene(64, (16, 16, 48, 48))
    hint = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    args = {"steps": 4, "seed": 3, "height": 64, "width": 64, "image": image, "strength": 0.8}
    with Pipeline.from_artifacts(tiny_control_fp32, device="cpu") as pipe:
        alone = pipe(PROMPT, inpaint=Inpaint(mask, blur=0), **args).pixels
        controlled = pipe(PROMPT, inpaint=Inpaint(mask, blur=0), controls=[ControlInput("edges", hint)], **args)
    inside = unit(mask)[0, 0] > 0
    assert (controlled.pixels - alone).abs()[..., inside].mean() > 1e-3  # the ControlNet changed the repaint
    assert torch.equal(controlled.pixels[..., ~inside], unit(image)[..., ~inside])


def test_inpainting_with_step_caching_stays_close(tiny_fp32):
    image, mask = scene(64, (16, 16, 48, 48))
    args = {"steps": 8, "seed": 3, "height": 64, "width": 64, "image": image, "strength": 1.0}
    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as pipe:
        full = pipe(PROMPT, inpaint=Inpaint(mask, blur=0), **args).pixels
        cached = pipe(PROMPT, inpaint=Inpaint(mask, blur=0), cache_interval=2, **args).pixels
    inside = unit(mask)[0, 0] > 0
    assert not torch.equal(full, cached)
    assert psnr(cached[..., inside], full[..., inside]) >= 20  # step caching's usual distance on the tiny model
    assert torch.equal(cached[..., ~inside], unit(image)[..., ~inside])


def test_inpainting_with_a_lora_matches_diffusers_fused(tiny_fp32, tiny_bundle, tmp_path):
    """A LoRA (UNet and text encoder) while inpainting: diffusers' StableDiffusionInpaintPipeline with the same LoRA
    fused at 0.8, against sdtrt's ``set_loras`` (no rebuild)."""
    import diffusers

    pytest.importorskip("peft")
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.presets import load_preset

    from .lora.test_apply import make_layers

    path = save_lora(make_layers(tiny_bundle, True, 7), tmp_path / "style.safetensors", "kohya", unet=tiny_bundle.unet)
    image, mask = scene(64, (16, 16, 48, 48))
    reference = diffusers.StableDiffusionInpaintPipeline(**diffusers_pipeline(load_preset("tiny"), "euler").components)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    reference.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        out = reference(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, height=64, width=64,
                        strength=0.7, num_inference_steps=6, generator=torch.Generator().manual_seed(2),
                        output_type="pt").images.float()  # fmt: skip
    alpha = unit(mask)[:, :1]
    expected = alpha * out + (1 - alpha) * unit(image)
    args = {"negative_prompt": NEGATIVE, "steps": 6, "seed": 2, "height": 64, "width": 64, "scheduler": "euler"}
    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as pipe:
        plain = pipe(PROMPT, image=image, strength=0.7, inpaint=Inpaint(mask, blur=0), **args).pixels
        pipe.set_loras([(path, 0.8)])
        styled = pipe(PROMPT, image=image, strength=0.7, inpaint=Inpaint(mask, blur=0), **args).pixels
    assert psnr(styled, expected) >= 40
    assert psnr(styled, plain) < 35  # the LoRA changed the repaint
