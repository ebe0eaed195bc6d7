"""Single-file SDXL checkpoints: one ``.safetensors`` in the original SGM layout, as A1111 and ComfyUI use.

The file holds the UNet under ``model.diffusion_model.`` (LDM ``openaimodel`` names, plus ``label_emb`` for the
size/crop conditioning), the VAE under ``first_stage_model.``, CLIP ViT-L under
``conditioner.embedders.0.transformer.`` (Hugging Face names) and OpenCLIP ViT-bigG under
``conditioner.embedders.1.model.`` (OpenCLIP names: fused ``in_proj`` attention, ``text_projection`` applied
as ``x @ P``). UNet and VAE go through diffusers' own single-file conversion, offline, as in
``single_file``; the OpenCLIP encoder is mapped here. Writing is the exact inverse, so tiny test models
round-trip bit for bit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import existing_checkpoint, write_text_atomic
from sdtrt.runtime.ldm_names import attention_up_levels, child_name, layers_per_block, sgm_unet_key
from sdtrt.runtime.models.presets import shipped_config
from sdtrt.runtime.models.single_file import (
    CONFIG_FILES,
    UNET_PREFIX,
    VAE_PREFIX,
    load_diffusers_model,
    read_state_dict,
    rename_weights,
    text_encoder_to_ldm,
    unet_overrides,
    vae_to_ldm,
    write_checkpoint,
    write_config_dir,
)
from sdtrt.runtime.models.tokenizer import build_clip_tokenizer, clip_vocab_and_merges

# transformers.CLIPTextModel / CLIPTextModelWithProjection, diffusers models: optional extras (see single_file).
CLIPTextModel = Any
CLIPTextModelWithProjection = Any
UNet2DConditionModel = Any
AutoencoderKL = Any

logger = logging.getLogger(__name__)

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_CONFIG_FILES = (*CONFIG_FILES, "text_encoder_2/config.json")
SDXL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPENCLIP_PREFIX)
# The top-level groups a Stable Diffusion single file may hold, to say what a wrong file does contain.
_KNOWN_PREFIXES = (
    *SDXL_PREFIXES,
    "conditioner.embedders.0.model.",
    "cond_stage_model.transformer.",
    "cond_stage_model.model.",
)
PAD_TOKEN_2 = "!"
_FEATURE = "SDXL single-file checkpoints"

# OpenCLIP name -> Hugging Face CLIP name (without the text_model. nesting).
_OPENCLIP_FIXED = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Stored by OpenCLIP but not part of a text encoder: the contrastive temperature.
_OPENCLIP_UNUSED = ("logit_scale",)


def sdxl_tokenizers() -> tuple[Tokenizer, Tokenizer]:
    """SDXL's two tokenizers: the same CLIP BPE, the first padding with ``<|endoftext|>``, the second with ``!``.

    ``tokenizer_2`` of SDXL pads with ``!`` (id 0), as OpenCLIP does; both pad and truncate to 77. A ``!`` inside
    a prompt stays text, as in OpenCLIP ("!!!" is one token); transformers' CLIPTokenizer with ``pad_token="!"``
    would instead turn each such ``!`` into a pad token.
    """
    vocab, merges = clip_vocab_and_merges()
    return build_clip_tokenizer(vocab, merges), build_clip_tokenizer(vocab, merges, pad_token=PAD_TOKEN_2)


# ------------------------------------------------------------------------------------------------------------
# Loading


def load_sdxl_single_file(
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, AutoencoderKL]:
    """(text encoder, text encoder 2, UNet, VAE) of an SDXL single file: fp32, eval mode, frozen, on the CPU.

    ``config_dir`` is a diffusers-layout folder with ``unet/``, ``vae/``, ``text_encoder/`` and
    ``text_encoder_2/`` ``config.json``; SDXL base 1.0's shipped configs by default.
    """
    file = existing_checkpoint(path)
    configs = _config_dir(config_dir)
    state = read_state_dict(file, allow_pickle=allow_pickle)
    _require_sdxl_keys(state, file)
    diffusers = require("diffusers", _FEATURE, "export")
    transformers = require("transformers", _FEATURE, "export")
    with torch.random.fork_rng(devices=[]):  # building modules draws random init; keep the caller's RNG
        # One component at a time, dropping its tensors from `state`, so a 7 GB file is not held twice in fp32.
        unet_state = _take_fp32(state, UNET_PREFIX)
        overrides = unet_overrides(unet_state)
        unet = load_diffusers_model(
            diffusers.UNet2DConditionModel, unet_state, configs, "unet", UNET_PREFIX, overrides=overrides
        )
        del unet_state
        vae = load_diffusers_model(diffusers.AutoencoderKL, _take_fp32(state, VAE_PREFIX), configs, "vae", VAE_PREFIX)
        text_encoder = _load_clip(
            transformers.CLIPTextModel, *_clip_l_weights(state), configs, "text_encoder", CLIP_L_PREFIX
        )
        text_encoder_2 = _load_clip(
            transformers.CLIPTextModelWithProjection,
            *open_clip_weights(state),
            configs,
            "text_encoder_2",
            OPENCLIP_PREFIX,
        )
    modules = (text_encoder, text_encoder_2, unet, vae)
    for module in modules:
        module.eval().requires_grad_(False)
    logger.info("loaded SDXL checkpoint %s with the configs in %s", file, configs)
    return modules


def _config_dir(config_dir: str | os.PathLike[str] | None) -> Path:
    root = shipped_config("sdxl") if config_dir is None else Path(config_dir).expanduser().resolve()
    lacking = [name for name in SDXL_CONFIG_FILES if not (root / name).is_file()]
    if lacking:
        raise SourceError(
            f"config folder {root} lacks {', '.join(lacking)}; an SDXL checkpoint needs a diffusers-layout "
            f"folder with {', '.join(SDXL_CONFIG_FILES)} (write_sdxl_config_dir writes one for your modules)"
        )
    return root


def _require_sdxl_keys(state: Mapping[str, torch.Tensor], file: Path) -> None:
    missing = [p for p in SDXL_PREFIXES if not any(k.startswith(p) for k in state)]
    if not missing:
        return
    groups = [p for p in _KNOWN_PREFIXES if any(k.startswith(p) for k in state)]
    found = f"found {len(state)} tensors, under {', '.join(groups)}" if groups else f"found {len(state)} tensors"
    if not groups and state:
        found += f", e.g. {', '.join(sorted(state)[:3])}"
    hint = ""
    if "cond_stage_model.transformer." in groups:
        hint = " It looks like an SD 1.x checkpoint; load it with single_file.load_single_file."
    elif "cond_stage_model.model." in groups:
        hint = " It looks like an SD 2.x checkpoint (one OpenCLIP text encoder), not supported as a single file."
    elif "conditioner.embedders.0.model." in groups:
        hint = " It looks like the SDXL refiner (OpenCLIP bigG only, no CLIP ViT-L), which is not supported."
    elif OPENCLIP_PREFIX in missing and CLIP_L_PREFIX not in missing:
        hint = " The second text encoder (OpenCLIP ViT-bigG) is missing; the file may be cut short or pruned."
    raise SourceError(
        f"{file}: this does not look like an SDXL checkpoint: expected tensors under {', '.join(SDXL_PREFIXES)}, "
        f"none under {', '.join(missing)} ({found}).{hint}"
    )


def _take_fp32(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove the tensors under ``prefix`` from ``state`` and return fresh fp32 copies of them.

    Read tensors can sit in one buffer at unaligned offsets (CPU kernels then round differently) and diffusers
    adopts them as they are; casting here also avoids its torch_dtype warnings.
    """
    out = {}
    for key in [k for k in state if k.startswith(prefix)]:
        value = state.pop(key)
        out[key] = value.to(torch.float32 if value.is_floating_point() else value.dtype, copy=True)
    return out


