"""LoRA files as weight deltas for sdtrt's PyTorch modules (text encoders and UNet).

Two ``.safetensors`` spellings are read:

* kohya / A1111: ``lora_unet_*``, ``lora_te_*`` (SD 1.x/2.x) or ``lora_te1_*`` / ``lora_te2_*`` (SDXL) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``. Module names have their dots replaced by ``_``, and
  the UNet part uses either diffusers names (``down_blocks_0_attentions_0_...``) or the original LDM/SGM block
  names (``input_blocks_1_1_...``, ``middle_block_1_...``, ``output_blocks_...``).
* diffusers / PEFT, as ``save_lora_weights`` writes it: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also
  ``text_encoder.`` / ``text_encoder_2.``), alphas in the ``lora_adapter_metadata`` JSON of the file's metadata;
  and the older ``.lora.down.weight``, ``.lora_linear_layer.down.weight`` and ``processor.to_q_lora.down.weight``.

Underscore-joined names are ambiguous (``to_q``, ``attn1``, ``ff_net_0_proj``), so they are resolved against the
model: every Linear/Conv2d path of the given module, joined with ``_``, plus the LDM name of every UNet path
(from the config, with ``single_file``'s diffusers -> LDM mapping). The delta of a layer is
``scale * alpha / rank * up @ down``, exactly what diffusers' ``load_lora_weights`` + ``fuse_lora`` adds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, LoraError, SourceError
from sdtrt.runtime.files import write_bytes_atomic

from .single_file import _child, _layers_per_block, _unet_key, checkpoint_format
from .single_file_xl import _UNET_ADDITION

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LoraFormat = Literal["kohya", "diffusers"]
PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's lora_alpha when a config leaves it out
_FEATURE = "LoRA files"
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Suffix -> role, longest spellings first; "_lora." is the attention-processor spelling (to_q_lora).
_DIFFUSERS_PARTS = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Key pattern -> the adapter kind it belongs to; none of these is a plain low-rank delta.
_UNSUPPORTED = (
    (r"\.dora_scale$|lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    (r"\.hada_w[12]_[ab]$|\.hada_t[12]$", "LyCORIS LoHa"),
    (r"\.lokr_w[12](_[ab])?$|\.lokr_t2$", "LyCORIS LoKr"),
    (r"\.lora_mid\.weight$", "LoCon with a CP/Tucker middle factor"),
    (r"\.oft_(blocks|diag)$|\.oft_R\.weight$", "OFT"),
    (r"\.lora_(B|up)\.bias$", "LoRA with a bias (lora_bias)"),
    (r"\.diff(_b)?$", "LyCORIS full weight difference"),
    (r"\.[wb]_norm$", "LyCORIS norm layers"),
)


# ------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank pair: ``down`` [rank, in] or [rank, in, kh, kw], ``up`` [out, rank] or [out, rank, 1, 1].

    ``alpha`` None means alpha = rank (scale 1, the diffusers/PEFT default). ``key`` is the layer's name in its
    file, for messages.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        name = self.key or "a LoRA layer"
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise LoraError(
                f"{name}: down {tuple(self.down.shape)} and up {tuple(self.up.shape)} must be 2-d (Linear) or 4-d "
                "(Conv2d) matrices"
            )
        if self.up.shape[1] != self.down.shape[0] or self.up.shape[2:] not in ((), (1, 1)):
            raise LoraError(
                f"{name}: up {tuple(self.up.shape)} does not fit down {tuple(self.down.shape)}; expected up "
                f"[out, {self.down.shape[0]}] or [out, {self.down.shape[0]}, 1, 1]"
            )
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise LoraError(f"{name}: alpha is {self.alpha}; expected a finite number")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha_scale(self) -> float:
        """``alpha / rank``, 1.0 when the file has no alpha."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, scale: float, shape: torch.Size | Sequence[int]) -> torch.Tensor:
        """``scale * alpha / rank * up @ down`` in fp32, shaped like the weight (``shape``) it is added to."""
        shape = torch.Size(shape)
        kernel = tuple(shape[1:]) + (1,) * (3 - len(shape[1:]))
        lora_kernel = tuple(self.down.shape[1:]) + (1,) * (3 - len(self.down.shape[1:]))
        if len(shape) not in (2, 4) or self.up.shape[0] != shape[0] or lora_kernel != kernel:
            raise LoraError(
                f"{self.key or 'LoRA layer'}: its delta has shape {self._delta_shape()} but the model's weight has "
                f"shape {tuple(shape)}; the LoRA was made for a model with other layer widths"
            )
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return product.mul_(float(scale) * self.alpha_scale).reshape(shape)

    def _delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))


