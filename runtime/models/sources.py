"""Model sources: a preset name, a local diffusers folder, or a single-file checkpoint. All offline."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import checkpoint_format, read_json_object, sha256_file
from sdtrt.runtime.models.bundle import ModelBundle, bundle_from_modules
from sdtrt.runtime.models.presets import PRESETS, config_folder, load_preset, preset_configs, shipped_config

log = logging.getLogger(__name__)

DIFFUSERS_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
XL_PARTS = ("text_encoder_2", "tokenizer_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def load_source(source: str, *, allow_pickle: bool = False, config_dir: str | Path | None = None) -> ModelBundle:
    """Load ``source`` (preset name, diffusers folder or checkpoint file) as fp32 modules on the CPU."""
    path = Path(source).expanduser()
    if source in PRESETS and not (path / "model_index.json").is_file():
        return load_preset(source)  # a preset name wins over a same-named folder that holds no model
    if path.is_dir():
        return load_diffusers_folder(path, allow_pickle=allow_pickle)
    if path.is_file():
        return load_checkpoint(path, allow_pickle=allow_pickle, config_dir=config_dir)
    if source in PRESETS:
        return load_preset(source)
    if "/" in source or "\\" in source or path.suffix:
        raise SourceError(
            f"model source {source!r} does not exist; give a diffusers model folder, a .safetensors "
            f"checkpoint, or a preset ({', '.join(PRESETS)})"
        )
    raise SourceError(
        f"unknown preset {source!r}; the presets are {', '.join(PRESETS)}, or give the path of a diffusers "
        "model folder or a .safetensors checkpoint"
    )


def load_diffusers_folder(folder: Path, *, allow_pickle: bool = False) -> ModelBundle:
    """A folder as saved by ``StableDiffusionPipeline.save_pretrained`` (or the SDXL pipeline's)."""
    index, xl = _check_diffusers_folder(folder)
    parts = ("text_encoder", "text_encoder_2", "unet", "vae") if xl else ("text_encoder", "unet", "vae")
    formats = {part: _weights_format(folder / part) for part in parts}
    pickled = [part for part, fmt in formats.items() if fmt == "pickle"]
    if pickled and not allow_pickle:
        raise SourceError(
            f"{str(folder)!r} holds the weights of {', '.join(pickled)} as pickle files (.bin/.pt/.ckpt), which "
            "can run code when loaded. Convert them to .safetensors, or pass --allow-pickle if you trust "
            "this model"
        )
    from sdtrt.runtime.models.tokenizer import tokenizer_from_folder

    text_encoder, text_encoder_2, unet, vae = _load_folder_modules(folder, formats, xl)
    tokenizers = (
        tokenizer_from_folder(folder / "tokenizer"),
        tokenizer_from_folder(folder / "tokenizer_2") if xl else None,
    )
    source = {
        "kind": "diffusers",
        "path": str(folder.resolve()),
        "sha256": folder_hash(folder),
        "allow_pickle": allow_pickle,
        "description": f"diffusers folder {folder.resolve()}",
    }
    return bundle_from_modules(
        text_encoder,
        unet,
        vae,
        read_json_object(folder / "scheduler" / "scheduler_config.json"),
        source,
        text_encoder_2=text_encoder_2,
        pipeline_config=index,
        tokenizers=tokenizers,
    )


def _check_diffusers_folder(folder: Path) -> tuple[dict[str, Any], bool]:
    """(model_index.json, whether it is SDXL) of a complete diffusers folder; names what a partial one lacks."""
    missing = [p for p in DIFFUSERS_PARTS if not (folder / p).is_dir()]
    if not (folder / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise SourceError(
            f"{str(folder)!r} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}. "
            "Expected model_index.json and the subfolders " + ", ".join(DIFFUSERS_PARTS)
        )
    index = read_json_object(folder / "model_index.json")
    xl = "text_encoder_2" in index or (folder / "text_encoder_2").is_dir()
    if xl:
        lacking = [p for p in XL_PARTS if not (folder / p).is_dir()]
        if lacking:
            raise SourceError(
                f"{str(folder)!r} is an SDXL folder (model_index.json names text_encoder_2) but lacks "
                f"{', '.join(lacking)}; copy the model's complete folder"
            )
    return index, xl


def _load_folder_modules(folder: Path, formats: dict[str, str | None], xl: bool) -> tuple[Any, Any, Any, Any]:
    """(text encoder, text encoder 2 or None, UNet, VAE) of a diffusers folder: fp32, eval mode, frozen."""
    diffusers = require("diffusers", "loading a diffusers folder", "export")
    transformers = require("transformers", "loading a diffusers folder", "export")

    def options(part: str) -> dict[str, Any]:
        return {"local_files_only": True, "use_safetensors": formats[part] != "pickle"}

    text_encoder_2 = None
    try:
        text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", **options("text_encoder"))
        if xl:
            text_encoder_2 = transformers.CLIPTextModelWithProjection.from_pretrained(
                folder / "text_encoder_2", **options("text_encoder_2")
            )
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **options("unet"))
        vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", **options("vae"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"could not load the model in {str(folder)!r}: {exc}") from exc
    for module in (text_encoder, text_encoder_2, unet, vae):
        if module is not None:
            module.float().eval().requires_grad_(False)
    return text_encoder, text_encoder_2, unet, vae


def load_checkpoint(path: Path, *, allow_pickle: bool = False, config_dir: str | Path | None = None) -> ModelBundle:
    """A single-file checkpoint in the original layout (SD 1.x, or SDXL's), converted with shipped configs.

    ``config_dir`` is a shipped config name (``sd15``, ``sdxl``, ``sdxl-turbo``: Turbo checkpoints hold the same
    tensors as SDXL base, only the config says 512 px and one-step sampling) or a diffusers-layout folder.
    """
    xl = _is_sdxl_checkpoint(path, allow_pickle)
    shipped = "sdxl" if xl else "sd15"
    config = config_folder(config_dir, shipped)
    text_encoder_2 = None
    if xl:
        from sdtrt.runtime.models.single_file_xl import load_sdxl_single_file

        text_encoder, text_encoder_2, unet, vae = load_sdxl_single_file(
            path, config_dir=config, allow_pickle=allow_pickle
        )
    else:
        from sdtrt.runtime.models.single_file import load_single_file

        text_encoder, unet, vae = load_single_file(path, config_dir=config, allow_pickle=allow_pickle)
    # A config folder may describe only the networks; the scheduler and model index then come from the shipped one.
    scheduler_file, index_file = "scheduler/scheduler_config.json", "model_index.json"
    scheduler = read_json_object(_own_or_shipped(config, scheduler_file, shipped))
    index = read_json_object(_own_or_shipped(config, index_file, shipped))
    source = {
        "kind": "single_file",
        "path": str(path.resolve()),
        "config_dir": str(config.resolve()),
        "sha256": sha256_file(path),
        "allow_pickle": allow_pickle,
        "description": f"checkpoint {path.name}",
    }
    return bundle_from_modules(
        text_encoder, unet, vae, scheduler, source, text_encoder_2=text_encoder_2, pipeline_config=index
    )


def _own_or_shipped(config: Path, file: str, shipped: str) -> Path:
    return config / file if (config / file).is_file() else shipped_config(shipped) / file


def _is_sdxl_checkpoint(path: Path, allow_pickle: bool) -> bool:
    """Whether a checkpoint holds SDXL's two text encoders; a safetensors file is judged by its header alone."""
    from sdtrt.runtime.models.single_file import is_sdxl_state, read_state_dict

    if checkpoint_format(path) == "safetensors":
        safetensors = require("safetensors", "single-file checkpoints", "export")
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise SourceError(f"{path} is not a valid .safetensors file: {exc}") from exc
    else:
        keys = list(read_state_dict(path, allow_pickle=allow_pickle))
    return is_sdxl_state(keys)


def reload_source(source: dict[str, Any]) -> ModelBundle:
    """Load the PyTorch model an artifact was exported from, as its manifest describes it."""
    kind = source.get("kind")
    if kind == "preset":
        return load_preset(source["name"], seed=int(source.get("seed", 0)))
    if kind == "diffusers":
        return load_diffusers_folder(Path(source["path"]), allow_pickle=bool(source.get("allow_pickle")))
    if kind == "single_file":
        return load_checkpoint(
            Path(source["path"]), allow_pickle=bool(source.get("allow_pickle")), config_dir=source.get("config_dir")
        )
    raise SourceError(f"manifest source kind {kind!r} is not one of preset, diffusers, single_file")


def _weights_format(folder: Path) -> str | None:
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    if any(p.suffix in (".bin", ".pt", ".ckpt", ".pth") for p in folder.iterdir()):
        return "pickle"
    return None


def folder_hash(folder: Path) -> str:
    """Hash of every weight and config file in the folder (relative names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.suffix in WEIGHT_SUFFIXES or file.suffix == ".json":
            digest.update(str(file.relative_to(folder)).encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def native_size(source: str, config_dir: str | Path | None = None) -> int:
    """The image side ``source`` was trained at (UNet sample size x VAE factor), read from configs alone.

    Nothing is built or loaded, so commands can choose their default size before loading a model. 512 when the
    configs do not say.
    """
    path = Path(source).expanduser()
    if source in PRESETS and not (path / "model_index.json").is_file():
        _, unet, vae, _ = preset_configs(source)
    elif path.is_dir():
        unet = read_json_object(path / "unet" / "config.json")
        vae = read_json_object(path / "vae" / "config.json")
    elif path.is_file():
        # Only a safetensors header is read here; a pickle file is not opened before the user allows it.
        xl = checkpoint_format(path) == "safetensors" and _is_sdxl_checkpoint(path, allow_pickle=False)
        folder = config_folder(config_dir, "sdxl" if xl else "sd15")
        unet = read_json_object(folder / "unet" / "config.json")
        vae = read_json_object(folder / "vae" / "config.json")
    else:
        return 512
    sample = unet.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, list) else sample
    return int(sample) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
