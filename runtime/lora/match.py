"""LoRA layers matched to a model: layer names -> the model's Linear/Conv2d modules -> weight deltas.

Underscore-joined names are ambiguous (``to_q``, ``attn1``, ``ff_net_0_proj``), so they are resolved against the
model: every Linear/Conv2d path of the given module, joined with ``_``, plus the LDM name of every UNet path (from
the config, with ``sdtrt.runtime.ldm_names``). A LoRA that does not fit is refused with the model family it seems
to be for (``lora_family``) beside the family of the model given (``model_family_of``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdtrt.runtime.errors import LoraError, SourceError
from sdtrt.runtime.ldm_names import attention_up_levels, layers_per_block, sgm_unet_key
from sdtrt.runtime.lora.files import LoraFile, LoraFormat, LoraLayer


@dataclass(frozen=True)
class _Targets:
    """The Linear/Conv2d modules of one component, findable by dotted path and by underscore-joined name."""

    layers: dict[str, torch.nn.Module]
    dotted: dict[str, str]  # diffusers/transformers path (or UNet LDM path) -> module path
    joined: dict[str, str | None]  # the same, dots as "_" -> module path; None where two paths join alike

    def find(self, component: str, path: str, fmt: LoraFormat) -> str | None:
        if component != "unet":  # transformers 5 nests CLIPTextModel's modules under text_model. no more
            path = path.removeprefix("text_model.").removeprefix("text_model_")
        return self.joined.get(path) if fmt == "kohya" else self.dotted.get(path)


def _targets(component: str, module: torch.nn.Module) -> _Targets:
    layers: dict[str, torch.nn.Module] = {
        name: m for name, m in module.named_modules() if name and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    ldm = ldm_paths(module, layers) if component == "unet" else {}
    dotted: dict[str, str] = {}
    for path in layers:
        dotted[path if component == "unet" else path.removeprefix("text_model.")] = path
        if path in ldm:
            dotted.setdefault(ldm[path], path)
    joined: dict[str, str | None] = {}
    for alias, path in dotted.items():
        name = alias.replace(".", "_")
        joined[name] = path if joined.get(name, path) == path else None
    return _Targets(layers, dotted, joined)


def ldm_paths(unet: Any, paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> its LDM/SGM path (``input_blocks.1.1...``), from the UNet's config."""
    config = getattr(unet, "config", None)
    per_block = getattr(config, "layers_per_block", None)
    if per_block is None:
        return {}
    try:
        per_block = layers_per_block(per_block)
    except SourceError:
        return {}  # per-level layer counts: LDM block numbers are undefined, only diffusers names resolve
    paths = list(paths)
    ups = attention_up_levels(paths)
    out = {}
    for path in paths:
        key = f"{path}.weight"
        ldm = sgm_unet_key(key, per_block, ups)
        if ldm is not None:
            out[path] = ldm.removesuffix(".weight")
    return out


def lora_deltas(
    loras: Sequence[tuple[LoraFile, float]], modules: Mapping[str, torch.nn.Module]
) -> dict[str, dict[str, torch.Tensor]]:
    """Weight deltas of LoRAs at their scales: component -> {state_dict weight name: summed fp32 delta}.

    ``modules`` maps each component the model has (``unet``, ``text_encoder``, ``text_encoder_2``) to its module.
    Every layer of every LoRA must find its Linear/Conv2d module and fit its shape, or the call raises
    ``LoraError`` and returns nothing. The deltas are on the CPU, one fp32 tensor per touched weight.
    """
    targets: dict[str, _Targets] = {}
    plan: list[tuple[str, str, LoraLayer, float]] = []
    problems = []
    for lora, scale in loras:
        if not math.isfinite(float(scale)):
            raise LoraError(f"LoRA {lora.name}: scale {scale}; expected a finite number")
        unmatched: list[str] = []
        seen: dict[tuple[str, str], str] = {}
        for (component, path), layer in lora.layers.items():
            target = None
            if component in modules:
                if component not in targets:
                    targets[component] = _targets(component, modules[component])
                target = targets[component].find(component, path, lora.format)
            if target is None:
                unmatched.append(layer.key or f"{component}.{path}")
                continue
            if (component, target) in seen:
                raise LoraError(
                    f"LoRA {lora.path}: {seen[component, target]} and {layer.key} both target {component} {target}"
                )
            seen[component, target] = layer.key
            plan.append((component, target, layer, float(scale)))
        if unmatched:
            problems.append(_unmatched_message(lora, unmatched, modules))
    if problems:
        raise LoraError(" ".join(problems))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, target, layer, scale in plan:
        weight: torch.Tensor = targets[component].layers[target].weight  # type: ignore[assignment]
        try:
            delta = layer.delta(scale, weight.shape)
        except LoraError as exc:
            raise LoraError(f"{component} {target}: {exc}") from exc
        bucket = out.setdefault(component, {})
        name = f"{target}.weight"
        if name in bucket:
            bucket[name].add_(delta)
        else:
            bucket[name] = delta
    return out


