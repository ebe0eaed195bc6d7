"""ControlNet models from the files users have: a diffusers folder, or one checkpoint file in either layout.

A diffusers folder holds ``config.json`` and the weights. A single file has no config: its keys are either
diffusers' (``controlnet_cond_embedding.*``, ``down_blocks.*``) or the original ``cldm`` layout that A1111 and
ComfyUI users have (``control_model.input_hint_block.*``, ``control_model.zero_convs.N.0.*``; some files leave out
the ``control_model.`` prefix). Its family (SD 1.x, SD 2.x, SDXL) is read from the weights' shapes, and picks the
shipped config of that family unless a config folder is given. Every weight is checked against the config, by name
and shape, before anything is loaded, and the original layout is written back by the exact inverse mapping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ArtifactError, SourceError
from sdtrt.runtime.files import checkpoint_format, read_json_object, sha256_file
from sdtrt.runtime.ldm_names import controlnet_key, layers_per_block
from sdtrt.runtime.models.presets import shipped_config
from sdtrt.runtime.models.single_file import read_state_dict, rename_weights, write_checkpoint
from sdtrt.runtime.models.sources import folder_hash
from sdtrt.runtime.specs import ModelInfo

# diffusers.ControlNetModel: an optional extra whose lazy module type checkers cannot follow.
ControlNetModel = Any

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
FORMATS = ("diffusers_folder", "diffusers_file", "original_file")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
FAMILY_CONFIGS = {"sd1": "controlnet-sd15", "sd2": "controlnet-sd21", "sdxl": "controlnet-sdxl"}
# Hint-encoder widths for ControlNets of the tiny presets: four levels, so the hint is downsampled 8x, as the VAE.
TINY_HINT_CHANNELS = (4, 8, 8, 16)
_FEATURE = "ControlNet models"
# diffusers saves these names; the first present is read (a sharded model is found through its index file).
_FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass(frozen=True)
class ControlNetShape:
    """What a ControlNet's weight shapes say about the models it fits, known before it is built."""

    name: str
    family: str
    cross_attention_dim: int
    in_channels: int


@dataclass(frozen=True, eq=False)
class ControlNetSource:
    """A loaded ControlNet (fp32, eval mode, frozen, on the CPU) and where it came from.

    ``name`` is the folder or file stem (``control_v11p_sd15_canny``); ``family`` is ``sd1``, ``sd2`` or ``sdxl``,
    read from the weights; ``format`` is one of ``FORMATS``; ``config_dir`` the config used for a single file.
    """

    name: str
    family: str
    cross_attention_dim: int
    model: ControlNetModel
    path: Path
    sha256: str
    format: str
    config_dir: Path | None = None
    allow_pickle: bool = False

    @property
    def shape(self) -> ControlNetShape:
        """The family facts ``check_controlnet_family`` compares."""
        return ControlNetShape(self.name, self.family, self.cross_attention_dim, int(self.model.config.in_channels))

    @property
    def residual_count(self) -> int:
        """How many residuals the ControlNet gives the UNet: one per down-block output, plus the middle block's."""
        return len(self.model.controlnet_down_blocks) + 1

    @property
    def source(self) -> dict[str, Any]:
        """What a manifest records, enough for ``reload_controlnet`` to load the same ControlNet again."""
        return {
            "kind": "controlnet",
            "name": self.name,
            "family": self.family,
            "format": self.format,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "config_dir": _config_record(self.config_dir),
            "allow_pickle": self.allow_pickle,
        }


