"""diffusers module names -> the original LDM / SGM checkpoint names (``input_blocks.1.1...``, ``label_emb``).

A1111 and ComfyUI checkpoints, ControlNet files and kohya LoRAs name UNet, ControlNet and VAE weights after the
original ``openaimodel`` / ``cldm`` / ``autoencoder`` modules. The single-file converters write weights under these
names, and LoRA reads files that use them; both go through the mapping here. Every name is derived from the
diffusers key and the model's config (the layer count per block, and which up blocks carry attention), so any
SD 1.x / SDXL-shaped model maps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sdtrt.runtime.errors import SourceError

# diffusers ResnetBlock2D child -> LDM ResBlock child (UNet).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# SDXL's size/crop conditioning: the only UNet modules SGM adds to the LDM layout.
UNET_ADDITION = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# The ControlNet's own modules (the rest is a copy of the UNet's encoder and middle block, named as in the UNet):
# the zero convolution after the middle block, and its hint encoder's first convolution. The hint encoder is one
# LDM ``nn.Sequential`` of convolutions with an activation between each, so diffusers' ``blocks.N`` sit at even
# indices and ``conv_out`` after the last of them.
CONTROLNET_FIXED = {
    "controlnet_mid_block": "middle_block_out.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_FIXED = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


def child_name(table: Mapping[str, str], rest: str) -> str | None:
    """``rest`` with its leading module renamed by ``table`` (``norm1.weight`` -> ``in_layers.0.weight``), or None."""
    for name, ldm in table.items():
        if rest.startswith(name + "."):
            return ldm + rest[len(name) :]
    return None


def layers_per_block(value: Any, layout: str = "SD 1.x") -> int:
    """The UNet config's ``layers_per_block`` as one count; SourceError when it differs per block."""
    counts = {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}
    if len(counts) != 1:
        raise SourceError(
            f"UNet layers_per_block {value} differs per block; the {layout} layout needs one count for all"
        )
    return counts.pop()


def attention_up_levels(keys: Iterable[str]) -> set[int]:
    """The up blocks that hold attention, from diffusers UNet keys or module paths (they shift the upsampler)."""
    return {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}


def unet_key(key: str, per_block: int, attention_ups: set[int]) -> str | None:
    """A diffusers UNet key under its LDM name, or None when the LDM layout has no place for it."""
    fixed = child_name(UNET_FIXED, key)
    if fixed is not None:
        return fixed
    stride = per_block + 1  # LDM gives every level its layers plus one slot for the down/upsampler
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _unet_layer(f"input_blocks.{1 + level * stride + layer}", kind, rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * stride + per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 2 * int(m[2]) + (m[1] == "attentions")
        return _unet_layer(f"middle_block.{index}", m[1], m[3], slot=False)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _unet_layer(f"output_blocks.{level * stride + layer}", kind, rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if level in attention_ups else 1
        return f"output_blocks.{level * stride + per_block}.{slot}.conv.{m[2]}"
    return None


def sgm_unet_key(key: str, per_block: int, attention_ups: set[int]) -> str | None:
    """A diffusers UNet key under its SGM (SDXL) name: the LDM name, or ``label_emb`` for the added embedding."""
    return child_name(UNET_ADDITION, key) or unet_key(key, per_block, attention_ups)


def controlnet_key(key: str, per_block: int, hint_blocks: int) -> str | None:
    """A diffusers ``ControlNetModel`` key under its original name (without the ``control_model.`` prefix), or None.

    ``hint_blocks`` is the number of hint-encoder ``blocks`` between its ``conv_in`` and ``conv_out``.
    """
    fixed = child_name(CONTROLNET_FIXED, key)
    if fixed is not None:
        return fixed
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(weight|bias)", key):
        return f"input_hint_block.{2 * (hint_blocks + 1)}.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith(("controlnet_", "up_blocks.")):
        return None
    # A ControlNet has no up blocks, so no upsampler needs the attention levels.
    return sgm_unet_key(key, per_block, set())


def _unet_layer(block: str, kind: str, rest: str, slot: bool = True) -> str | None:
    # In an LDM block the ResBlock is child 0 and the SpatialTransformer child 1; the middle block is flat.
    if kind == "attentions":
        return f"{block}.1.{rest}" if slot else f"{block}.{rest}"
    child = child_name(UNET_RESNET, rest)
    if child is None:
        return None
    return f"{block}.0.{child}" if slot else f"{block}.{child}"


def vae_key(key: str, levels: int) -> str | None:
    """A diffusers ``AutoencoderKL`` key under its LDM name (``levels`` resolution levels), or None."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m[1], m[2]
    fixed = child_name(VAE_FIXED, rest)
    if fixed is not None:
        return f"{side}.{fixed}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        child = child_name(VAE_RESNET, m[2])
        return None if child is None else f"{side}.mid.block_{int(m[1]) + 1}.{child}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        child = child_name(VAE_ATTENTION, m[1])
        return None if child is None else f"{side}.mid.attn_1.{child}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # The LDM decoder numbers its levels from the lowest resolution up; diffusers from the top down.
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        child = child_name(VAE_RESNET, m[4])
        return None if child is None else f"{side}.{m[1]}.{level}.block.{m[3]}.{child}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{side}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return None