@dataclass(frozen=True)
class LoraFile:
    """A read LoRA file. ``layers`` maps (component, module path as in the file) to its layer.

    Paths are as the file names them, without prefix and suffix: ``down_blocks_0_..._attn1_to_q`` (kohya,
    underscores) or ``down_blocks.0....attn1.to_q`` (diffusers, dots, with ``processor`` spellings normalised).
    ``addnet_hash`` is kohya's hash of the tensor data (the file after its header); ``metadata`` the file's
    safetensors metadata.
    """

    path: str
    name: str
    sha256: str
    format: LoraFormat
    layers: dict[tuple[str, str], LoraLayer]
    addnet_hash: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in ("kohya", "diffusers"):
            raise ConfigError(f"LoRA format {self.format!r}; expected 'kohya' or 'diffusers'")
        strange = sorted({c for c, _ in self.layers if c not in COMPONENTS})
        if strange:
            raise ConfigError(f"LoRA components {strange}; expected some of {', '.join(COMPONENTS)}")

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in "Lora hashes": the file's ``sshs_model_hash``, else the addnet hash."""
        recorded = self.metadata.get("sshs_model_hash", "")
        if re.fullmatch(r"[0-9a-fA-F]{12,64}", recorded):
            return recorded[:12].lower()
        return self.addnet_hash[:12]


# ------------------------------------------------------------------------------------------------------------
# Reading


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (kohya/A1111 or diffusers/PEFT); pickle files are refused."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LoraError(f"LoRA file {file} does not exist or is not a file; expected a .safetensors LoRA")
    try:
        kind = checkpoint_format(file)
    except SourceError as exc:
        raise LoraError(f"LoRA file: {exc}") from exc
    if kind == "pickle":
        raise LoraError(
            f"{file} is a pickle file (.ckpt/.pt/.bin as torch.save writes it), and loading pickle can execute "
            "code hidden in the file; sdtrt reads LoRAs only as .safetensors. Convert it to .safetensors with a "
            "tool you trust"
        )
    tensors, metadata = _read_safetensors(file)
    fmt, entries = _parse_keys(tensors, file)
    peft = _peft_configs(metadata, file) if fmt == "diffusers" else {}
    layers = {target: _layer(parts, target, peft, file) for target, parts in entries.items()}
    sha256, addnet = _hashes(file)
    logger.info("read %s LoRA %s: %d layers", fmt, file, len(layers))
    return LoraFile(str(file), file.stem, sha256, fmt, layers, addnet, dict(metadata))


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors = require("safetensors", _FEATURE, "export")
    try:
        with safetensors.safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise LoraError(f"{file} is not a valid .safetensors file: {exc}") from exc