def load_controlnet(
    source: str | os.PathLike[str], *, allow_pickle: bool = False, config_dir: str | os.PathLike[str] | None = None
) -> ControlNetSource:
    """Load a ControlNet from a diffusers folder or a single ``.safetensors`` file (diffusers or original layout).

    ``config_dir`` is a folder with the ControlNet's ``config.json`` (or a shipped ControlNet config name) for a
    single file whose architecture is not the standard one of its family; a diffusers folder carries its own.
    Pickle files are refused unless ``allow_pickle``, then read with ``torch.load(weights_only=True)``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        config_used = None  # a diffusers folder carries its own config
        config_file = path / "config.json"
        config = _folder_config(path)  # first: a folder that is no ControlNet is named before weights are read
        state, fmt = _folder_tensors(path, allow_pickle), "diffusers_folder"
    elif path.is_file():
        state, fmt = _control_weights(_file_tensors(path, allow_pickle), path)
    else:
        raise SourceError(
            f"ControlNet {str(path)!r} does not exist; expected a diffusers ControlNet folder (config.json and "
            "diffusion_pytorch_model.safetensors) or a ControlNet .safetensors file"
        )
    family, cross = controlnet_family(state, path)
    if fmt != "diffusers_folder":
        config_used = _config_folder(config_dir, family)
        config_file = config_used / "config.json"
        config = read_json_object(config_file, "a diffusers ControlNet folder has config.json")
    model = _build(config, path)
    names = _original_names(model) if fmt == "original_file" else {k: k for k in model.state_dict()}
    _load_weights(model, state, names, path, config_file, own_config=config_used is None)
    logger.info("loaded %s ControlNet %s (%s)", FAMILY_NAMES[family], path, fmt)
    return ControlNetSource(
        name=(path.resolve().name if path.is_dir() else path.stem),
        family=family,
        cross_attention_dim=cross,
        model=model,
        path=path,
        sha256=folder_hash(path) if path.is_dir() else sha256_file(path),
        format=fmt,
        config_dir=config_used,
        allow_pickle=allow_pickle,
    )


def reload_controlnet(source: Mapping[str, Any]) -> ControlNetSource:
    """The ControlNet a manifest's ``ControlNetSource.source`` record describes, refused if its file changed."""
    loaded = load_controlnet(
        source["path"], allow_pickle=bool(source.get("allow_pickle")), config_dir=source.get("config_dir")
    )
    if source.get("sha256") and loaded.sha256 != source["sha256"]:
        raise SourceError(
            f"ControlNet {source['path']} changed since it was recorded: sha256 {loaded.sha256}, recorded "
            f"{source['sha256']}; export again from the file as it is now"
        )
    return loaded


def recorded_controlnet(extra: Mapping[str, Any], component: str) -> ControlNetModel:
    """The ControlNet module a manifest component's ``extra["controlnet"]["source"]`` record names."""
    record = extra.get("controlnet", {}).get("source")
    if not record:
        raise ArtifactError(f"{component} records no ControlNet source to load; add the ControlNet again")
    return reload_controlnet(record).model


def peek_controlnet(source: str | os.PathLike[str], *, allow_pickle: bool = False) -> ControlNetShape:
    """The family facts of a ControlNet folder or file, from a safetensors header alone (no weights are read), so
    a command can refuse a ControlNet for another model before any work."""
    path = Path(source).expanduser()
    if path.is_dir():
        _folder_config(path)
        state, _ = _control_weights(_folder_tensors(path, allow_pickle, shapes_only=True), path)
    elif path.is_file():
        state, _ = _control_weights(_file_tensors(path, allow_pickle, shapes_only=True), path)
    else:
        raise SourceError(f"ControlNet {str(path)!r} does not exist; expected a ControlNet folder or file")
    family, cross = controlnet_family(state, path)
    conv_in = state.get("conv_in.weight", state.get("input_blocks.0.0.weight"))
    if conv_in is None or conv_in.ndim != 4:
        raise SourceError(f"{path}: the ControlNet has no input convolution (conv_in / input_blocks.0.0)")
    return ControlNetShape(path.resolve().name if path.is_dir() else path.stem, family, cross, int(conv_in.shape[1]))


def _config_record(config_dir: Path | None) -> str | None:
    # A shipped config is recorded by name, so the record holds wherever sdtrt is installed.
    if config_dir is None:
        return None
    shipped = {shipped_config(name).resolve(): name for name in FAMILY_CONFIGS.values()}
    return shipped.get(config_dir.resolve(), str(config_dir.resolve()))


