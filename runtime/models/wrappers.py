"""Thin ``nn.Module`` wrappers that give each network the plain tensor interface of its ComponentSpec."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdtrt.runtime.specs import ModelInfo


class TextEncoder(nn.Module):
    """(input_ids[, clip_skip]) -> (last_hidden_state, pooled_output): SD 1.x/2.x.

    With ``clip_skip`` (int32 [1], N >= 1) the per-token output is ``hidden_states[-N]`` through the final layer
    norm (A1111's "CLIP_stop_at_last_layers" N, diffusers' ``clip_skip`` N - 1): N = 1 is ``last_hidden_state``.
    Every layer runs anyway, so the choice is a gather over the stacked hidden states at run time. The pooled
    output stays the last layer's. Without ``clip_skip`` the graph is the one of artifacts that predate it.
    """

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(
        self, input_ids: torch.Tensor, clip_skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.to(torch.int64)
        if clip_skip is None:
            out = self.text_encoder(ids, return_dict=False)
            return out[0], out[1]
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states)  # [layers + 1, B, 77, D]: the embeddings, then every layer's
        # a non-negative index (len - N) rather than -N: negative gather indices are not portable across backends
        index = states.shape[0] - clip_skip.to(torch.int64).reshape(1)
        chosen = torch.index_select(states, 0, index).squeeze(0)
        # transformers 5 moved the layers from ``text_model`` onto the model itself
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        # as in PenultimateTextEncoder: a half-precision graph computes parts of the middle layers in fp32, and
        # the outputs keep the module's precision
        dtype = self.text_encoder.get_input_embeddings().weight.dtype
        return model.final_layer_norm(chosen).to(dtype), out.pooler_output.to(dtype)


class PenultimateTextEncoder(nn.Module):
    """input_ids -> (penultimate hidden state, pooled): SDXL's encoders, as ``StableDiffusionXLPipeline`` uses them.

    The hidden state is the input of the last transformer layer (no final layer norm). The pooled output is the
    ``CLIPTextModel`` pooled output, or the projected ``text_embeds`` of a ``CLIPTextModelWithProjection``.
    """

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        # The exported graph of a half-precision encoder computes parts of its middle layers in fp32 (scalar
        # promotion in the activation); the outputs keep the module's precision, as in eager PyTorch.
        dtype = self.text_encoder.get_input_embeddings().weight.dtype
        return out.hidden_states[-2].to(dtype), pooled.to(dtype)


def _residual_kwargs(residuals: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """ControlNet residuals (down-block outputs, then the middle block's) as diffusers' UNet takes them."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}


class UNet(nn.Module):
    """(sample, timestep [B] float32, encoder_hidden_states, *control residuals) -> noise_pred.

    The residuals (``control_down_<k>``, ``control_mid``) are added to the skip connections and the middle
    block's output, as diffusers does with a ControlNet's; zeros leave the prediction unchanged.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> torch.Tensor:
        control = _residual_kwargs(residuals)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **control)[0]


class UNetXL(nn.Module):
    """(sample, timestep, encoder_hidden_states, text_embeds [B, P], time_ids [B, 6], *control residuals)
    -> noise_pred: SDXL."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        control = _residual_kwargs(residuals)
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False, **control
        )[0]


class ControlNet(nn.Module):
    """(sample, timestep, encoder_hidden_states, [text_embeds, time_ids,] controlnet_cond) -> residuals.

    The residuals come out unscaled (conditioning scale 1): the runtime multiplies them by each step's scale.
    """

    def __init__(self, controlnet: Any, xl: bool) -> None:
        super().__init__()
        self.controlnet, self.xl = controlnet, xl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.xl:
            context, text_embeds, time_ids, hint = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        else:
            context, hint = rest
            added = None
        down, mid = self.controlnet(
            sample, timestep, context, hint, conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False
        )
        return (*down, mid)


class VaeDecoder(nn.Module):
    """Unscaled latent -> image in [-1, 1] (the runtime divides by the scaling factor first)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """Image in [-1, 1] -> (mean, std) of the unscaled latent distribution."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = (
            self.vae.quant_conv(self.vae.encoder(image))
            if self.vae.quant_conv is not None
            else (self.vae.encoder(image))
        )
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)


def wrap(component: str, module: Any, model: ModelInfo) -> nn.Module:
    """``module`` behind the plain tensor interface of ``component``'s spec for ``model``.

    For a step-cache model the UNet also gives the cached feature, and ``unet_shallow`` is cut from the UNet
    ``module`` (see ``runtime.models.step_cache``).
    """
    xl = model.family == "sdxl"
    if component.startswith("controlnet_"):
        return ControlNet(module, xl).eval()
    if component == "unet_shallow" or (component == "unet" and model.step_cache):
        from sdtrt.runtime.models.step_cache import FeatureUNet, ShallowUNet, cache_split

        split = cache_split(module, model.cache_branch)
        if component == "unet":
            return FeatureUNet(module, split, xl).eval()
        return ShallowUNet(module, split, xl, model.control_ready).eval()
    wrappers: dict[str, type[nn.Module]] = {
        "text_encoder": PenultimateTextEncoder if xl else TextEncoder,
        "text_encoder_2": PenultimateTextEncoder,
        "unet": UNetXL if xl else UNet,
        "vae_decoder": VaeDecoder,
        "vae_encoder": VaeEncoder,
    }
    return wrappers[component](module).eval()