def _hashes(file: Path) -> tuple[str, str]:
    """(sha256 of the file, sha256 of its tensor data): the second is kohya's / A1111's LoRA hash."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(file, "rb") as handle:
        head = handle.read(8)
        (header_len,) = struct.unpack("<Q", head)
        whole.update(head)
        whole.update(handle.read(header_len))
        while block := handle.read(1 << 22):
            whole.update(block)
            data.update(block)
    return whole.hexdigest(), data.hexdigest()


def _parse_keys(
    tensors: Mapping[str, torch.Tensor], file: Path
) -> tuple[LoraFormat, dict[tuple[str, str], dict[str, Any]]]:
    """The file's format and, per (component, path), its tensors by role (down, up, alpha) and key stem."""
    for pattern, kind in _UNSUPPORTED:
        found = next((k for k in tensors if re.search(pattern, k)), None)
        if found is not None:
            raise LoraError(
                f"{file} is a {kind} file (key {found}); only plain LoRA / LoCon (lora_down/lora_up or "
                "lora_A/lora_B pairs) can be applied"
            )
    entries: dict[LoraFormat, dict[tuple[str, str], dict[str, Any]]] = {"kohya": {}, "diffusers": {}}
    others = []
    for key, tensor in tensors.items():
        hit = _kohya_key(key) or _diffusers_key(key)
        if hit is None:
            others.append(key)
            continue
        fmt, component, path, role, stem = hit
        parts = entries[fmt].setdefault((component, path), {"stems": set()})
        if role in parts:
            raise LoraError(f"{file}: {key} and another key both give the {role} weight of {component} {path}")
        parts[role] = tensor
        parts["stems"].add(stem)
    kohya, diffusers = entries["kohya"], entries["diffusers"]
    if not kohya and not diffusers:
        raise LoraError(_not_a_lora(file, tensors))
    if kohya and diffusers:
        raise LoraError(
            f"{file} mixes kohya keys (e.g. {_first_stem(kohya)}) and diffusers keys (e.g. {_first_stem(diffusers)}); "
            "expected one spelling"
        )
    if others:
        raise LoraError(
            f"{file}: {len(others)} tensors are not LoRA weights, e.g. {', '.join(sorted(others)[:3])}; expected "
            "only .lora_down.weight / .lora_up.weight / .alpha (kohya) or .lora_A.weight / .lora_B.weight (diffusers)"
        )
    return ("kohya", kohya) if kohya else ("diffusers", diffusers)