def controlnet_family(state: Mapping[str, torch.Tensor], file: Path | str = "ControlNet") -> tuple[str, int]:
    """(family, cross-attention width) of ControlNet weights in either layout, from their shapes alone.

    SDXL's has the size/crop addition embedding; otherwise SD 2.x's attends to 1024-wide text, SD 1.x's to 768.
    """
    widths = {int(v.shape[1]) for k, v in state.items() if k.endswith("attn2.to_k.weight") and v.ndim == 2}
    if len(widths) != 1:
        found = "no cross-attention weights (attn2.to_k)" if not widths else f"cross-attention widths {widths}"
        raise SourceError(
            f"{file}: expected a ControlNet with one cross-attention width (768 for SD 1.x, 1024 for SD 2.x, "
            f"2048 for SDXL), found {found}; this is not a Stable Diffusion ControlNet"
        )
    cross = widths.pop()
    if any(k.startswith(("add_embedding.", "label_emb.")) for k in state):
        return "sdxl", cross
    return ("sd2" if cross == 1024 else "sd1"), cross


def check_controlnet_family(controlnet: ControlNetSource | ControlNetShape, model: ModelInfo | str | Any) -> None:
    """Refuse a ControlNet made for another model family or width than ``model``'s.

    ``controlnet`` is a loaded one or what ``peek_controlnet`` read; ``model`` is a ``ModelInfo``, a family name,
    or anything with a ``.model`` ``ModelInfo`` (a bundle, a manifest).
    """
    controlnet = controlnet.shape if isinstance(controlnet, ControlNetSource) else controlnet
    info = model if isinstance(model, ModelInfo) else getattr(model, "model", None)
    family = model if isinstance(model, str) else getattr(info, "family", None)
    if family not in FAMILY_NAMES:
        raise SourceError(f"expected a model family ({', '.join(FAMILY_NAMES)}) or its ModelInfo, found {model!r}")
    mine, theirs = FAMILY_NAMES[controlnet.family], FAMILY_NAMES[family]
    width = f" ({info.context_width})" if isinstance(info, ModelInfo) else ""
    if controlnet.family != family:
        raise SourceError(
            f"ControlNet {controlnet.name}: an {mine} ControlNet (cross-attention {controlnet.cross_attention_dim}) "
            f"on an {theirs} model{width}: use a ControlNet for {theirs}"
        )
    if not isinstance(info, ModelInfo):
        return
    if controlnet.cross_attention_dim != info.context_width or controlnet.in_channels != info.latent_channels:
        raise SourceError(
            f"ControlNet {controlnet.name} attends to {controlnet.cross_attention_dim}-wide text and takes "
            f"{controlnet.in_channels} latent channels, but the {theirs} model has {info.context_width} and "
            f"{info.latent_channels}: it was made for another model; use a ControlNet trained for this one"
        )


# ------------------------------------------------------------------------------------------------------------
# Reading


def _control_weights(state: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the ControlNet's weights, format) of a single file; a file that holds no ControlNet is named and refused."""
    if "lora_controlnet" in state:  # Stability's Control-LoRA marks itself with this key
        raise SourceError(
            f"{file} is a Control-LoRA (low-rank ControlNet weights that patch the model's own UNet), which is not "
            "supported; give a full ControlNet (a diffusers folder or a control_model.* .safetensors file)"
        )
    if any(k.startswith(CONTROL_PREFIX) for k in state):
        # Some early ControlNet files carry a whole SD model beside it; only the ControlNet is read.
        control = {k[len(CONTROL_PREFIX) :]: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)}
        if len(control) < len(state):
            logger.info("%s: ignoring %d tensors outside %s", file, len(state) - len(control), CONTROL_PREFIX)
        return control, "original_file"
    if any(k.startswith("input_hint_block.") for k in state):
        return state, "original_file"
    if any(k.startswith("controlnet_cond_embedding.") for k in state):
        return state, "diffusers_file"
    sample = ", ".join(sorted(state)[:3]) or "none"
    raise SourceError(
        f"{file} is not a ControlNet: {_what_it_is(state)} ({len(state)} tensors, e.g. {sample}). Expected "
        f"ControlNet weights under {CONTROL_PREFIX} or input_hint_block. (original layout) or "
        "controlnet_cond_embedding. (diffusers layout); give a ControlNet file"
    )


