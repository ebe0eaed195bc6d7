"""The ``shapes`` architecture: SD 1.x components (CLIP text encoder, cross-attention UNet, 8x AutoencoderKL),
small enough to train on a 2-core CPU in under an hour. The trained weights ship with sdtrt; this module only
describes the shapes of the networks and is shared by the trainer and the preset loader.
"""

from __future__ import annotations

from typing import Any

from sdtrt.runtime.models.presets import TINY_VAE

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# No attention at the 16x16 level: cross-attention at 8x8, 4x4 and the mid block costs a third of the
# step time of attention everywhere and is enough for one shape per image.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 16,
    "norm_num_groups": 16,
}
# The tiny presets' 8x VAE layout, wider, and fully convolutional (no mid-block attention), so training on 64x64
# crops carries over to 128x128 images.
VAE_CONFIG: dict[str, Any] = {
    **TINY_VAE,
    "block_out_channels": [16, 32, 64, 64],
    "mid_block_add_attention": False,
    "scaling_factor": 1.0,  # replaced by 1 / std of the training latents once the VAE is trained
}
# SD 1.x's noise schedule; trailing spacing starts few-step sampling from pure noise (t = 999).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,  # unused by trailing spacing; 1 is what diffusers expects of SD configs
    "clip_sample": False,
    "set_alpha_to_one": False,
}
IMAGE_SIZE = 128


def build_modules(text_config: dict[str, Any], unet_config: dict[str, Any], vae_config: dict[str, Any]) -> tuple:
    """(CLIPTextModel, UNet2DConditionModel, AutoencoderKL) with fresh weights from the current torch seed."""
    import diffusers
    import transformers

    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    unet = diffusers.UNet2DConditionModel(**unet_config)
    vae = diffusers.AutoencoderKL(**vae_config)
    return text_encoder, unet, vae
