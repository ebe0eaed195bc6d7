"""ComfyUI's inpainting nodes: VAEEncodeForInpaint and InpaintModelConditioning.

Both gray out the masked pixels before encoding them, as ComfyUI's nodes.py does: the mask is resized to the
image (bilinear), image and mask are cropped to multiples of 8 around the center, and the pixels where the rounded
mask is 1 are set to 0.5. VAEEncodeForInpaint encodes those pixels and sets a noise mask grown by ``grow_mask_by``
pixels (for regular models). InpaintModelConditioning (for inpainting models, whose UNet takes the masked image's
latents and the mask as extra channels) encodes the original pixels as the latent, and puts the grayed pixels'
latents and the mask on both conditionings (``Conditioning.concat_latent_image``/``concat_mask``), with the mask
as noise mask when ``noise_mask`` is true.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from .node import Node, NodeRun
from .types import VaeHandle


def gray_masked(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels cropped to multiples of 8 with the masked ones 0.5, the mask at that size [B, 1, H, W])."""
    height, width = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
    flat = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float()
    mask = torch.nn.functional.interpolate(flat, size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels[..., :3].float().clone()
    if pixels.shape[1] != height or pixels.shape[2] != width:
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, top : height + top, left : width + left, :]
        mask = mask[:, :, top : height + top, left : width + left]
    keep = (1.0 - mask.round()).squeeze(1)
    for channel in range(3):
        pixels[:, :, :, channel] = (pixels[:, :, :, channel] - 0.5) * keep + 0.5
    return pixels, mask


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """The rounded mask grown by ``pixels`` (ComfyUI's box filter, then clamped and rounded)."""
    if pixels == 0:
        return mask.round()
    kernel = torch.ones((1, 1, pixels, pixels))
    grown = torch.nn.functional.conv2d(mask.round(), kernel, padding=math.ceil((pixels - 1) / 2))
    return torch.clamp(grown, 0, 1)[:, :, : mask.shape[-2], : mask.shape[-1]].round()


class VAEEncodeForInpaint(Node):
    NAME = "VAEEncodeForInpaint"
    DISPLAY_NAME = "VAE Encode (for Inpainting)"
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        grow = {"default": 6, "min": 0, "max": 64, "step": 1}
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",), "grow_mask_by": ("INT", grow)}}

    def run(
        self, run: NodeRun, pixels: torch.Tensor, vae: VaeHandle, mask: torch.Tensor, grow_mask_by: int = 6
    ) -> tuple:
        gray, mask = gray_masked(pixels, mask)
        latent = run.pipeline(vae.checkpoint).encode_images(gray)
        return ({"samples": latent, "noise_mask": grow_mask(mask, grow_mask_by)},)


class InpaintModelConditioning(Node):
    NAME = "InpaintModelConditioning"
    DISPLAY_NAME = "InpaintModelConditioning"
    CATEGORY = "conditioning/inpaint"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        tip = (
            "Add a noise mask to the latent so sampling will only happen within the mask. Might improve results or "
            "completely break things depending on the model."
        )
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "vae": ("VAE",),
                "pixels": ("IMAGE",),
                "mask": ("MASK",),
                "noise_mask": ("BOOLEAN", {"default": True, "tooltip": tip}),
            }
        }

    def run(
        self, run: NodeRun, positive: list, negative: list, vae: VaeHandle, pixels: torch.Tensor, mask: torch.Tensor,
        noise_mask: bool = True,
    ) -> tuple:  # fmt: skip
        pipe = run.pipeline(vae.checkpoint)
        gray, mask = gray_masked(pixels, mask)
        concat = pipe.encode_images(gray)
        latent = {"samples": pipe.encode_images(pixels[..., :3].float())}
        if noise_mask:
            latent["noise_mask"] = mask
        conds = [
            [replace(c, concat_latent_image=concat, concat_mask=mask) for c in cond] for cond in (positive, negative)
        ]
        return conds[0], conds[1], latent


INPAINT_NODES = (VAEEncodeForInpaint, InpaintModelConditioning)