def _what_it_is(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        xl = any(k.startswith("conditioner.embedders.") for k in keys)
        return f"it is an {'SDXL' if xl else 'SD'} model checkpoint (a UNet under model.diffusion_model.)"
    if any("lora_" in k or ".lora." in k or ".lora_A." in k for k in keys):
        return "it is a LoRA"
    if any(k.startswith("up_blocks.") for k in keys) and any(k.startswith("conv_out.") for k in keys):
        return "it is a diffusers UNet's weights"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "it is a VAE's weights"
    return "it holds no ControlNet weights"


def _folder_config(folder: Path) -> dict[str, Any]:
    if (folder / "model_index.json").is_file():
        hint = " its controlnet/ subfolder" if (folder / "controlnet" / "config.json").is_file() else " a ControlNet"
        raise SourceError(
            f"{str(folder)!r} is a diffusers pipeline folder (model_index.json), not a ControlNet folder; give{hint}"
        )
    config = read_json_object(folder / "config.json", "a diffusers ControlNet folder has config.json")
    kind = config.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise SourceError(
            f"{folder / 'config.json'} describes a {kind}; expected a ControlNetModel folder (config.json with "
            '"_class_name": "ControlNetModel" and diffusion_pytorch_model.safetensors)'
        )
    return config


def _folder_tensors(folder: Path, allow_pickle: bool, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    index = folder / _SHARD_INDEX
    if index.is_file():
        shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_file_tensors(folder / shard, allow_pickle, shapes_only))
        return state
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return _file_tensors(folder / name, allow_pickle, shapes_only)
    raise SourceError(
        f"ControlNet folder {str(folder)!r} has a config.json but no weights; expected one of "
        f"{', '.join(_FOLDER_WEIGHTS)}"
    )


def _file_tensors(file: Path, allow_pickle: bool, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """A file's tensors; with ``shapes_only``, a safetensors file gives empty tensors of its header's shapes."""
    if not shapes_only or checkpoint_format(file) != "safetensors":
        return read_state_dict(file, allow_pickle=allow_pickle)
    safetensors = require("safetensors", _FEATURE, "export")
    try:
        with safetensors.safe_open(str(file), framework="pt") as handle:
            return {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise SourceError(f"{file} is not a valid .safetensors file: {exc}") from exc


def _config_folder(config_dir: str | os.PathLike[str] | None, family: str) -> Path:
    if config_dir is None:
        return shipped_config(FAMILY_CONFIGS[family])
    name = str(config_dir)
    if name in FAMILY_CONFIGS.values() and not Path(name).is_dir():
        return shipped_config(name)
    folder = Path(config_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"ControlNet config {name!r} is neither a shipped ControlNet config ({', '.join(FAMILY_CONFIGS.values())}) "
            "nor a folder with a config.json; give one of those (save_pretrained writes such a folder)"
        )
    return folder


def _build(config: Mapping[str, Any], file: Path) -> ControlNetModel:
    diffusers = require("diffusers", _FEATURE, "export")
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; keep the caller's RNG
            model = diffusers.ControlNetModel.from_config(settings)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{file}: its ControlNet config cannot build a model: {exc}") from exc
    return model.eval().requires_grad_(False)


def _original_names(model: ControlNetModel) -> dict[str, str]:
    """Every diffusers key of ``model`` -> its name in the original layout (no ``control_model.`` prefix)."""
    per_block = layers_per_block(model.config.layers_per_block, layout="original ControlNet")
    hint_blocks = len(model.controlnet_cond_embedding.blocks)
    names = {}
    for key in model.state_dict():
        name = controlnet_key(key, per_block, hint_blocks)
        if name is None:
            raise SourceError(
                f"ControlNet weight {key!r} has no place in the original ControlNet layout; only SD 1.x/2.x/SDXL-"
                "shaped ControlNets map (give a diffusers folder or a diffusers-layout file instead)"
            )
        names[key] = name
    return names


def _load_weights(
    model: ControlNetModel,
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    file: Path,
    config: Path,
    own_config: bool = False,
) -> None:
    """Copy ``state`` (file names) into ``model`` (``names`` maps its keys to them) after checking names and shapes.

    ``own_config``: the config came with the weights (a diffusers folder), so no other config can be chosen.
    """
    own = model.state_dict()
    wanted = {names[key]: key for key in own}
    missing = [name for name in wanted if name not in state]
    unknown = [name for name in state if name not in wanted]
    fix = (
        "the folder's config.json and weights come from different models; save the ControlNet again"
        if own_config
        else f"if its architecture differs from {config}, pass config_dir= a folder with its config.json"
    )
    if missing or unknown:
        raise SourceError(
            f"{file}: the ControlNet weights do not fit {config}: {len(missing)} missing (e.g. "
            f"{', '.join(missing[:3]) or 'none'}), {len(unknown)} unknown (e.g. {', '.join(unknown[:3]) or 'none'}); "
            f"{fix}"
        )
    for name, key in wanted.items():
        if tuple(state[name].shape) != tuple(own[key].shape):
            raise SourceError(
                f"{file}: {name} has shape {list(state[name].shape)} but {config} needs {list(own[key].shape)}; {fix}"
            )
        if not state[name].is_floating_point():
            raise SourceError(f"{file}: {name} holds {state[name].dtype} values; expected floating-point weights")
    model.load_state_dict({key: state[name] for name, key in wanted.items()}, strict=True)  # copies, as fp32


# ------------------------------------------------------------------------------------------------------------
# Writing, and ControlNets for tests and benchmarks


def controlnet_to_original(model: ControlNetModel) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel``'s weights under the original ``cldm`` names, without the prefix."""
    names = _original_names(model)
    return rename_weights(model.state_dict(), names.__getitem__, "ControlNet", layout="original ControlNet")


def save_original_controlnet(model: ControlNetModel, path: str | os.PathLike[str], *, prefix: bool = True) -> Path:
    """Write ``model`` as one ``.safetensors`` file in the original layout, atomically: keys under
    ``control_model.`` as A1111/ComfyUI files have them, or without that prefix when ``prefix`` is False."""
    return write_checkpoint({CONTROL_PREFIX if prefix else "": controlnet_to_original(model)}, path)


def controlnet_from_unet(
    unet: Any, *, seed: int = 0, hint_channels: tuple[int, ...] = (16, 32, 96, 256), gain: float = 1.0
) -> ControlNetModel:
    """A ControlNet copied from ``unet``'s encoder whose zero convolutions hold seeded random values.

    diffusers starts a ControlNet with its output convolutions at zero, so it changes nothing; tests and benchmarks
    need one that does. ``hint_channels`` are the hint encoder's widths, one level per 2x downsampling; ``gain``
    multiplies the residual convolutions (a stronger effect on the image).
    """
    diffusers = require("diffusers", _FEATURE, "export")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
        zero_convs = [
            *model.controlnet_down_blocks,
            model.controlnet_mid_block,
            model.controlnet_cond_embedding.conv_out,
        ]
        for conv in zero_convs:
            conv.reset_parameters()  # an untrained convolution's usual random start
        for conv in zero_convs[:-1]:
            conv.weight.data.mul_(gain)
            conv.bias.data.mul_(gain)
    return model.float().eval().requires_grad_(False)
