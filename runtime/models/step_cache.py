"""Step caching (DeepCache) as two networks cut from one diffusers UNet.

The deep part of a UNet changes little between adjacent denoising steps. On a *full* step the whole UNet runs and
also gives the feature its up path carries at the chosen depth; on the steps in between a *shallow* UNet runs only
the outer layers: the input convolution and the first skip connections on the way down, then, on the way up, the
layers that consume those skip connections, starting from the cached feature instead of the deep part's output.

Skip branch ``k``: the shallow UNet recomputes the first ``k + 1`` skip connections (the input convolution's
output, then one per down-block resnet or downsampler, in order). For UNets with two resnets per block (SD 1.x/2.x,
SDXL) this is DeepCache's ``cache_branch_id``: 0 is the shallowest, 11 (SD 1.x/2.x) or 8 (SDXL) skips only the
middle block. The shallow network's weights are a subset of the UNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdtrt.runtime.errors import ShapeError
from sdtrt.runtime.specs import residual_layout


@dataclass(frozen=True)
class CacheSplit:
    """Where skip branch ``branch`` cuts a UNet: the up block and resnet where the shallow up path starts."""

    branch: int
    up_block: int  # index into unet.up_blocks
    resnet: int  # first resnet of that up block the shallow UNet runs
    feature: tuple[int, int]  # (channels, latent downscale) of the cached feature
    context: bool  # whether the shallow part has cross-attention (SDXL's outer blocks have none)

    @property
    def fresh_skips(self) -> int:
        """How many skip connections (ControlNet ``control_down_<k>`` inputs) the shallow UNet recomputes."""
        return self.branch + 1


def skip_count(unet: Any) -> int:
    """The number of skip connections of a diffusers UNet (its deepest branch is this minus one)."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def cache_split(unet: Any, branch: int) -> CacheSplit:
    """Where ``branch`` cuts ``unet``; ShapeError if the UNet has no such branch."""
    count = skip_count(unet)
    if not 0 <= branch < count:
        raise ShapeError(
            f"skip branch {branch} does not exist in this UNet: it has {count} skip connections, so branches "
            f"0 to {count - 1} (0 caches the most, {count - 1} only the middle block); choose one of those"
        )
    config = unet.config
    layout = residual_layout(config.block_out_channels, config.layers_per_block)
    # up block n-1-g consumes group g of the skip connections in reverse: find the group of the last fresh one
    blocks = len(unet.up_blocks)
    first = 0
    for group in range(blocks):
        up = blocks - 1 - group
        size = len(unet.up_blocks[up].resnets)
        if branch < first + size:
            position = branch - first
            resnet = size - 1 - position
            channels = unet.up_blocks[up].resnets[resnet].in_channels - layout[branch][0]
            context = _attends(unet, branch + 1, up, resnet)
            return CacheSplit(branch, up, resnet, (int(channels), int(layout[branch][1])), context)
        first += size
    raise AssertionError("unreachable: branch < skip_count")


def _attends(unet: Any, skips: int, up_block: int, resnet: int) -> bool:
    """Whether any layer the shallow UNet runs has attention (so it reads the text context)."""
    made = 1  # the input convolution's output
    for block in unet.down_blocks:
        for _ in block.resnets:
            if made == skips:
                break
            if getattr(block, "attentions", None):
                return True
            made += 1
        else:
            made += len(block.downsamplers or [])
            if made < skips:
                continue
        break
    blocks = unet.up_blocks
    if getattr(blocks[up_block], "attentions", None) and resnet < len(blocks[up_block].resnets):
        return True
    return any(getattr(block, "attentions", None) for block in blocks[up_block + 1 :])


