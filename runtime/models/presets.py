"""Built-in models: ``shapes`` (trained, for the demo and quality figures), and four with seeded random weights:
``tiny`` and ``tiny-xl`` for tests, ``sd15-random`` and ``sdxl-random`` for benchmarks.

``shapes`` is a small SD 1.x model trained by sdtrt on drawn images of coloured shapes (see ``shapes.py``): it
draws what its prompt asks for ("a red circle on a blue background"), so quality can be measured on images.

``tiny`` has the SD 1.x layout (CLIP text encoder, cross-attention UNet, 8x VAE) with a few channels per layer,
so it exports and runs in seconds on a CPU. ``sd15-random`` is the real SD 1.5 architecture (859.5 M UNet
parameters) from the configs shipped in ``sdtrt/runtime/models/configs/sd15``; its weights are random, so its images are
noise, but its cost is that of SD 1.5. ``tiny-xl`` and ``sdxl-random`` are the same for SDXL: two text encoders,
pooled text embeddings and time ids; ``sdxl-random`` is SDXL base 1.0's architecture (2.57 B UNet parameters,
cross-attention 2048) from ``configs/sdxl``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError

from .bundle import ModelBundle, model_info

CONFIG_DIR = Path(__file__).parent / "configs"
PRESET_SEED = 0

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The tiny model is meant for images from 64x64 to 256x256.
TINY_SIZES = (64, 128, 256)

# tiny-xl: SDXL's layout (no attention at the top level, deeper transformers below, text_time conditioning,
# two text encoders whose widths add up to the cross-attention width) with a few channels per layer.
TINY_XL_TIME_DIM = 8
TINY_XL_TEXT_2: dict[str, Any] = {
    **TINY_TEXT,
    "hidden_size": 32,
    "intermediate_size": 48,
    "hidden_act": "gelu",
    "projection_dim": 24,
    "pad_token_id": 0,
}
TINY_XL_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": TINY_TEXT["hidden_size"] + TINY_XL_TEXT_2["hidden_size"],
    "attention_head_dim": [2, 4],
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_XL_TIME_DIM,
    "projection_class_embeddings_input_dim": TINY_XL_TEXT_2["projection_dim"] + 6 * TINY_XL_TIME_DIM,
}
TINY_XL_VAE: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_INDEX = {"force_zeros_for_empty_prompt": True}


def _read(name: str) -> dict[str, Any]:
    data = json.loads((CONFIG_DIR / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def preset_text_encoder_2(name: str) -> dict[str, Any] | None:
    """The second text encoder's config of an SDXL preset; None for the others."""
    if name == "tiny-xl":
        return TINY_XL_TEXT_2
    if name == "sdxl-random":
        return _read("sdxl/text_encoder_2/config.json")
    return None


def preset_configs(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(text encoder, unet, vae, scheduler) configs of a preset."""
    scheduler = json.loads((CONFIG_DIR / "sd15" / "scheduler" / "scheduler_config.json").read_text())
    xl_scheduler = json.loads((CONFIG_DIR / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    if name == "tiny-xl":
        return TINY_TEXT, TINY_XL_UNET, TINY_XL_VAE, xl_scheduler
    if name == "sdxl-random":
        return (
            _read("sdxl/text_encoder/config.json"),
            _read("sdxl/unet/config.json"),
            _read("sdxl/vae/config.json"),
            xl_scheduler,
        )
    if name == "tiny":
        return TINY_TEXT, TINY_UNET, TINY_VAE, scheduler
    if name == "shapes":
        from .shapes import read_record

        record = read_record()
        return record["text_encoder"], record["unet"], record["vae"], record["scheduler"]
    if name == "sd15-random":
        return (
            _read("sd15/text_encoder/config.json"),
            _read("sd15/unet/config.json"),
            _read("sd15/vae/config.json"),
            scheduler,
        )
    raise SourceError(f"unknown preset {name!r}; the built-in presets are {', '.join(PRESETS)}")


PRESETS = ("tiny", "tiny-xl", "shapes", "sd15-random", "sdxl-random")


def load_preset(name: str, seed: int = PRESET_SEED) -> ModelBundle:
    """Build a preset model with weights drawn from ``seed`` (same seed, same weights, on every machine).

    A trained preset (``shapes``) has one set of weights; ``seed`` does not apply to it.
    """
    if name == "shapes":
        from .shapes import load_shapes

        return load_shapes()
    text_cfg, unet_cfg, vae_cfg, sched_cfg = preset_configs(name)
    text_2_cfg = preset_text_encoder_2(name)
    torch = require("torch", "building preset models", "export")
    diffusers = require("diffusers", "building preset models", "export")
    transformers = require("transformers", "building preset models", "export")
    from .tokenizer import clip_tokenizer

    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg)
        text_encoder_2 = None
        if text_2_cfg is not None:
            config = transformers.CLIPTextConfig(**text_2_cfg)
            text_encoder_2 = transformers.CLIPTextModelWithProjection(config)
    for module in (text_encoder, text_encoder_2, unet, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    configs = [name, seed, text_cfg, unet_cfg, vae_cfg] + ([text_2_cfg] if text_2_cfg else [])
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()
    xl = text_encoder_2 is not None
    return ModelBundle(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=unet,
        vae=vae,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!") if xl else None,
        scheduler_config=sched_cfg,
        model=model_info(
            text_encoder,
            unet,
            vae,
            sched_cfg,
            text_encoder_2=text_encoder_2,
            pipeline_config=SDXL_INDEX if xl else None,
        ),
        source={
            "kind": "preset",
            "name": name,
            "seed": seed,
            "sha256": digest,
            "description": f"preset {name} (seeded random weights, seed {seed})",
        },
    )