def _first_stem(entries: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    return min(next(iter(entries.values()))["stems"])


def _kohya_key(key: str) -> tuple[LoraFormat, str, str, str, str] | None:
    stem, _, part = key.partition(".")
    role = _KOHYA_PARTS.get(part)
    if role is None:
        return None
    for prefix, component in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return "kohya", component, stem[len(prefix) :], role, stem
    return None


def _diffusers_key(key: str) -> tuple[LoraFormat, str, str, str, str] | None:
    hit = next(((suffix, role) for suffix, role in _DIFFUSERS_PARTS if key.endswith(suffix)), None)
    if hit is None:
        return None
    suffix, role = hit
    stem = key[: -len(suffix)]
    component, _, path = stem.partition(".")
    if component not in COMPONENTS:
        if component not in _UNET_ROOTS:
            return None
        component, path = "unet", stem  # unet.save_attn_procs wrote UNet paths without a prefix
    path = path.replace(".processor.", ".").removesuffix(".processor")
    if suffix.startswith("_lora."):  # attention processors: attn1.processor.to_q_lora -> attn1.to_q
        head, _, name = path.rpartition(".")
        if component == "unet":
            name = "to_out.0" if name == "to_out" else name
        else:
            name = _PROCESSOR_TEXT.get(name, name)
        path = f"{head}.{name}" if head else name
    return "diffusers", component, path, role, stem


def _not_a_lora(file: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    keys = sorted(tensors)
    roots = {k.split(".")[0] for k in keys}
    if roots & {"model", "first_stage_model", "cond_stage_model", "conditioner"}:
        what = "a full Stable Diffusion checkpoint (original layout); load it as a model, not as a LoRA"
    elif roots & {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token"}:
        what = "a textual-inversion embedding, not a LoRA"
    elif roots & {*_UNET_ROOTS, "text_model", "encoder", "decoder", "embeddings"}:
        what = "diffusers/transformers model weights, not a LoRA"
    else:
        what = "no LoRA weights"
    sample = ", ".join(keys[:3]) or "none"
    return (
        f"{file} is not a LoRA file: it holds {len(keys)} tensors (e.g. {sample}), {what}. Expected kohya keys "
        "(lora_unet_* / lora_te_* with .lora_down.weight, .lora_up.weight, .alpha) or diffusers/PEFT keys "
        "(unet.* / text_encoder.* with .lora_A.weight, .lora_B.weight)"
    )


def _peft_configs(metadata: Mapping[str, str], file: Path) -> dict[str, dict[str, Any]]:
    """Per component, the PEFT ``LoraConfig`` fields diffusers stored (``unet.lora_alpha`` ...); {} if none."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as exc:
        raise LoraError(f"{file}: its {PEFT_METADATA_KEY} metadata is not valid JSON: {exc}") from exc
    if not isinstance(flat, dict):
        raise LoraError(f"{file}: its {PEFT_METADATA_KEY} metadata is a {type(flat).__name__}; expected an object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, name = str(key).partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _layer(
    parts: Mapping[str, Any], target: tuple[str, str], peft: Mapping[str, Mapping[str, Any]], file: Path
) -> LoraLayer:
    stem = min(parts["stems"])
    missing = [role for role in ("down", "up") if role not in parts]
    if missing:
        raise LoraError(f"{file}: {stem} has no {' and no '.join(missing)} weight; a LoRA layer needs both")
    alpha = None
    if "alpha" in parts:
        value = parts["alpha"]
        if value.numel() != 1:
            raise LoraError(f"{file}: {stem}.alpha has {value.numel()} values; expected one number")
        alpha = float(value.float().item())
    down, up = parts["down"], parts["up"]
    component, path = target
    if alpha is None and component in peft:
        alpha = _peft_alpha(peft[component], path, int(down.shape[0]), file)
    return LoraLayer(down, up, alpha, key=stem)


def _peft_alpha(config: Mapping[str, Any], path: str, rank: int, file: Path) -> float:
    """The alpha PEFT gives ``path``: its ``alpha_pattern`` entry or ``lora_alpha``; rsLoRA as alpha * sqrt(r)."""
    if config.get("use_dora"):
        raise LoraError(f"{file} is a DoRA adapter (use_dora in its metadata); only plain LoRA can be applied")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", path)  # PEFT's own rule (peft.utils.other.get_pattern_key)
        except re.error as exc:
            raise LoraError(f"{file}: alpha_pattern key {pattern!r} is not a valid pattern: {exc}") from exc
        if found:
            alpha = value
            break
    alpha = float(alpha)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # rsLoRA scales by alpha / sqrt(r)


# ------------------------------------------------------------------------------------------------------------
# Matching layers to a model


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
    ldm = _ldm_paths(module, layers) if component == "unet" else {}
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


def _ldm_paths(unet: Any, paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> its LDM/SGM path (``input_blocks.1.1...``), from the UNet's config."""
    config = getattr(unet, "config", None)
    per_block = getattr(config, "layers_per_block", None)
    if per_block is None:
        return {}
    try:
        per_block = _layers_per_block(per_block)
    except SourceError:
        return {}  # per-level layer counts: LDM block numbers are undefined, only diffusers names resolve
    paths = list(paths)
    ups = {int(p.split(".")[1]) for p in paths if re.match(r"up_blocks\.\d+\.attentions\.", p)}
    out = {}
    for path in paths:
        key = f"{path}.weight"
        ldm = _child(_UNET_ADDITION, key) or _unet_key(key, per_block, ups)
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


# ------------------------------------------------------------------------------------------------------------
# Which model family a LoRA is for


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


# ------------------------------------------------------------------------------------------------------------
# Writing


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
    safetensors_torch = require("safetensors.torch", _FEATURE, "export")
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
        ldm = _ldm_paths(unet, (p for p, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)))
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
    for component in COMPONENTS:
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
