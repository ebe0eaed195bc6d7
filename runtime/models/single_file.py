"""Single-file SD 1.x checkpoints: one ``.safetensors`` in the original LDM layout, as A1111 and ComfyUI use.

Reading goes through diffusers' own single-file conversion, fully offline: the diffusers-layout configs come
from a local folder (``configs/sd15`` by default) and the weights are passed in as a state dict, so nothing
ever asks the Hugging Face hub. Writing is the inverse mapping, derived from the modules' configs, so tiny
test models round-trip exactly.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import checkpoint_format, existing_checkpoint, write_bytes_atomic, write_text_atomic
from sdtrt.runtime.ldm_names import attention_up_levels, layers_per_block, unet_key, vae_key
from sdtrt.runtime.models.presets import shipped_config

# transformers.CLIPTextModel, diffusers.UNet2DConditionModel, diffusers.AutoencoderKL: optional extras whose
# lazy modules type checkers cannot follow, so these names document rather than constrain.
CLIPTextModel = Any
UNet2DConditionModel = Any
AutoencoderKL = Any

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json")
# The UNet's input convolution: [channels, 9, 3, 3] in an inpainting checkpoint, [channels, 4, 3, 3] otherwise.
INPUT_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
_FEATURE = "single-file checkpoints"


# ------------------------------------------------------------------------------------------------------------
# Detecting and reading files


def read_state_dict(path: str | os.PathLike[str], allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, without running any code from it unless allowed."""
    file = existing_checkpoint(path)
    if checkpoint_format(file) == "safetensors":
        safetensors_torch = require("safetensors.torch", _FEATURE, "export")
        try:
            return safetensors_torch.load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise SourceError(f"{file} is not a valid .safetensors file: {exc}") from exc
    if not allow_pickle:
        raise SourceError(
            f"{file} is a pickle checkpoint, and loading pickle can execute code hidden in the file. "
            "Convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it; "
            "it is then read with torch.load(weights_only=True)"
        )
    try:
        # A handle, not the path: torch.load would take a ".safetensors" name as safetensors.
        with open(file, "rb") as handle:
            obj: Any = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ... all mean the same to the user
        raise SourceError(
            f"{file} could not be read with torch.load(weights_only=True): {exc}. "
            "It may be damaged or hold objects other than tensors; convert it to .safetensors"
        ) from exc
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SourceError(f"{file} holds a {type(obj).__name__}; expected a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def is_sdxl_state(keys: Iterable[str]) -> bool:
    """Whether checkpoint keys (or a state dict) are in the SGM (SDXL) layout: keys under ``conditioner.embedders.``."""
    return any(key.startswith("conditioner.embedders.") for key in keys)


def _require_sd1_keys(state: Mapping[str, torch.Tensor], file: Path) -> None:
    missing = [p for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX) if not any(k.startswith(p) for k in state)]
    if not missing:
        return
    hint = ""
    if is_sdxl_state(state):
        hint = " It looks like an SDXL checkpoint; load it with single_file_xl.load_sdxl_single_file."
    elif any(k.startswith("cond_stage_model.model.") for k in state):
        hint = " It looks like an SD 2.x checkpoint (OpenCLIP text encoder), not supported as a single file."
    sample = ", ".join(sorted(state)[:3]) or "none"
    raise SourceError(
        f"{file}: this does not look like an SD 1.x checkpoint: no keys under {', '.join(missing)} "
        f"(found {len(state)} tensors, e.g. {sample}).{hint}"
    )


# ------------------------------------------------------------------------------------------------------------
# Loading


