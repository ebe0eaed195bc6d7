"""LoRA files read into layers: the two key spellings, PEFT alphas, hashes, and the components a LoRA can change.

Two ``.safetensors`` spellings are read:

* kohya / A1111: ``lora_unet_*``, ``lora_te_*`` (SD 1.x/2.x) or ``lora_te1_*`` / ``lora_te2_*`` (SDXL) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``. Module names have their dots replaced by ``_``, and
  the UNet part uses either diffusers names (``down_blocks_0_attentions_0_...``) or the original LDM/SGM block
  names (``input_blocks_1_1_...``, ``middle_block_1_...``, ``output_blocks_...``).
* diffusers / PEFT, as ``save_lora_weights`` writes it: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also
  ``text_encoder.`` / ``text_encoder_2.``), alphas in the ``lora_adapter_metadata`` JSON of the file's metadata;
  and the older ``.lora.down.weight``, ``.lora_linear_layer.down.weight`` and ``processor.to_q_lora.down.weight``.

A layer keeps the path as the file names it; ``match`` resolves it against a model. The delta of a layer is
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, LoraError, SourceError
from sdtrt.runtime.files import checkpoint_format

logger = logging.getLogger(__name__)

# The components a LoRA can change, in the order they are updated.
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
LoraFormat = Literal["kohya", "diffusers"]
PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's lora_alpha when a config leaves it out
LORA_FEATURE = "LoRA files"  # what a missing extra is needed for
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


@dataclass(frozen=True, repr=False)
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

    def __repr__(self) -> str:
        # Shapes, never values: a layer's tensors print as thousands of lines.
        alpha = "none" if self.alpha is None else f"{self.alpha:g}"
        return (
            f"LoraLayer({self.key or '?'}, rank {self.rank}, down {list(self.down.shape)}, "
            f"up {list(self.up.shape)}, alpha {alpha})"
        )

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


@dataclass(frozen=True, repr=False)
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
        strange = sorted({c for c, _ in self.layers if c not in LORA_COMPONENTS})
        if strange:
            raise ConfigError(f"LoRA components {strange}; expected some of {', '.join(LORA_COMPONENTS)}")

    def __repr__(self) -> str:
        # One line a person can read: printing every layer's tensors runs to thousands of lines.
        return f"LoraFile({Path(self.path).name}, {self.format}, {len(self.layers)} layers, {self.short_hash or '-'})"

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in "Lora hashes": the file's ``sshs_model_hash``, else the addnet hash."""
        recorded = self.metadata.get("sshs_model_hash", "")
        if re.fullmatch(r"[0-9a-fA-F]{12,64}", recorded):
            return recorded[:12].lower()
        return self.addnet_hash[:12]


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
    safetensors = require("safetensors", LORA_FEATURE, "export")
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
    if component not in LORA_COMPONENTS:
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