def _unmatched_message(lora: LoraFile, unmatched: list[str], modules: Mapping[str, torch.nn.Module]) -> str:
    shown = ", ".join(sorted(unmatched)[:3])
    file_family, file_why = lora_family(lora)
    model_family, model_why = model_family_of(modules)
    fix = (
        "Use a LoRA made for this model's family"
        if file_family != model_family
        else "Its key names may use a spelling sdtrt does not know, or target layers this model lacks"
    )
    return (
        f"LoRA {lora.path}: {len(unmatched)} of {len(lora.layers)} layers have no matching Linear/Conv2d module in "
        f"the model given (e.g. {shown}). The file seems to be for {file_family} ({file_why}); the model given is "
        f"{model_family} ({model_why}). {fix}."
    )


def lora_family(lora: LoraFile) -> tuple[str, str]:
    """(family, evidence): ``SD 1.x``, ``SD 2.x``, ``SDXL``, ``SD 1.x/2.x`` or ``an unknown family``."""
    evidence = []
    te2 = any(c == "text_encoder_2" for c, _ in lora.layers)
    if te2:
        evidence.append("second text encoder layers (lora_te2_ / text_encoder_2.)")
    unet = [p.replace(".", "_") for c, p in lora.layers if c == "unet"]
    layout = None
    if any(re.search(r"(add_embedding|label_emb)_|transformer_blocks_[1-9]", n) for n in unet):
        layout = True
        evidence.append("SDXL UNet layout (deep transformers or added embeddings)")
    elif any(re.match(r"down_blocks_0_attentions|input_blocks_[12]_1_", n) for n in unet):
        layout = False
        evidence.append("attention at the UNet's top level")
    cross = _width(lora, "unet", r"attn2_to_k$")
    if cross is not None:
        evidence.append(f"cross-attention to_k input width {cross}")
    text = _width(lora, "text_encoder", r"q_proj$")
    if text is not None:
        evidence.append(f"text encoder width {text}")
    family = _family(te2 or bool(layout), layout, cross, text)
    base = lora.metadata.get("ss_base_model_version", "")
    if family in ("SD 1.x/2.x", "an unknown family") and base:
        family = "SDXL" if base.startswith("sdxl") else "SD 2.x" if base.startswith("sd_v2") else family
        evidence.append(f"ss_base_model_version {base}")
    return family, ", ".join(evidence) or "no telling keys"


def model_family_of(modules: Mapping[str, torch.nn.Module]) -> tuple[str, str]:
    """(family, evidence) of a model given as component -> module, judged as ``lora_family`` judges files."""
    config = getattr(modules.get("unet"), "config", None)
    cross = getattr(config, "cross_attention_dim", None)
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    xl = getattr(config, "addition_embed_type", None) == "text_time" or "text_encoder_2" in modules
    text = getattr(getattr(modules.get("text_encoder"), "config", None), "hidden_size", None)
    evidence = ["two text encoders" if "text_encoder_2" in modules else "one text encoder"]
    if cross is not None:
        evidence.append(f"cross-attention width {cross}")
    if text is not None:
        evidence.append(f"text encoder width {text}")
    layout = xl if config is not None else None
    return _family(xl, layout, cross, text), ", ".join(evidence)


def _family(xl: bool, layout: bool | None, cross: int | None, text: int | None) -> str:
    if xl or cross == 2048:
        return "SDXL"
    if cross == 1024 or (cross is None and text == 1024):
        return "SD 2.x"
    if cross == 768 or (cross is None and text == 768):
        return "SD 1.x"
    return "SD 1.x/2.x" if layout is False else "an unknown family"


def _width(lora: LoraFile, component: str, pattern: str) -> int | None:
    for (c, path), layer in lora.layers.items():
        if c == component and re.search(pattern, path.replace(".", "_")):
            return int(layer.down.shape[1])
    return None