def load_single_file(
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """(text encoder, UNet, VAE) of an SD 1.x single-file checkpoint: fp32, eval mode, frozen, on the CPU.

    ``config_dir`` is a diffusers-layout folder with ``unet/``, ``vae/`` and ``text_encoder/`` ``config.json``
    describing the checkpoint's architecture; SD 1.5's shipped configs by default.
    """
    file = existing_checkpoint(path)
    configs = _config_dir(config_dir)
    state = read_state_dict(file, allow_pickle=allow_pickle)
    _require_sd1_keys(state, file)
    # Fresh fp32 copies: read tensors can sit in one buffer at unaligned offsets (CPU kernels then round
    # differently) and diffusers adopts them as they are; casting here also avoids its torch_dtype warnings.
    state = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    diffusers = require("diffusers", _FEATURE, "export")
    with torch.random.fork_rng(devices=[]):  # building modules draws random init; keep the caller's RNG
        unet = load_diffusers_model(
            diffusers.UNet2DConditionModel, state, configs, "unet", UNET_PREFIX, overrides=unet_overrides(state)
        )
        vae = load_diffusers_model(diffusers.AutoencoderKL, state, configs, "vae", VAE_PREFIX)
        text_encoder = _load_text_encoder(state, configs)
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    logger.info("loaded %s with the configs in %s", file, configs)
    return text_encoder, unet, vae


def _config_dir(config_dir: str | os.PathLike[str] | None) -> Path:
    root = shipped_config("sd15") if config_dir is None else Path(config_dir).expanduser().resolve()
    lacking = [name for name in CONFIG_FILES if not (root / name).is_file()]
    if lacking:
        raise SourceError(
            f"config folder {root} lacks {', '.join(lacking)}; expected a diffusers-layout folder with "
            f"{', '.join(CONFIG_FILES)} (write_config_dir writes one for your modules)"
        )
    return root


def unet_overrides(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """UNet config values the checkpoint's own tensors fix, over those of its config folder: the input channels,
    read off the input convolution, so an inpainting checkpoint (9: latents, mask, masked-image latents) loads
    with the same shipped config as its base model, as A1111 and ComfyUI load it."""
    weight = state.get(INPUT_CONV)
    if weight is None or weight.ndim != 4:
        return {}  # the load itself then says what is missing
    if weight.shape[1] != 4:
        logger.info("%s has %d input channels: an inpainting UNet", INPUT_CONV, weight.shape[1])
    return {"in_channels": int(weight.shape[1])}


def load_diffusers_model(
    cls: Any,
    state: dict[str, torch.Tensor],
    configs: Path,
    sub: str,
    prefix: str,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A diffusers component through ``from_single_file``, offline, checked for missing or extra weights.

    ``overrides`` replace values of the component's config (e.g. ``in_channels`` from ``unet_overrides``)."""
    config_file = configs / sub / "config.json"
    fix = (
        f"the checkpoint does not match {config_file}. If its architecture differs from that config, pass "
        "config_dir= (--config-dir) a diffusers-layout folder describing it"
    )
    try:
        # A state dict (not a path) and a local config folder: diffusers never resolves anything remotely.
        model = cls.from_single_file(
            state,
            config=str(configs),
            subfolder=sub,
            local_files_only=True,
            **dict(overrides or {}),
        )
    except Exception as exc:
        # diffusers reports a mismatch as ValueError, KeyError, RuntimeError or its own error type.
        raise SourceError(f"{sub}: {fix}: {_short_reason(exc)}") from exc
    empty = [name for name, t in model.state_dict().items() if t.is_meta]
    if empty:
        raise SourceError(f"{sub}: {fix}: {len(empty)} weights are missing, e.g. {', '.join(empty[:3])}")
    found = sum(k.startswith(prefix) for k in state)
    expected = len(model.state_dict())
    if found != expected:
        raise SourceError(f"{sub}: {fix}: it has {found} tensors under {prefix} but the config needs {expected}")
    return model


def _short_reason(exc: BaseException) -> str:
    size = r"torch\.Size\((\[[^\]]*\])\)"
    match = re.search(rf"(\S+) expected shape {size}, but got {size}", str(exc))
    if match:
        name, want, got = match.groups()
        return f"{name} has shape {got} in the checkpoint but the config needs {want}"
    # without accelerate, diffusers loads with load_state_dict, whose message words it differently
    match = re.search(
        rf"size mismatch for (\S+): copying a param with shape {size} from checkpoint, "
        rf"the shape in current model is {size}",
        str(exc),
    )
    if match:
        name, got, want = match.groups()
        return f"{name} has shape {got} in the checkpoint but the config needs {want}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _load_text_encoder(state: dict[str, torch.Tensor], configs: Path) -> CLIPTextModel:
    transformers = require("transformers", _FEATURE, "export")
    config = transformers.CLIPTextConfig.from_json_file(str(configs / "text_encoder" / "config.json"))
    model = transformers.CLIPTextModel(config)
    own = set(model.state_dict())
    # transformers 4 nests the weights under text_model., transformers 5 does not.
    nested = any(k.startswith("text_model.") for k in own)
    weights = {}
    for key, value in state.items():
        if not key.startswith(TEXT_PREFIX) or key.endswith("position_ids"):
            continue  # position_ids is a constant buffer, and some checkpoints carry a damaged copy of it
        name = key[len(TEXT_PREFIX) :].removeprefix("text_model.")
        weights[f"text_model.{name}" if nested else name] = value
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise SourceError(
            f"text_encoder: the checkpoint does not match {configs / 'text_encoder' / 'config.json'}: "
            f"{_short_reason(exc)}. Pass config_dir= a folder describing the checkpoint"
        ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise SourceError(
            f"text_encoder: the weights under {TEXT_PREFIX} do not match the CLIP config in {configs}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    return model


# ------------------------------------------------------------------------------------------------------------
# Writing


def save_original_checkpoint(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    path: str | os.PathLike[str],
) -> Path:
    """Write the three modules as one ``.safetensors`` file in the original SD 1.x (LDM) layout, atomically."""
    parts = {
        UNET_PREFIX: unet_to_ldm(unet),
        VAE_PREFIX: vae_to_ldm(vae),
        TEXT_PREFIX: text_encoder_to_ldm(text_encoder),
    }
    return write_checkpoint(parts, path)


def write_checkpoint(parts: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike[str]) -> Path:
    """Write ``{prefix: {key: tensor}}`` as one ``.safetensors`` file of ``prefix + key`` names, atomically: the
    whole file is built in memory first (about the model's size), then renamed into place."""
    safetensors_torch = require("safetensors.torch", _FEATURE, "export")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, part in parts.items():
        for key, value in part.items():
            tensors[prefix + key] = value.detach().to("cpu").contiguous()
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, safetensors_torch.save(tensors, metadata={"format": "pt"}))
    logger.info("wrote %d tensors to %s", len(tensors), target)
    return target


def write_config_dir(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    path: str | os.PathLike[str],
) -> Path:
    """Write ``{unet,vae,text_encoder}/config.json`` so ``load_single_file`` can rebuild these modules."""
    root = Path(path).expanduser()
    for sub, text in (
        ("unet", unet.to_json_string()),
        ("vae", vae.to_json_string()),
        ("text_encoder", text_encoder.config.to_json_string(use_diff=False)),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / sub / "config.json", text)
    return root


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """HF CLIP keys as SD 1.x stores them (nested under ``text_model.``), without the constant buffers."""
    return {
        f"text_model.{key.removeprefix('text_model.')}": value
        for key, value in text_encoder.state_dict().items()
        if not key.endswith("position_ids")
    }


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A diffusers SD 1.x-shaped UNet's weights under the LDM ``openaimodel`` names."""
    per_block = layers_per_block(unet.config.layers_per_block)
    state = unet.state_dict()
    attention_ups = attention_up_levels(state)
    return rename_weights(state, lambda key: unet_key(key, per_block, attention_ups), "UNet")


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s weights under the LDM names; mid-block attention becomes 1x1 convs."""
    levels = len(vae.config.up_block_types)
    out = rename_weights(vae.state_dict(), lambda key: vae_key(key, levels), "VAE")
    for key, value in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def rename_weights(
    state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], what: str, layout: str = "SD 1.x"
) -> dict[str, Any]:
    """``state`` under the names ``rename`` gives; a weight it names None does not fit ``layout`` and is refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = rename(key)
        if new is None:
            raise SourceError(
                f"{what} weight {key!r} has no place in the {layout} checkpoint layout; only {layout}-shaped "
                "models can be written as an original single-file checkpoint"
            )
        assert new not in out, f"two {what} weights map to {new}"
        out[new] = value
    return out
