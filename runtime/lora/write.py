"""LoRA layers written as a ``.safetensors`` file, in the kohya / A1111 or the diffusers / PEFT spelling.

``files.read_lora`` reads both back to the same layers, so tests build LoRAs here and products can save what they
trained or merged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, LoraError
from sdtrt.runtime.files import write_bytes_atomic
from sdtrt.runtime.lora.files import LORA_COMPONENTS, LORA_FEATURE, PEFT_METADATA_KEY, LoraFormat, LoraLayer
from sdtrt.runtime.lora.match import ldm_paths


def save_lora(
    layers: Mapping[tuple[str, str], LoraLayer],
    path: str | os.PathLike[str],
    format: LoraFormat = "kohya",
    unet: Any = None,
    sgm_names: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write LoRA layers, keyed by (component, diffusers/transformers module path), as a ``.safetensors`` file.

    ``kohya`` writes ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL) names, the UNet ones
    in SGM block names when ``sgm_names`` (which needs ``unet``); ``diffusers`` writes what diffusers'
    ``save_lora_weights`` writes, alphas in its ``lora_adapter_metadata``.
    """
    safetensors_torch = require("safetensors.torch", LORA_FEATURE, "export")
    extra: dict[str, str] = {}
    if format == "kohya":
        tensors = _kohya_tensors(layers, unet, sgm_names)
    elif format == "diffusers":
        tensors, extra = _diffusers_tensors(layers)
    else:
        raise ConfigError(f"LoRA format {format!r}; expected 'kohya' or 'diffusers'")
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, safetensors_torch.save(tensors, metadata={"format": "pt", **extra, **(metadata or {})}))
    return target


def _kohya_tensors(layers: Mapping[tuple[str, str], LoraLayer], unet: Any, sgm_names: bool) -> dict[str, Any]:
    xl = any(c == "text_encoder_2" for c, _ in layers)
    xl = xl or getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    ldm: dict[str, str] = {}
    if sgm_names:
        if unet is None:
            raise ConfigError("writing SGM block names needs the UNet (unet=) to number its blocks")
        ldm = ldm_paths(unet, (p for p, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)))
    tensors: dict[str, Any] = {}
    for (component, path), layer in layers.items():
        if component == "unet":
            name = ldm.get(path, "") if sgm_names else path
            if not name:
                raise LoraError(f"UNet module {path} has no SGM block name")
        else:  # kohya names text encoder modules as transformers 4 did, under text_model.
            name = path if path.split(".")[0] in ("text_model", "text_projection") else f"text_model.{path}"
        stem = prefixes[component] + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = layer.down.detach().contiguous()
        tensors[f"{stem}.lora_up.weight"] = layer.up.detach().contiguous()
        if layer.alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(float(layer.alpha))
    return tensors


def _diffusers_tensors(layers: Mapping[tuple[str, str], LoraLayer]) -> tuple[dict[str, Any], dict[str, str]]:
    tensors: dict[str, Any] = {}
    for (component, path), layer in layers.items():
        tensors[f"{component}.{path}.lora_A.weight"] = layer.down.detach().contiguous()
        tensors[f"{component}.{path}.lora_B.weight"] = layer.up.detach().contiguous()
    if all(layer.alpha is None for layer in layers.values()):
        return tensors, {}  # no metadata: diffusers takes alpha = rank
    config: dict[str, Any] = {}
    for component in LORA_COMPONENTS:
        own = {p: layer for (c, p), layer in layers.items() if c == component}
        if own:
            for key, value in _peft_config(own).items():
                config[f"{component}.{key}"] = value
    return tensors, {PEFT_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _peft_config(layers: Mapping[str, LoraLayer]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for one component: the commonest rank and alpha, and patterns for the rest."""
    ranks = {p: layer.rank for p, layer in layers.items()}
    alphas = {p: float(layer.rank if layer.alpha is None else layer.alpha) for p, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{re.escape(p)}": v for p, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{re.escape(p)}": v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(layers),
    }