# A Hugging Face CLIP name (without text_model.) -> (checkpoint key, tensor); and keys with no HF name.
Weights = dict[str, tuple[str, torch.Tensor]]


def _clip_l_weights(state: Mapping[str, torch.Tensor]) -> tuple[Weights, list[str]]:
    weights: Weights = {}
    for key, value in state.items():
        # position_ids is a constant buffer, and some checkpoints carry a damaged copy of it
        if key.startswith(CLIP_L_PREFIX) and not key.endswith("position_ids"):
            weights[key[len(CLIP_L_PREFIX) :].removeprefix("text_model.")] = (key, value)
    return weights, []


def open_clip_weights(state: Mapping[str, torch.Tensor], prefix: str = OPENCLIP_PREFIX) -> tuple[Weights, list[str]]:
    """The OpenCLIP text tower under ``prefix`` as Hugging Face CLIP weights, and the keys that have no place.

    The fused attention input ``in_proj`` [3w, w] splits into q, k, v; ``text_projection`` [w, p] (used as
    ``x @ P``) becomes the ``Linear`` weight ``P.T``.
    """
    weights: Weights = {}
    unknown: list[str] = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest in _OPENCLIP_UNUSED:
            continue
        if rest == "text_projection":
            weights["text_projection.weight"] = (key, value.T)
        elif rest in _OPENCLIP_FIXED:
            weights[_OPENCLIP_FIXED[rest]] = (key, value)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest):
            if value.shape[0] % 3:
                unknown.append(f"{key} (shape {list(value.shape)}, not three equal q/k/v parts)")
                continue
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                weights[f"encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = (key, part)
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest)) and (
            child := child_name(_OPENCLIP_LAYER, m[2])
        ):
            weights[f"encoder.layers.{m[1]}.{child}"] = (key, value)
        else:
            unknown.append(key)
    return weights, unknown


