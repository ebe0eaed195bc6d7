"""ComfyUI's latent nodes that need no model: EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask.

Declared and computed as ComfyUI's nodes.py does (same inputs, defaults, ranges; latents [B, 4, H/8, W/8] of
zeros; ``common_upscale``'s center crop and ``torch.nn.functional.interpolate``). The upscale methods are those
ComfyUI computes with ``interpolate``; its "bislerp" (a slerp resampler of its own) is not offered.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtrt.runtime.comfy_tensors import common_upscale as center_upscale

from .node import MAX_RESOLUTION, Node, NodeRun

# ComfyUI's LatentUpscale.upscale_methods without "bislerp"
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]
CROP_METHODS = ["disabled", "center"]


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """ComfyUI's comfy.utils.common_upscale for 4-D tensors and the interpolate methods: an optional center crop to
    the new aspect ratio, then ``interpolate`` to (height, width)."""
    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale method {method!r} is not one of {', '.join(UPSCALE_METHODS)}")
    if crop == "center":
        return center_upscale(samples, height, width, method)
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


class EmptyLatentImage(Node):
    NAME = "EmptyLatentImage"
    DISPLAY_NAME = "Empty Latent Image"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        size = {"min": 16, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "width": ("INT", {"default": 512, **size, "tooltip": "The width of the latent images in pixels."}),
                "height": ("INT", {"default": 512, **size, "tooltip": "The height of the latent images in pixels."}),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 4096, "tooltip": "The number of latent images in the batch."},
                ),
            }
        }

    def run(self, run: NodeRun, width: int, height: int, batch_size: int = 1) -> tuple:
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8], dtype=torch.float32)},)


class LatentUpscale(Node):
    NAME = "LatentUpscale"
    DISPLAY_NAME = "Upscale Latent"
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        size = {"min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "samples": ("LATENT",),
                "upscale_method": (list(UPSCALE_METHODS),),
                "width": ("INT", {"default": 512, **size}),
                "height": ("INT", {"default": 512, **size}),
                "crop": (list(CROP_METHODS),),
            }
        }

    def run(self, run: NodeRun, samples: dict, upscale_method: str, width: int, height: int, crop: str) -> tuple:
        if width == 0 and height == 0:
            return (samples,)
        latent = samples["samples"]
        if width == 0:  # keep the aspect ratio, as ComfyUI
            height = max(64, height)
            width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = common_upscale(latent, width // 8, height // 8, upscale_method, crop)
        return (out,)


class LatentUpscaleBy(Node):
    NAME = "LatentUpscaleBy"
    DISPLAY_NAME = "Upscale Latent By"
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "samples": ("LATENT",),
                "upscale_method": (list(UPSCALE_METHODS),),
                "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
            }
        }

    def run(self, run: NodeRun, samples: dict, upscale_method: str, scale_by: float) -> tuple:
        latent = samples["samples"]
        width, height = round(latent.shape[-1] * scale_by), round(latent.shape[-2] * scale_by)
        out = dict(samples)
        out["samples"] = common_upscale(latent, width, height, upscale_method, "disabled")
        return (out,)


class SetLatentNoiseMask(Node):
    NAME = "SetLatentNoiseMask"
    DISPLAY_NAME = "Set Latent Noise Mask"
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def run(self, run: NodeRun, samples: dict, mask: torch.Tensor) -> tuple:
        out = dict(samples)
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


LATENT_NODES = (EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask)
