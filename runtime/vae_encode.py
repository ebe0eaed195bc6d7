"""The VAE encoder's stage: init images (and an inpainting model's masked image) -> scaled latents.

Each image's latent sample is drawn from that image's generator, in the order diffusers draws it, so a seed gives
diffusers' image for img2img and inpainting too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdtrt.runtime.engine import Engine, input_dtype
from sdtrt.runtime.images import from_pil
from sdtrt.runtime.inpaint import MaskPlan
from sdtrt.runtime.request import Request
from sdtrt.runtime.timing import StageClock


def encode_image(
    engine: Engine,
    pixels: torch.Tensor,
    generators: list[torch.Generator],
    scaling: float,
    device: torch.device,
    draw_noise: bool = True,
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Pixels [1, 3, H, W] in [-1, 1] -> ((clean scaled latents, noise) [B, C, h, w], encoder seconds): per image,
    the latent sample, then the noise, from its generator (``draw_noise`` False: no noise, an empty tensor)."""
    clock = StageClock(device)
    batch = pixels.repeat(len(generators), 1, 1, 1)
    e0 = clock.mark()
    out = engine.infer({"image": batch.to(device, input_dtype(engine, "image"))})
    mean, std = out["latent_mean"].float().cpu(), out["latent_std"].float().cpu()
    e1 = clock.mark()
    sample = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
    clean = (mean + std * sample) * scaling
    if not draw_noise:
        return (clean, torch.empty(0)), clock.seconds(e0, e1)
    noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
    return (clean, noise), clock.seconds(e0, e1)


def mask_condition(
    engine: Engine,
    plan: MaskPlan,
    kind: str | None,
    req: Request,
    generators: list[torch.Generator],
    scaling: float,
    device: torch.device,
) -> torch.Tensor | None:
    """An inpainting UNet's extra input [B, 1 + C, h, w]: the mask at the latent size (nearest, as diffusers) and
    the latents of the image with the masked region blanked (diffusers' ``image * (mask < 0.5)``), drawing their
    sample from each generator. For a regular UNet (``kind`` "blend") the same draw is made and dropped, so the
    sampler's noise comes out of each generator as diffusers draws it; None is returned."""
    shape = req.shape
    if kind != "condition":
        for g in generators:
            torch.randn((1, *shape[1:]), generator=g)
        return None
    masked = from_pil(plan.image, req.height, req.width) * (1.0 - plan.binary)
    (latents, _), _ = encode_image(engine, masked, generators, scaling, device, draw_noise=False)
    mask = torch.nn.functional.interpolate(plan.binary, size=shape[2:]).expand(shape[0], -1, -1, -1)
    return torch.cat([mask, latents], dim=1)


def inpaint_condition(
    engines: Mapping[str, Engine],
    inpainting: bool,
    plan: MaskPlan | None,
    req: Request,
    generators: list[torch.Generator],
    scaling: float,
    device: torch.device,
) -> tuple[str | None, torch.Tensor | None]:
    """(the kind of inpainting a call runs, an inpainting UNet's condition): with a mask ``plan``, "condition" for
    an inpainting model (``inpainting``) and "blend" for another (``mask_condition``); without one, an inpainting
    model still needs its extra channels: "condition" with the full mask and the latents of a blank (0) image, as
    A1111 conditions txt2img and unmasked img2img on such a model (the VAE's mean: no draw, so the generators give
    the same noise as for any model); None for a plain call."""
    if plan is not None:
        kind = "condition" if inpainting else "blend"
        return kind, mask_condition(engines["vae_encoder"], plan, kind, req, generators, scaling, device)
    if not inpainting:
        return None, None
    batch, _, h, w = req.shape
    engine = engines["vae_encoder"]
    blank = torch.zeros((1, 3, req.height, req.width), device=device, dtype=input_dtype(engine, "image"))
    latents = engine.infer({"image": blank})["latent_mean"].float().cpu() * scaling
    mask = torch.ones((1, 1, h, w))
    return "condition", torch.cat([mask, latents], dim=1).expand(batch, -1, -1, -1)


__all__ = ["encode_image", "inpaint_condition", "mask_condition"]