def _load_clip(cls: Any, weights: Weights, unknown: list[str], configs: Path, sub: str, prefix: str) -> Any:
    """A transformers CLIP text model from ``weights``, refusing any shape, missing or extra weight mismatch."""
    transformers = require("transformers", _FEATURE, "export")
    config_file = configs / sub / "config.json"
    fix = f"pass config_dir= (--config-dir) a diffusers-layout folder whose {sub}/config.json describes it"
    config = transformers.CLIPTextConfig.from_json_file(str(config_file))
    model = cls(config)
    own = model.state_dict()
    # transformers 4 nests every weight under text_model.; transformers 5 only in the *WithProjection classes.
    loaded: dict[str, torch.Tensor] = {}
    extra = list(unknown)
    for name, (key, value) in weights.items():
        target = name if name in own else f"text_model.{name}"
        if target not in own:
            extra.append(key)
            continue
        if own[target].shape != value.shape:
            raise SourceError(
                f"{sub}: {key} has shape {list(value.shape)} in the checkpoint but {config_file} needs "
                f"{list(own[target].shape)} for {target}; {fix}"
            )
        loaded[target] = value
    missing = [k for k in own if k not in loaded and not k.endswith("position_ids")]
    if missing or extra:
        raise SourceError(
            f"{sub}: the weights under {prefix} do not match {config_file}: {len(missing)} missing "
            f"(e.g. {', '.join(missing[:3]) or 'none'}), {len(extra)} unexpected "
            f"(e.g. {', '.join(extra[:3]) or 'none'}); {fix}"
        )
    model.load_state_dict(loaded, strict=False)  # copies, casting to the model's fp32
    return model


# ------------------------------------------------------------------------------------------------------------
# Writing


def save_sdxl_checkpoint(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    path: str | os.PathLike[str],
) -> Path:
    """Write the four modules as one ``.safetensors`` file in the original SDXL (SGM) layout, atomically."""
    parts = {
        UNET_PREFIX: unet_to_sgm(unet),
        VAE_PREFIX: vae_to_ldm(vae),
        CLIP_L_PREFIX: text_encoder_to_ldm(text_encoder),
        OPENCLIP_PREFIX: open_clip_to_sgm(text_encoder_2),
    }
    _check_fits(text_encoder, text_encoder_2, unet)
    return write_checkpoint(parts, path)


def write_sdxl_config_dir(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    path: str | os.PathLike[str],
) -> Path:
    """Write ``{unet,vae,text_encoder,text_encoder_2}/config.json`` so ``load_sdxl_single_file`` can rebuild them."""
    root = write_config_dir(text_encoder, unet, vae, path)
    (root / "text_encoder_2").mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "text_encoder_2" / "config.json", text_encoder_2.config.to_json_string(use_diff=False))
    return root


def unet_to_sgm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A diffusers SDXL-shaped UNet's weights under the SGM ``openaimodel`` names (``label_emb`` included)."""
    if unet.config.addition_embed_type != "text_time":
        raise SourceError(
            f"the UNet has addition_embed_type={unet.config.addition_embed_type!r}; an SDXL checkpoint needs "
            "'text_time' (the size/crop conditioning). Write SD 1.x UNets with save_original_checkpoint"
        )
    per_block = layers_per_block(unet.config.layers_per_block, layout="SDXL")
    state = unet.state_dict()
    attention_ups = attention_up_levels(state)
    return rename_weights(state, lambda key: sgm_unet_key(key, per_block, attention_ups), "UNet", layout="SDXL")


def open_clip_to_sgm(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPTextModelWithProjection``'s weights under the OpenCLIP names SDXL stores."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    if "text_projection.weight" not in state:
        raise SourceError(
            f"text_encoder_2 is a {type(text_encoder_2).__name__} without text_projection; SDXL's second "
            "text encoder must be a CLIPTextModelWithProjection"
        )
    fixed = {hf: name for name, hf in _OPENCLIP_FIXED.items()}
    layer = {hf: name for name, hf in _OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {"text_projection": state.pop("text_projection.weight").T}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)) and (child := child_name(layer, m[2])):
            out[f"transformer.resblocks.{m[1]}.{child}"] = value
        else:
            raise SourceError(
                f"text_encoder_2 weight {key!r} has no place in the OpenCLIP layout of an SDXL checkpoint; "
                "only standard CLIP text models can be written"
            )
    for name, parts in fused.items():
        assert parts.keys() == {"q", "k", "v"}, f"{name}: q/k/v incomplete"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _check_fits(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, unet: Any) -> None:
    """The UNet reads both encoders' hidden states side by side, and encoder 2's pooled projection."""
    widths = (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
    pooled = text_encoder_2.config.projection_dim + 6 * (unet.config.addition_time_embed_dim or 0)
    if unet.config.cross_attention_dim != sum(widths):
        raise SourceError(
            f"the UNet's cross_attention_dim is {unet.config.cross_attention_dim}, but the text encoders are "
            f"{widths[0]} and {widths[1]} wide; SDXL concatenates them, so it must be {sum(widths)}"
        )
    if unet.config.projection_class_embeddings_input_dim != pooled:
        raise SourceError(
            f"the UNet's projection_class_embeddings_input_dim is "
            f"{unet.config.projection_class_embeddings_input_dim}; SDXL feeds it text_encoder_2's projection "
            f"({text_encoder_2.config.projection_dim}) plus 6 time ids of addition_time_embed_dim, {pooled} in all"
        )
