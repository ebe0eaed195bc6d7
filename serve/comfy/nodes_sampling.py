"""ComfyUI's samplers, KSampler and KSamplerAdvanced, on the runtime's ComfyUI sampling stages.

``sampler_name`` and ``scheduler`` list only what the runtime runs (``runtime.sampling.SIGMA_SAMPLERS`` and
``SIGMA_SCHEDULES``). KSampler takes ``Pipeline.ksampler_sigmas(scheduler, steps, denoise)``; KSamplerAdvanced
slices the full schedule with ``runtime.sampling.advanced_sigmas`` (start_at_step, end_at_step, leftover noise)
and adds no noise with ``add_noise`` "disable". An empty schedule (denoise 0, a start past the end) returns the
latent unchanged, as ComfyUI does.
Progress goes out after each step as (step, steps) like ComfyUI's progress bar, with a latent preview when the
prompt asked for previews (ComfyUI's "latent2rgb" method with its SD1.x factors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..loras import use_loras
from .node import SEED_MAX, Node, NodeInterrupted, NodeRun
from .types import ModelHandle

# ComfyUI's latent_formats.SD15.latent_rgb_factors: latent channel -> RGB, for a quick preview of the latents
LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)


def sampler_lists() -> tuple[list[str], list[str]]:
    """The sampler_name and scheduler values the runtime runs here (a sampler whose optional module is not
    installed is left out, so a graph naming it is refused as value_not_in_list)."""
    from sdtrt.runtime.sampling import SIGMA_SCHEDULES
    from sdtrt.runtime.schedulers.ksampling import available_samplers

    return list(available_samplers()), list(SIGMA_SCHEDULES)


def latent_preview(latents: torch.Tensor, scale: float) -> Image.Image:
    """The first of a batch of unscaled latents as a small RGB image (latent2rgb, on the UNet's scaled latents)."""
    x = latents[0].float().cpu() * scale
    rgb = x[: LATENT_RGB.shape[0]].permute(1, 2, 0) @ LATENT_RGB
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def one_conditioning(conditioning: list, name: str) -> Any:
    """The one Conditioning of a CONDITIONING list; ValueError for several (ComfyUI's ConditioningCombine)."""
    if len(conditioning) != 1:
        raise ValueError(f"{name} holds {len(conditioning)} conditionings; sdtrt samples with exactly one")
    return conditioning[0]


def sample(
    run: NodeRun,
    model: ModelHandle,
    latent: dict,
    positive: list,
    negative: list,
    sigmas: Any,
    *,
    steps: int,
    seed: int,
    cfg: float,
    sampler_name: str,
    add_noise: bool = True,
) -> tuple:
    """Denoise ``latent`` over ``sigmas`` with ``model``'s pipeline; the LATENT output."""
    from sdtrt.runtime.sampling import Interrupted

    pipe = run.pipeline(model.checkpoint)
    use_loras(pipe, model.loras)
    scale = pipe.manifest.model.scaling_factor

    def callback(step: int, total: int, latents: torch.Tensor) -> None:
        # ComfyUI's progress counts against the node's steps (KSamplerAdvanced's slice starts part way)
        run.progress(step + 1, steps, latent_preview(latents, scale) if run.previews else None)

    try:
        samples = pipe.sample_latents(
            latent["samples"],
            one_conditioning(positive, "positive"),
            one_conditioning(negative, "negative"),
            sampler=sampler_name,
            sigmas=sigmas,
            cfg=cfg,
            seed=seed,
            add_noise=add_noise,
            noise_mask=latent.get("noise_mask"),
            callback=callback,
            cancel=run.cancel,
            cache_interval=model.cache_interval,
            cache_schedule=model.cache_schedule,
        )
    except Interrupted as exc:
        raise NodeInterrupted(str(exc)) from exc
    out = dict(latent)
    out["samples"] = samples
    return (out,)


class KSampler(Node):
    NAME = "KSampler"
    DISPLAY_NAME = "KSampler"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        samplers, schedules = sampler_lists()
        cfg_tip = (
            "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values result "
            "in images more closely matching the prompt however too high values will negatively impact quality."
        )
        denoise_tip = (
            "The amount of denoising applied, lower values will maintain the structure of the initial image allowing "
            "for image to image sampling."
        )
        sampler_tip = (
            "The algorithm used when sampling, this can affect the quality, speed, and style of the generated output."
        )
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": SEED_MAX,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "The number of steps used in the denoising process.",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": cfg_tip},
                ),
                "sampler_name": (samplers, {"tooltip": sampler_tip}),
                "scheduler": (
                    schedules,
                    {"tooltip": "The scheduler controls how noise is gradually removed to form the image."},
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The conditioning describing the attributes you want to include in the image."},
                ),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "The conditioning describing the attributes you want to exclude from the image."},
                ),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": denoise_tip}),
            }
        }

    def run(
        self, run: NodeRun, model: ModelHandle, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
        positive: list, negative: list, latent_image: dict, denoise: float = 1.0,
    ) -> tuple:  # fmt: skip
        sigmas = run.pipeline(model.checkpoint).ksampler_sigmas(scheduler, steps, denoise)
        return sample(
            run, model, latent_image, positive, negative, sigmas, steps=steps, seed=seed, cfg=cfg,
            sampler_name=sampler_name,
        )  # fmt: skip


class KSamplerAdvanced(Node):
    NAME = "KSamplerAdvanced"
    DISPLAY_NAME = "KSampler (Advanced)"
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        samplers, schedules = sampler_lists()
        return {
            "required": {
                "model": ("MODEL",),
                "add_noise": (["enable", "disable"], {"advanced": True}),
                "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (samplers,),
                "scheduler": (schedules,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000, "advanced": True}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000, "advanced": True}),
                "return_with_leftover_noise": (["disable", "enable"], {"advanced": True}),
            }
        }

    def run(
        self, run: NodeRun, model: ModelHandle, add_noise: str, noise_seed: int, steps: int, cfg: float,
        sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict, start_at_step: int,
        end_at_step: int, return_with_leftover_noise: str,
    ) -> tuple:  # fmt: skip
        from sdtrt.runtime.sampling import advanced_sigmas

        full = run.pipeline(model.checkpoint).ksampler_sigmas(scheduler, steps, 1.0)
        sigmas = advanced_sigmas(full, start_at_step, end_at_step, return_with_leftover_noise != "enable")
        return sample(
            run, model, latent_image, positive, negative, sigmas, steps=steps, seed=noise_seed, cfg=cfg,
            sampler_name=sampler_name, add_noise=add_noise == "enable",
        )  # fmt: skip


SAMPLING_NODES = (KSampler, KSamplerAdvanced)