def _inputs(
    unet: Any, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, added: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet's time embedding, processed context and input convolution's output, as its own forward makes them."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added or {})
    return emb, context, unet.conv_in(sample)


def _attend(attn: Any, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return attn(hidden, encoder_hidden_states=context, return_dict=False)[0]


def shallow_down(
    unet: Any, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, count: int
) -> list[torch.Tensor]:
    """The first ``count`` skip connections, computing only the down-path layers they need."""
    skips = [hidden]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attentions, strict=True):
            if len(skips) == count:
                return skips
            hidden = resnet(hidden, emb)
            if attn is not None:
                hidden = _attend(attn, hidden, context)
            skips.append(hidden)
        for downsampler in block.downsamplers or []:
            if len(skips) == count:
                return skips
            hidden = downsampler(hidden)
            skips.append(hidden)
    return skips


def shallow_up(
    unet: Any,
    split: CacheSplit,
    feature: torch.Tensor,
    skips: list[torch.Tensor],
    emb: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """From the cached ``feature`` through the up-path layers that consume ``skips``, to the UNet's output.

    Image sides are multiples of the UNet's overall downscale (``specs.check_size``), so, as in diffusers' forward
    for such sizes, no upsampler is given an output size.
    """
    hidden, skips = feature, list(skips)
    block = unet.up_blocks[split.up_block]
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in list(zip(block.resnets, attentions, strict=True))[split.resnet :]:
        hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), emb)
        if attn is not None:
            hidden = _attend(attn, hidden, context)
    for upsampler in block.upsamplers or []:
        hidden = upsampler(hidden, None)
    for index in range(split.up_block + 1, len(unet.up_blocks)):
        block = unet.up_blocks[index]
        count = len(block.resnets)
        mine, skips = tuple(skips[-count:]), skips[:-count]
        kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=mine, upsample_size=None, **kwargs)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def check_supported(unet: Any) -> None:
    """ShapeError for UNets whose forward the shallow network does not reproduce."""
    config = unet.config
    unsupported = {
        "class_embed_type": config.class_embed_type,
        "addition_embed_type": config.addition_embed_type not in (None, "text_time") and config.addition_embed_type,
        "time_cond_proj_dim": config.time_cond_proj_dim,
    }
    found = {k: v for k, v in unsupported.items() if v}
    if found:
        raise ShapeError(f"step caching does not support UNets with {found}; export with --no-step-cache")


def _added(xl: bool, rest: tuple[torch.Tensor, ...]) -> tuple[dict[str, Any] | None, tuple[torch.Tensor, ...]]:
    if not xl:
        return None, rest
    text_embeds, time_ids, *others = rest
    return {"text_embeds": text_embeds, "time_ids": time_ids}, tuple(others)


class FeatureUNet(nn.Module):
    """The full UNet (control residuals optional, as ``wrappers.UNet``) that also returns the feature ``split``
    caches: (sample, timestep, context, [text_embeds, time_ids,] *residuals) -> (noise_pred, cache_feature).

    The feature is taken with a hook on diffusers' own forward, so the prediction is exactly the UNet's.
    """

    def __init__(self, unet: Any, split: CacheSplit, xl: bool) -> None:
        super().__init__()
        self.unet, self.split, self.xl = unet, split, xl
        self._feature: list[torch.Tensor] = []

    def _hook(self) -> Any:
        """Hook the layer whose output (or the up block whose input) is the feature; returns the handle."""
        block = self.unet.up_blocks[self.split.up_block]
        if self.split.resnet == 0:
            return block.register_forward_pre_hook(self._keep_input, with_kwargs=True)
        attentions = getattr(block, "attentions", None)
        source = attentions[self.split.resnet - 1] if attentions else block.resnets[self.split.resnet - 1]
        return source.register_forward_hook(self._keep_output)

    def _keep_input(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._feature.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _keep_output(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self._feature.append(output[0] if isinstance(output, tuple) else getattr(output, "sample", output))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        added, residuals = _added(self.xl, rest)
        control = (
            {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
            if residuals
            else {}
        )
        handle = self._hook()  # only while this forward runs: the UNet may be used on its own too
        try:
            out = self.unet(sample, timestep, context, added_cond_kwargs=added, return_dict=False, **control)[0]
            (feature,) = self._feature  # exactly one: the hooked layer runs once per forward
        finally:
            handle.remove()
            self._feature.clear()
        return out, feature


class ShallowUNet(nn.Module):
    """The outer layers of the UNet, from the cached feature: (sample, timestep, context, [text_embeds, time_ids,]
    *fresh residuals, cache_feature) -> noise_pred. ``fresh residuals`` (when ``control``) are the ControlNet
    residuals of the skip connections it recomputes, ``control_down_0`` .. ``control_down_<branch>``. When no
    layer it runs has attention (``split.context`` false: SDXL's shallow branches) it takes no context input."""

    def __init__(self, unet: Any, split: CacheSplit, xl: bool, control: bool) -> None:
        super().__init__()
        check_supported(unet)
        self.unet, self.split, self.xl, self.control = unet, split, xl, control

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        context: Any = None
        if self.split.context:
            context, *rest = rest
        added, rest = _added(self.xl, tuple(rest))
        *residuals, feature = rest
        emb, context, hidden = _inputs(self.unet, sample, timestep, context, added)
        skips = shallow_down(self.unet, hidden, emb, context, self.split.fresh_skips)
        if self.control:
            skips = [skip + residual for skip, residual in zip(skips, residuals, strict=True)]
        return shallow_up(self.unet, self.split, feature, skips, emb, context)
