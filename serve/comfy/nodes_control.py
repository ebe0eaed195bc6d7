"""ControlNet nodes (ControlNetLoader, ControlNetApplyAdvanced) and sdtrt's step caching node (SdtrtStepCache).

sdtrt's ControlNets belong to the exported artifact (``sdtrt export --controlnet``), so ``control_net_name`` lists
the ControlNets of the served models, and sampling refuses one the sampled model does not have.
ControlNetApplyAdvanced adds one ``runtime.control.comfy.ControlApply`` (hint IMAGE, strength, start/end percent)
to both conditionings, the same application on each, as ComfyUI sets its ControlNet on both; strength 0 returns
them unchanged, as ComfyUI does. Its optional ``vae`` is accepted and, as in ComfyUI for SD1.x/SDXL ControlNets
(whose hints are pixels), not used.

``SdtrtStepCache`` (category "sdtrt") makes a MODEL sample with step caching: the full UNet on one step in
``cache_interval`` (spread by ``cache_schedule``, uniform or quadratic) and the shallow UNet in between
(``sdtrt generate --cache-interval --cache-schedule``); 1 runs every step in full. A graph without it samples
every step in full whatever the server's ``--cache-interval``, so its image is ComfyUI's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .node import Node, NodeRun
from .types import ModelHandle


@dataclass(frozen=True)
class ControlNetHandle:
    """ComfyUI's CONTROL_NET: a ControlNet of the served artifacts, by name."""

    name: str


def controlnet_names(library: Any) -> list[str]:
    """The ControlNets of the served models (each artifact's own), sorted."""
    return sorted({name for checkpoint in library.checkpoints.items for name in checkpoint.controlnets})


class ControlNetLoader(Node):
    NAME = "ControlNetLoader"
    DISPLAY_NAME = "Load ControlNet Model"
    CATEGORY = "loaders"
    RETURN_TYPES = ("CONTROL_NET",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        return {"required": {"control_net_name": (controlnet_names(library),)}}

    def run(self, run: NodeRun, control_net_name: str) -> tuple:
        return (ControlNetHandle(control_net_name),)


class ControlNetApplyAdvanced(Node):
    NAME = "ControlNetApplyAdvanced"
    DISPLAY_NAME = "Apply ControlNet"
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        percent = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, **percent}),
                "end_percent": ("FLOAT", {"default": 1.0, **percent}),
            },
            "optional": {"vae": ("VAE",)},
        }

    def run(
        self, run: NodeRun, positive: list, negative: list, control_net: ControlNetHandle, image: torch.Tensor,
        strength: float, start_percent: float, end_percent: float, vae: Any = None,
    ) -> tuple:  # fmt: skip
        from sdtrt.runtime.control.comfy import ControlApply

        if strength == 0:
            return positive, negative
        apply = ControlApply(control_net.name, image, strength, start_percent, end_percent)
        return tuple([replace(c, controls=(*c.controls, apply)) for c in cond] for cond in (positive, negative))


class SdtrtStepCache(Node):
    NAME = "SdtrtStepCache"
    DISPLAY_NAME = "Step Cache (sdtrt)"
    CATEGORY = "sdtrt"
    DESCRIPTION = (
        "Samples with step caching: the full UNet on one step in cache_interval, only its outer layers (the "
        "shallow UNet) in between. Faster, slightly different images; 1 runs every step in full."
    )
    RETURN_TYPES = ("MODEL",)
    PYTHON_MODULE = "custom_nodes.sdtrt"

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        from sdtrt.runtime.cache_plan import CACHE_SCHEDULES

        tip = "Run the full UNet on one step in this many (1: every step)."
        schedule_tip = "Which steps run the full UNet: uniform (every N) or quadratic (denser early, DeepCache's)."
        return {
            "required": {
                "model": ("MODEL",),
                "cache_interval": ("INT", {"default": 2, "min": 1, "max": 100, "tooltip": tip}),
                "cache_schedule": (list(CACHE_SCHEDULES), {"tooltip": schedule_tip}),
            }
        }

    def run(self, run: NodeRun, model: ModelHandle, cache_interval: int, cache_schedule: str = "uniform") -> tuple:
        return (replace(model, cache_interval=cache_interval, cache_schedule=cache_schedule),)


CONTROL_NODES = (ControlNetLoader, ControlNetApplyAdvanced, SdtrtStepCache)
