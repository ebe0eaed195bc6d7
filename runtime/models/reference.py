"""diffusers' own pipeline over a bundle's modules: the reference every sdtrt path is compared with.

Used by the benchmarks (the PyTorch baseline), by the shapes quality figures and by the fidelity tests.
"""

from __future__ import annotations

from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.schedulers import DIFFUSERS_SCHEDULERS


def diffusers_pipeline(bundle: Any, scheduler: str) -> Any:
    """diffusers' own pipeline over the bundle's modules, with the same sampler and CLIP tokenizers.

    ``StableDiffusionXLPipeline`` for SDXL (with the model's ``force_zeros_for_empty_prompt``), else
    ``StableDiffusionPipeline``.
    """
    diffusers = require("diffusers", "the diffusers reference pipeline", "export")
    cls_name, kwargs = DIFFUSERS_SCHEDULERS[scheduler]
    sampler = getattr(diffusers, cls_name).from_config(bundle.scheduler_config, **kwargs)
    if bundle.model.family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoder,
            text_encoder_2=bundle.text_encoder_2,
            tokenizer=clip_tokenizer_hf(),
            tokenizer_2=clip_tokenizer_hf(pad_token="!"),
            unet=bundle.unet,
            scheduler=sampler,
            force_zeros_for_empty_prompt=bundle.model.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoder,
            tokenizer=clip_tokenizer_hf(),
            unet=bundle.unet,
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_tokenizer_hf(pad_token: str = "<|endoftext|>") -> Any:
    """transformers' CLIPTokenizer on sdtrt's shipped vocabulary (the reference the runtime's ids must equal)."""
    transformers = require("transformers", "the diffusers reference pipeline", "export")
    from sdtrt.runtime.models.tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    return transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)


def controlnet_pipeline(bundle: Any, scheduler: str, controlnet: Any, img2img: bool = False) -> Any:
    """diffusers' ControlNet pipeline over the bundle's modules: ``controlnet`` is one ``ControlNetModel`` or a
    list (a ``MultiControlNetModel``). SDXL: ``StableDiffusionXLControlNet[Img2Img]Pipeline``; else
    ``StableDiffusionControlNet[Img2Img]Pipeline``."""
    diffusers = require("diffusers", "the diffusers reference pipeline", "export")
    base = diffusers_pipeline(bundle, scheduler)
    xl = bundle.model.family == "sdxl"
    name = ("StableDiffusionXLControlNet" if xl else "StableDiffusionControlNet") + ("Img2Img" if img2img else "")
    if isinstance(controlnet, list | tuple):
        controlnet = diffusers.MultiControlNetModel(list(controlnet))
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    if not xl:
        components.pop("watermark", None)
    pipe = getattr(diffusers, f"{name}Pipeline")(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_pipeline(bundle: Any, scheduler: str) -> Any:
    """diffusers' inpainting pipeline over the bundle's modules: ``StableDiffusionXLInpaintPipeline`` for SDXL,
    else ``StableDiffusionInpaintPipeline``. With a 9-channel UNet it feeds the mask and the masked image's
    latents; with a 4-channel one it puts the unmasked region back to the original noised to each step's level."""
    diffusers = require("diffusers", "the diffusers reference pipeline", "export")
    base = diffusers_pipeline(bundle, scheduler)
    xl = bundle.model.family == "sdxl"
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder",)}
    if xl:
        components.pop("watermark", None)
        # no aesthetic score conditioning: the UNet takes the base model's six time ids
        extra = {
            "requires_aesthetics_score": False,
            "force_zeros_for_empty_prompt": bundle.model.force_zeros_for_empty_prompt,
        }
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**components, **extra, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
