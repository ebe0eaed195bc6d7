"""The ``shapes`` preset: a small SD 1.x model trained by sdtrt on drawn images of coloured shapes.

It ships as one fp16 safetensors file and a JSON record (configs, training settings, sha256, measured
quality) in ``sdtrt/runtime/models/data``. Loading checks the file's sha256 against the record first, so a
damaged or replaced file is refused with a clear message instead of producing wrong images. The weights are
made by ``python -m sdtrt.shapes.train --out runtime/models/data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import SourceError

from .bundle import ModelBundle, model_info

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS_NAME = "shapes.safetensors"
RECORD_NAME = "shapes.json"
PREFIXES = ("text_encoder", "unet", "vae")
RETRAIN = "reinstall sdtrt, or retrain with `python -m sdtrt.shapes.train --out runtime/models/data`"


def read_record(folder: Path = DATA_DIR) -> dict[str, Any]:
    """The JSON record that describes the shipped weights."""
    path = folder / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SourceError(f"the shapes model record {path} is missing; {RETRAIN}") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"the shapes model record {path} is not valid JSON ({exc}); {RETRAIN}") from exc
    missing = [k for k in ("sha256", "scheduler", *PREFIXES) if k not in record]
    if missing:
        raise SourceError(f"the shapes model record {path} lacks {', '.join(missing)}; {RETRAIN}")
    return record


def verified_weights(folder: Path = DATA_DIR) -> tuple[Path, dict[str, Any]]:
    """(weights path, record) after checking the weights' sha256 against the record."""
    from .sources import file_hash

    record = read_record(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise SourceError(f"the shapes model weights {weights} are missing; {RETRAIN}")
    found = file_hash(weights)
    if found != record["sha256"]:
        raise SourceError(
            f"the shapes model weights {weights} are damaged or were replaced: expected sha256 "
            f"{record['sha256']}, found {found}; {RETRAIN}"
        )
    return weights, record


def load_shapes(folder: Path = DATA_DIR) -> ModelBundle:
    """The trained ``shapes`` model as fp32 modules on the CPU (weights stored in fp16, checked by sha256)."""
    torch = require("torch", "loading the shapes model", "export")
    diffusers = require("diffusers", "loading the shapes model", "export")
    transformers = require("transformers", "loading the shapes model", "export")
    safetensors_torch = require("safetensors.torch", "loading the shapes model", "export")
    from .tokenizer import clip_tokenizer

    weights, record = verified_weights(folder)
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
                f"the shapes weights in {weights} do not fit the {prefix} config: {exc}; {RETRAIN}"
            ) from exc
        module.eval().requires_grad_(False)
    scheduler = dict(record["scheduler"])
    return ModelBundle(
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        tokenizer=clip_tokenizer(),
        scheduler_config=scheduler,
        model=model_info(text_encoder, unet, vae, scheduler),
        source={
            "kind": "preset",
            "name": "shapes",
            "sha256": record["sha256"],
            "description": "preset shapes (trained on drawn shapes; weights shipped with sdtrt)",
        },
    )
