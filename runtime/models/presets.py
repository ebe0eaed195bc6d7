"""Built-in models, and the model configs shipped with sdtrt.

``shapes`` (trained, for the demo and quality figures) and six with seeded random weights: ``tiny``, ``tiny-xl``,
and their inpainting variants ``tiny-inpaint`` and ``tiny-xl-inpaint`` (9-channel UNets) for tests,
``sd15-random`` and ``sdxl-random`` for benchmarks.

``shapes`` is a small SD 1.x model trained by sdtrt on drawn images of coloured shapes: it draws what its prompt
asks for ("a red circle on a blue background"), so quality can be measured on images. It ships as one fp16
safetensors file and a JSON record (configs, training settings, sha256, measured quality) in
``sdtrt/runtime/models/data``; loading checks the file's sha256 against the record first, so a damaged or replaced
file is refused with a clear message instead of producing wrong images. The weights are made by
``python -m sdtrt.shapes.train --out runtime/models/data``.

``tiny`` has the SD 1.x layout (CLIP text encoder, cross-attention UNet, 8x VAE) with a few channels per layer,
so it exports and runs in seconds on a CPU. ``sd15-random`` is the real SD 1.5 architecture (859.5 M UNet
parameters) from the shipped ``sd15`` configs; its weights are random, so its images are noise, but its cost is
that of SD 1.5. ``tiny-xl`` and ``sdxl-random`` are the same for SDXL: two text encoders, pooled text embeddings
and time ids; ``sdxl-random`` is SDXL base 1.0's architecture (2.57 B UNet parameters, cross-attention 2048) from
the shipped ``sdxl`` configs.

The shipped configs (``sdtrt/runtime/models/configs/<name>``, diffusers layout) also describe single-file
checkpoints, which carry weights but no config: ``shipped_config(name)`` is their one way in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.models.bundle import ModelBundle, bundle_from_modules

PRESETS = ("tiny", "tiny-xl", "shapes", "sd15-random", "sdxl-random", "tiny-inpaint", "tiny-xl-inpaint")
PRESET_SEED = 0
# sdxl-turbo holds the same tensors as sdxl base; only its config says 512 px and one-step sampling.
SHIPPED_CONFIG_NAMES = ("sd15", "sdxl", "sdxl-turbo")
# One ControlNet config.json each, for ControlNet files of that family that carry no config. Kept apart from the
# model configs above, which are whole diffusers pipeline folders (a model's --config-dir cannot be one of these).
SHIPPED_CONTROLNET_CONFIG_NAMES = ("controlnet-sd15", "controlnet-sd21", "controlnet-sdxl")
_CONFIGS_DIR = Path(__file__).parent / "configs"

DATA_DIR = Path(__file__).parent / "data"
SHAPES_WEIGHTS_NAME = "shapes.safetensors"
SHAPES_RECORD_NAME = "shapes.json"
_SHAPES_MODULES = ("text_encoder", "unet", "vae")
_RETRAIN = "reinstall sdtrt, or retrain with `python -m sdtrt.shapes.train --out runtime/models/data`"
# ControlNets shipped with sdtrt, by the name `sdtrt export --controlnet` takes: their folders (diffusers layout,
# trained by sdtrt; each one's record is the folder name + ".json" beside it), and the name each gets in an
# artifact unless the user chooses one.
SHIPPED_CONTROLNETS: dict[str, Path] = {"shapes-outline": DATA_DIR / "shapes-outline"}
SHIPPED_CONTROLNET_NAMES: dict[str, str] = {"shapes-outline": "outline"}
CONTROLNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_RETRAIN_CONTROL = "reinstall sdtrt, or retrain with `python -m sdtrt.shapes.train_control --out runtime/models/data`"

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The tiny model is meant for images from 64x64 to 256x256.
TINY_SIZES = (64, 128, 256)

# tiny-xl: SDXL's layout (no attention at the top level, deeper transformers below, text_time conditioning,
# two text encoders whose widths add up to the cross-attention width) with a few channels per layer.
TINY_XL_TIME_DIM = 8
TINY_XL_TEXT_2: dict[str, Any] = {
    **TINY_TEXT,
    "hidden_size": 32,
    "intermediate_size": 48,
    "hidden_act": "gelu",
    "projection_dim": 24,
    "pad_token_id": 0,
}
TINY_XL_UNET: dict[str, Any] = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": TINY_TEXT["hidden_size"] + TINY_XL_TEXT_2["hidden_size"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_XL_TIME_DIM,
    "projection_class_embeddings_input_dim": TINY_XL_TEXT_2["projection_dim"] + 6 * TINY_XL_TIME_DIM,
}
TINY_XL_VAE: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_INDEX = {"force_zeros_for_empty_prompt": True}
# tiny-inpaint and tiny-xl-inpaint: the same with an inpainting UNet, whose input is the 4 latent channels, the
# mask and the masked image's 4 latent channels. Its random input convolution weighs all 9 (none is zero), so a
# mask or masked image fed wrongly changes the prediction.
INPAINT_IN_CHANNELS = 2 * TINY_VAE["latent_channels"] + 1
TINY_INPAINT_UNET: dict[str, Any] = {**TINY_UNET, "in_channels": INPAINT_IN_CHANNELS}
TINY_XL_INPAINT_UNET: dict[str, Any] = {**TINY_XL_UNET, "in_channels": INPAINT_IN_CHANNELS}
# The guidance scale a preset is meant to run at, where it has one: shapes' 2 was chosen on its training prompts
# (1.5 to 8 tried) and is the one its recorded quality was measured with. The others are run as SD usually is.
PRESET_GUIDANCE: dict[str, float] = {"shapes": 2.0}


def shipped_config(name: str) -> Path:
    """The diffusers-layout config folder shipped as ``name`` (in ``SHIPPED_CONFIG_NAMES`` or
    ``SHIPPED_CONTROLNET_CONFIG_NAMES``)."""
    if name not in SHIPPED_CONFIG_NAMES + SHIPPED_CONTROLNET_CONFIG_NAMES:
        names = ", ".join(SHIPPED_CONFIG_NAMES + SHIPPED_CONTROLNET_CONFIG_NAMES)
        raise SourceError(f"no shipped config {name!r}; the shipped configs are {names}")
    return _CONFIGS_DIR / name


def config_folder(config_dir: str | Path | None, default: str) -> Path:
    """A shipped config name or a folder; the shipped ``default`` when none is given."""
    if config_dir is None:
        return shipped_config(default)
    name = str(config_dir)
    if name in SHIPPED_CONFIG_NAMES and not Path(name).is_dir():
        return shipped_config(name)
    folder = Path(config_dir).expanduser()
    if not folder.is_dir():
        raise SourceError(
            f"config {name!r} is neither a shipped config ({', '.join(SHIPPED_CONFIG_NAMES)}) nor a folder; give "
            "one of those names or a diffusers-layout folder with unet/, vae/ and text_encoder/ configs"
        )
    return folder


def _shipped_json(name: str, file: str) -> dict[str, Any]:
    data = json.loads((shipped_config(name) / file).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def _shipped_scheduler(name: str) -> dict[str, Any]:
    # Read whole: its _class_name says which sampler the model runs with.
    return json.loads((shipped_config(name) / "scheduler" / "scheduler_config.json").read_text())


def preset_text_encoder_2(name: str) -> dict[str, Any] | None:
    """The second text encoder's config of an SDXL preset; None for the others."""
    if name in ("tiny-xl", "tiny-xl-inpaint"):
        return TINY_XL_TEXT_2
    if name == "sdxl-random":
        return _shipped_json("sdxl", "text_encoder_2/config.json")
    return None


