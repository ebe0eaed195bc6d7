"""A loaded model: the PyTorch modules of one Stable Diffusion checkpoint plus what describes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.specs import ModelInfo

SUPPORTED_FAMILIES = ("sd1", "sd2")


@dataclass
class ModelBundle:
    """PyTorch modules (fp32, eval mode, on the CPU) and the facts export needs about them."""

    text_encoder: Any  # transformers.CLIPTextModel
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    tokenizer: Any  # tokenizers.Tokenizer
    scheduler_config: dict[str, Any]
    model: ModelInfo
    source: dict[str, Any] = field(default_factory=dict)

    def module(self, component: str) -> Any:
        if component == "text_encoder":
            return self.text_encoder
        if component == "unet":
            return self.unet
        if component in ("vae_decoder", "vae_encoder"):
            return self.vae
        raise KeyError(component)

    def release(self, still_needed: tuple[str, ...] | list[str]) -> None:
        """Drop the modules no component in ``still_needed`` uses, so their memory can be freed."""
        import gc

        keep = {"vae" if c.startswith("vae") else c for c in still_needed}
        for attr in ("text_encoder", "unet", "vae"):
            if attr not in keep:
                setattr(self, attr, None)
        gc.collect()


def model_info(text_encoder: Any, unet: Any, vae: Any, scheduler_config: dict[str, Any]) -> ModelInfo:
    """Derive the family numbers from the modules' configs; refuse families export cannot handle yet."""
    ucfg, vcfg, tcfg = unet.config, vae.config, text_encoder.config
    if getattr(ucfg, "addition_embed_type", None) == "text_time":
        raise SourceError(
            "this looks like an SDXL model (UNet with text_time conditioning); sdtrt exports SD 1.x and 2.x "
            "for now. Use an SD 1.x/2.x checkpoint"
        )
    cross = ucfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    if cross != tcfg.hidden_size:
        raise SourceError(
            f"UNet cross-attention width {cross} does not match the text encoder width {tcfg.hidden_size}; "
            "the components come from different models"
        )
    family = "sd2" if tcfg.hidden_size == 1024 else "sd1"
    prediction = scheduler_config.get("prediction_type", "epsilon")
    return ModelInfo(
        family=family,
        latent_channels=int(ucfg.in_channels),
        vae_scale_factor=2 ** (len(vcfg.block_out_channels) - 1),
        scaling_factor=float(vcfg.scaling_factor),
        prediction_type=prediction,
        text_width=int(tcfg.hidden_size),
        pooled_width=int(tcfg.hidden_size),
        unet_downsamples=len(ucfg.block_out_channels) - 1,
    )
