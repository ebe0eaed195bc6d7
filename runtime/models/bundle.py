"""A loaded model: the PyTorch modules of one Stable Diffusion checkpoint plus what describes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.specs import ModelInfo, residual_layout

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")
MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")


@dataclass
class ModelBundle:
    """PyTorch modules (fp32, eval mode, on the CPU) and the facts export needs about them.

    SDXL models also have ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) and ``tokenizer_2``.
    ``size_range`` is (smallest, largest) image side the model draws well, when known (a model trained at one
    size only); the default export profile stays inside it.
    """

    text_encoder: Any  # transformers.CLIPTextModel
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    tokenizer: Any  # tokenizers.Tokenizer
    scheduler_config: dict[str, Any]
    model: ModelInfo
    source: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    size_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.size_range is not None:
            low, high = self.size_range
            if not 0 < low <= high:
                raise SourceError(f"size range {self.size_range} must be (smallest, largest) sides > 0")

    def module(self, component: str) -> Any:
        if component in ("text_encoder", "text_encoder_2", "unet", "unet_shallow"):
            module = getattr(self, "unet" if component == "unet_shallow" else component)
            if module is None:
                raise KeyError(component)
            return module
        if component in ("vae_decoder", "vae_encoder"):
            return self.vae
        raise KeyError(component)

    def modules(self) -> list[Any]:
        return [m for m in (getattr(self, name) for name in MODULES) if m is not None]

    def release(self, still_needed: tuple[str, ...] | list[str]) -> None:
        """Drop the modules no component in ``still_needed`` uses, so their memory can be freed."""
        import gc

        keep = {"vae" if c.startswith("vae") else "unet" if c == "unet_shallow" else c for c in still_needed}
        for attr in MODULES:
            if attr not in keep:
                setattr(self, attr, None)
        gc.collect()


def bundle_from_modules(
    text_encoder: Any,
    unet: Any,
    vae: Any,
    scheduler_config: dict[str, Any],
    source: dict[str, Any],
    *,
    text_encoder_2: Any = None,
    pipeline_config: dict[str, Any] | None = None,
    tokenizers: tuple[Any, Any] | None = None,
    size_range: tuple[int, int] | None = None,
) -> ModelBundle:
    """A bundle over loaded modules, with the facts ``model_info`` derives from their configs.

    ``tokenizers`` is (tokenizer, tokenizer_2) as the model ships them; by default sdtrt's CLIP tokenizer, and
    for SDXL a second one that pads with ``!`` as OpenCLIP does.
    """
    if tokenizers is None:
        from sdtrt.runtime.models.tokenizer import clip_tokenizer

        xl = text_encoder_2 is not None
        tokenizers = (clip_tokenizer(), clip_tokenizer(pad_token="!") if xl else None)
    return ModelBundle(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=unet,
        vae=vae,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler_config=scheduler_config,
        model=model_info(
            text_encoder, unet, vae, scheduler_config, text_encoder_2=text_encoder_2, pipeline_config=pipeline_config
        ),
        source=source,
        size_range=size_range,
    )


def model_info(
    text_encoder: Any,
    unet: Any,
    vae: Any,
    scheduler_config: dict[str, Any],
    text_encoder_2: Any = None,
    pipeline_config: dict[str, Any] | None = None,
) -> ModelInfo:
    """Derive the family numbers from the modules' configs; refuse combinations that cannot work together.

    ``pipeline_config`` is the model's ``model_index.json`` (SDXL keeps ``force_zeros_for_empty_prompt`` there).
    """
    ucfg, vcfg, tcfg = unet.config, vae.config, text_encoder.config
    cross = ucfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    vae_factor = 2 ** (len(vcfg.block_out_channels) - 1)
    sample = ucfg.sample_size
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    common: dict[str, Any] = {
        **_channels(ucfg, vcfg),
        "vae_scale_factor": vae_factor,
        "scaling_factor": float(vcfg.scaling_factor),
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "text_width": int(tcfg.hidden_size),
        "pooled_width": int(tcfg.hidden_size),
        "unet_downsamples": len(ucfg.block_out_channels) - 1,
        "native_size": int(sample or 0) * vae_factor,
        "control_residuals": residual_layout(ucfg.block_out_channels, ucfg.layers_per_block),
    }
    if getattr(ucfg, "addition_embed_type", None) == "text_time":
        return _sdxl_info(ucfg, vcfg, tcfg, text_encoder_2, int(cross), common, pipeline_config or {})
    if text_encoder_2 is not None:
        raise SourceError(
            "the model has a second text encoder but its UNet takes no pooled text embeddings "
            "(addition_embed_type is not 'text_time'); the components come from different models"
        )
    if cross != tcfg.hidden_size:
        raise SourceError(
            f"UNet cross-attention width {cross} does not match the text encoder width {tcfg.hidden_size}; "
            "the components come from different models"
        )
    family = "sd2" if tcfg.hidden_size == 1024 else "sd1"
    return ModelInfo(family=family, text_layers=int(tcfg.num_hidden_layers), **common)


def _channels(ucfg: Any, vcfg: Any) -> dict[str, int]:
    """The latent channels (the VAE's) and the UNet's input channels, refused unless they fit together."""
    latent = int(getattr(vcfg, "latent_channels", 4))
    unet_in, unet_out = int(ucfg.in_channels), int(ucfg.out_channels)
    if unet_in not in (latent, 2 * latent + 1) or unet_out != latent:
        raise SourceError(
            f"the UNet takes {unet_in} channels and gives {unet_out}, but the VAE's latents have {latent}: "
            f"expected {latent} in (a regular model) or {2 * latent + 1} (an inpainting model: latents, mask, "
            f"masked-image latents) and {latent} out; the UNet and the VAE come from different models"
        )
    return {"latent_channels": latent, "unet_in_channels": unet_in}


def _sdxl_info(
    ucfg: Any, vcfg: Any, tcfg: Any, text_encoder_2: Any, cross: int, common: dict[str, Any], index: dict[str, Any]
) -> ModelInfo:
    if text_encoder_2 is None:
        raise SourceError(
            "this is an SDXL UNet (text_time conditioning) but the model has no second text encoder "
            "(text_encoder_2); SDXL refiner-style models with one encoder are not supported. Give an SDXL base "
            "or Turbo model"
        )
    t2 = text_encoder_2.config
    if cross != tcfg.hidden_size + t2.hidden_size:
        raise SourceError(
            f"UNet cross-attention width {cross} is not the two text encoders' widths together "
            f"({tcfg.hidden_size} + {t2.hidden_size}); the components come from different models"
        )
    pooled = int(t2.projection_dim)
    time_dim = int(ucfg.addition_time_embed_dim)
    expected = pooled + 6 * time_dim
    if int(ucfg.projection_class_embeddings_input_dim) != expected:
        raise SourceError(
            f"the UNet's added-conditioning width is {ucfg.projection_class_embeddings_input_dim}, but the "
            f"pooled text embedding ({pooled}) and 6 time ids x {time_dim} make {expected}; the components come "
            "from different models"
        )
    return ModelInfo(
        family="sdxl",
        text_width_2=int(t2.hidden_size),
        add_text_embeds_width=pooled,
        add_time_ids=6,
        upcast_vae=bool(getattr(vcfg, "force_upcast", True)),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        **common,
    )