def preset_guidance(name: str) -> float | None:
    """The guidance scale preset ``name`` is meant to run at; None when it names none (the caller's default)."""
    return PRESET_GUIDANCE.get(name)


def preset_configs(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(text encoder, unet, vae, scheduler) configs of a preset."""
    if name == "tiny-xl":
        return TINY_TEXT, TINY_XL_UNET, TINY_XL_VAE, _shipped_scheduler("sdxl")
    if name == "tiny":
        return TINY_TEXT, TINY_UNET, TINY_VAE, _shipped_scheduler("sd15")
    if name == "tiny-inpaint":
        return TINY_TEXT, TINY_INPAINT_UNET, TINY_VAE, _shipped_scheduler("sd15")
    if name == "tiny-xl-inpaint":
        return TINY_TEXT, TINY_XL_INPAINT_UNET, TINY_XL_VAE, _shipped_scheduler("sdxl")
    if name == "shapes":
        record = read_shapes_record()
        return record["text_encoder"], record["unet"], record["vae"], record["scheduler"]
    shipped = {"sd15-random": "sd15", "sdxl-random": "sdxl"}.get(name)
    if shipped is None:
        raise SourceError(f"unknown preset {name!r}; the built-in presets are {', '.join(PRESETS)}")
    return (
        _shipped_json(shipped, "text_encoder/config.json"),
        _shipped_json(shipped, "unet/config.json"),
        _shipped_json(shipped, "vae/config.json"),
        _shipped_scheduler(shipped),
    )


def load_preset(name: str, seed: int = PRESET_SEED) -> ModelBundle:
    """Build a preset model with weights drawn from ``seed`` (same seed, same weights, on every machine).

    A trained preset (``shapes``) has one set of weights; ``seed`` does not apply to it.
    """
    if name == "shapes":
        return load_shapes()
    text_cfg, unet_cfg, vae_cfg, sched_cfg = preset_configs(name)
    text_2_cfg = preset_text_encoder_2(name)
    torch = require("torch", "building preset models", "export")
    diffusers = require("diffusers", "building preset models", "export")
    transformers = require("transformers", "building preset models", "export")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg)
        text_encoder_2 = None
        if text_2_cfg is not None:
            config = transformers.CLIPTextConfig(**text_2_cfg)
            text_encoder_2 = transformers.CLIPTextModelWithProjection(config)
    for module in (text_encoder, text_encoder_2, unet, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    configs = [name, seed, text_cfg, unet_cfg, vae_cfg] + ([text_2_cfg] if text_2_cfg else [])
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()
    source = {
        "kind": "preset",
        "name": name,
        "seed": seed,
        "sha256": digest,
        "description": f"preset {name} (seeded random weights, seed {seed})",
    }
    xl = text_encoder_2 is not None
    return bundle_from_modules(
        text_encoder,
        unet,
        vae,
        sched_cfg,
        source,
        text_encoder_2=text_encoder_2,
        pipeline_config=SDXL_INDEX if xl else None,
    )


# ------------------------------------------------------------------------------------------------------------
# The trained shapes model


def read_shapes_record(folder: Path = DATA_DIR) -> dict[str, Any]:
    """The JSON record that describes the shipped ``shapes`` weights."""
    path = folder / SHAPES_RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SourceError(f"the shapes model record {path} is missing; {_RETRAIN}") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"the shapes model record {path} is not valid JSON ({exc}); {_RETRAIN}") from exc
    missing = [k for k in ("sha256", "scheduler", *_SHAPES_MODULES) if k not in record]
    if missing:
        raise SourceError(f"the shapes model record {path} lacks {', '.join(missing)}; {_RETRAIN}")
    return record


def verified_shapes_weights(folder: Path = DATA_DIR) -> tuple[Path, dict[str, Any]]:
    """(weights path, record) after checking the ``shapes`` weights' sha256 against the record."""
    record = read_shapes_record(folder)
    weights = folder / SHAPES_WEIGHTS_NAME
    if not weights.is_file():
        raise SourceError(f"the shapes model weights {weights} are missing; {_RETRAIN}")
    found = sha256_file(weights)
    if found != record["sha256"]:
        raise SourceError(
            f"the shapes model weights {weights} are damaged or were replaced: expected sha256 "
            f"{record['sha256']}, found {found}; {_RETRAIN}"
        )
    return weights, record


def shipped_controlnet(name: str, folder: Path | None = None) -> Path | None:
    """The folder of the shipped ControlNet ``name`` (in ``folder`` instead of where sdtrt ships it, if given),
    after checking its weights' sha256 against its record; None when ``name`` is not a shipped ControlNet."""
    if name not in SHIPPED_CONTROLNETS:
        return None
    path = SHIPPED_CONTROLNETS[name] if folder is None else folder / SHIPPED_CONTROLNETS[name].name
    record_path = path.with_name(path.name + ".json")
    try:
        expected = json.loads(record_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(
            f"the record {record_path} of the shipped ControlNet {name!r} is missing or unreadable ({exc}); "
            f"{_RETRAIN_CONTROL}"
        ) from exc
    weights = path / CONTROLNET_WEIGHTS_NAME
    found = sha256_file(weights) if weights.is_file() else "no file"
    if found != expected:
        raise SourceError(
            f"the shipped ControlNet weights {weights} are missing, damaged or were replaced: expected sha256 "
            f"{expected}, found {found}; {_RETRAIN_CONTROL}"
        )
    return path


def load_shapes(folder: Path = DATA_DIR) -> ModelBundle:
    """The trained ``shapes`` model as fp32 modules on the CPU (weights stored in fp16, checked by sha256)."""
    torch = require("torch", "loading the shapes model", "export")
    diffusers = require("diffusers", "loading the shapes model", "export")
    transformers = require("transformers", "loading the shapes model", "export")
    safetensors_torch = require("safetensors.torch", "loading the shapes model", "export")

    weights, record = verified_shapes_weights(folder)
    tensors = safetensors_torch.load_file(str(weights))
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; keep the caller's RNG as it was
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**record["text_encoder"]))
        unet = diffusers.UNet2DConditionModel(**record["unet"])
        vae = diffusers.AutoencoderKL(**record["vae"])
    modules = {"text_encoder": text_encoder, "unet": unet, "vae": vae}
    for prefix, module in modules.items():
        state = {k[len(prefix) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SourceError(
                f"the shapes weights in {weights} do not fit the {prefix} config: {exc}; {_RETRAIN}"
            ) from exc
        module.eval().requires_grad_(False)
    source = {
        "kind": "preset",
        "name": "shapes",
        "sha256": record["sha256"],
        "description": "preset shapes (trained on drawn shapes; weights shipped with sdtrt)",
    }
    side = int(record["training"]["data"]["image_size"])  # trained at this size only: other sizes draw badly
    return bundle_from_modules(text_encoder, unet, vae, dict(record["scheduler"]), source, size_range=(side, side))
