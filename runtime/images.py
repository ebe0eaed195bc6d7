"""Pixels in and out: tensors <-> PIL images, a cheap latent preview, and A1111-style PNG metadata."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from sdtrt.runtime.errors import NumericsError
from sdtrt.runtime.files import write_bytes_atomic
from sdtrt.runtime.schedulers import A1111_LABELS

if TYPE_CHECKING:
    from sdtrt.runtime.request import HiresSetting, Settings

if TYPE_CHECKING:
    from sdtrt.runtime.manifest import Manifest

# Fixed linear map from the 4 SD 1.x/2.x latent channels to RGB (a least-squares fit that image apps use for
# progress previews): good enough to show composition and colour without running the VAE, for SD's VAE only.
# Export fits a model's own map (see latent_rgb_map).
LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] (any device or float dtype) -> PIL RGB images."""
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def from_pil(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A PIL image resized to width x height -> [1, 3, H, W] float32 in [-1, 1]."""
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def latent_rgb_map(manifest: Manifest) -> torch.Tensor | None:
    """The preview map export fitted from the model's own VAE ([C + 1, 3]: channel weights, then the bias), or
    None for an artifact exported without one (``latents_to_rgb`` then uses SD's factors)."""
    decoder = manifest.components.get("vae_decoder")
    values = decoder.extra.get("latent_rgb") if decoder is not None else None
    return torch.tensor(values, dtype=torch.float32) if values else None


def latents_to_rgb(latents: torch.Tensor, rgb_map: torch.Tensor | None = None) -> list[Image.Image]:
    """Preview of [B, C, h, w] latents as small RGB images (h x w), from a linear map per pixel.

    ``rgb_map`` is the model's own map (``latent_rgb_map``: C rows of weights, then a bias row); without it,
    the fixed SD 1.x/2.x factors, whose colours are right for SD's VAE only.
    """
    weights, bias = (LATENT_RGB, None) if rgb_map is None else (rgb_map[:-1], rgb_map[-1])
    if latents.shape[1] != weights.shape[0]:
        raise ValueError(f"the preview map expects {weights.shape[0]} latent channels, got {latents.shape[1]}")
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), weights)
    if bias is not None:
        rgb = rgb + bias.view(1, 3, 1, 1)
    return to_pil(rgb.clamp(-1, 1))


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str = "",
    model_name: str = "",
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """The ``parameters`` text that AUTOMATIC1111 writes into PNGs (read by image browsers)."""
    fields = [
        ("Steps", str(steps)),
        ("Sampler", sampler),
        ("CFG scale", f"{cfg_scale:g}"),
        ("Seed", str(seed)),
        ("Size", f"{width}x{height}"),
    ]
    if model_hash:
        fields.append(("Model hash", model_hash[:10]))
    if model_name:
        fields.append(("Model", model_name))
    fields.extend(extra)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


_RESIZE_LABELS = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_fill": "Resize and Fill",
}


def infotext(
    prompt: str, negative_prompt: str, seed: int, settings: Settings, model_hash: str = "", model_name: str = ""
) -> str:
    """A1111's ``parameters`` text for one image of a generation that ran with ``settings``.

    As A1111 writes it: img2img adds the denoising strength; a clip skip above 1 is ``Clip skip``; LoRAs are
    ``<lora:name:scale>`` tags after the prompt and their short hashes a ``Lora hashes`` field; ControlNets are
    ``ControlNet <k>`` fields; step caching (when on) is ``Cache interval`` and ``Cache schedule``; a hires fix is
    A1111's ``Hires ...`` fields (``hires_fields``), the size and steps being the first pass's.
    """
    extra = [("Denoising strength", f"{settings.strength:g}")] if settings.strength is not None else []
    if settings.clip_skip > 1:  # A1111 writes it only when it skips, right after the denoising strength
        extra.append(("Clip skip", str(settings.clip_skip)))
    if settings.hires is not None:
        extra += hires_fields(settings.hires)
    if settings.loras:
        extra.append(("Lora hashes", '"' + ", ".join(f"{x.name}: {x.hash}" for x in settings.loras) + '"'))
    for k, c in enumerate(settings.controls):  # as A1111's ControlNet extension writes its units
        mode = "ControlNet is more important" if c.guess_mode else "Balanced"
        mode = "My prompt is more important" if c.soft_weights else mode
        unit = (
            f"Module: {c.preprocess}, Model: {c.name}, Weight: {c.scale:g}, "
            f"Resize Mode: {_RESIZE_LABELS[c.resize_mode]}, Guidance Start: {c.start:g}, "
            f"Guidance End: {c.end:g}, Control Mode: {mode}"
        )
        extra.append((f"ControlNet {k}", f'"{unit}"'))
    if settings.cache_interval > 1:
        extra += [("Cache interval", str(settings.cache_interval))]
        extra += [("Cache schedule", settings.cache_schedule)]
    tags = "".join(f" <lora:{x.name}:{x.scale:g}>" for x in settings.loras)
    return a1111_parameters(
        prompt + tags,
        negative_prompt,
        settings.steps,
        A1111_LABELS[settings.scheduler],
        settings.guidance_scale,
        seed,
        settings.width,
        settings.height,
        model_hash=model_hash,
        model_name=model_name,
        extra=extra,
    )


def quote(text: str) -> str:
    """An infotext value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def hires_fields(hires: HiresSetting) -> list[tuple[str, str]]:
    """A1111's infotext fields of a hires fix, in the order A1111 adds them."""
    fields = [("Denoising strength", f"{hires.denoising_strength:g}")]
    if hires.sampler is not None:
        fields.append(("Hires sampler", A1111_LABELS[hires.sampler]))
    if hires.prompt is not None:
        fields.append(("Hires prompt", quote(hires.prompt)))
    if hires.negative_prompt is not None:
        fields.append(("Hires negative prompt", quote(hires.negative_prompt)))
    if hires.resize is None:
        fields.append(("Hires upscale", f"{hires.scale:g}"))
    else:
        fields.append(("Hires resize", f"{hires.resize[1]}x{hires.resize[0]}"))
    if hires.steps:
        fields.append(("Hires steps", str(hires.steps)))
    fields.append(("Hires upscaler", hires.upscaler))
    if hires.guidance_scale is not None:
        fields.append(("Hires CFG Scale", f"{hires.guidance_scale:g}"))
    return fields


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """``image`` encoded as PNG, with an optional ``parameters`` text chunk (A1111's metadata)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str | None = None) -> Path:
    """Write ``image`` as a PNG with an optional ``parameters`` text chunk, atomically."""
    target = Path(path)
    write_bytes_atomic(target, png_bytes(image, parameters))
    return target


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] -> float32 [0, 1] on the CPU; NaN/Inf pixels raise ``NumericsError``."""
    if not bool(torch.isfinite(pixels).all()):
        raise NumericsError(
            "the VAE decoder produced NaN/Inf pixels (fp16 overflow is the usual cause); re-export the "
            "vae_decoder with --precision fp32, or check the latents for NaN"
        )
    return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()
