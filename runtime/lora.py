"""LoRAs applied to the engines of an open pipeline, on every backend, without re-export or engine rebuild.

A LoRA file (``runtime/models/lora.py`` reads it) becomes one fp32 delta per changed PyTorch weight. How a delta
reaches an engine depends on the backend:

- torch: added to the module's weights in place (the base values are kept and put back bit for bit);
- onnxruntime: a new session of the same ONNX file with the changed initializers overridden
  (``SessionOptions.add_initializer``); the file is not rewritten;
- tensorrt: engines built with ``--refittable`` are refitted (``trt.Refitter``) with the changed weights.

ONNX Runtime and TensorRT need to know which initializer holds each PyTorch weight, and in which layout: export
records that map in the manifest (``extra["lora_map"]``, see ``export/weights.py``), with the module configs
(``extra["module_config"]``) from which the LoRA's layer names are resolved against the model's structure
(modules built on the ``meta`` device: no weights are loaded). The new initializer value is the base value, read
from the artifact's ONNX file, plus the delta.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .deps import require
from .errors import ArtifactError, ConfigError
from .manifest import Manifest, resolve_file
from .models.lora import LoraError, LoraFile, lora_deltas, read_lora

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
LoraSpec = tuple[str | os.PathLike[str], float]


def parse_lora_option(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (the CLI's ``--lora``) -> (path, scale); scale 1 when omitted."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path or os.sep in scale or "/" in scale:
        return Path(text), 1.0
    try:
        return Path(path), float(scale)
    except ValueError:
        raise ConfigError(f"--lora expects FILE or FILE:SCALE (e.g. style.safetensors:0.8), got {text!r}") from None


@dataclass
class LoraState:
    """What a pipeline's engines run with now: the LoRAs, and the weights they changed."""

    active: list[tuple[LoraFile, float]] = field(default_factory=list)
    touched: dict[str, set[str]] = field(default_factory=dict)  # component -> initializer/parameter names changed
    files: dict[tuple[str, float], LoraFile] = field(default_factory=dict)  # read once per (path, mtime)
    base: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # component -> initializer -> base value
    skeletons: dict[str, torch.nn.Module] | None = None


def read_loras(state: LoraState, loras: Sequence[LoraSpec]) -> list[tuple[LoraFile, float]]:
    result = []
    for path, scale in loras:
        file = Path(path).expanduser()
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale):
            raise ConfigError(f"LoRA scale must be a finite number, got {scale!r} for {file}")
        if not file.is_file():
            raise LoraError(f"LoRA file {str(file)!r} does not exist; give the path of a .safetensors LoRA")
        key = (str(file.resolve()), file.stat().st_mtime)
        if key not in state.files:
            state.files[key] = read_lora(file)
        result.append((state.files[key], float(scale)))
    return result


def structure(manifest: Manifest, engines: Mapping[str, Any], backend: str) -> dict[str, torch.nn.Module]:
    """The modules LoRA layer names are resolved against: the torch backend's own, else built on ``meta``."""
    if backend == "torch":
        return {c: next(iter(engines[c].module.children())) for c in LORA_COMPONENTS if c in engines}
    diffusers = require("diffusers", "applying LoRAs (the model's structure)", "export")
    transformers = require("transformers", "applying LoRAs (the model's structure)", "export")
    modules: dict[str, torch.nn.Module] = {}
    for name in LORA_COMPONENTS:
        entry = manifest.components.get(name)
        if entry is None:
            continue
        config = entry.extra.get("module_config")
        if not isinstance(config, dict) or "lora_map" not in entry.extra:
            raise ArtifactError(
                f"this artifact's {name} has no weight map for LoRAs (exported by an older sdtrt); re-export it, "
                "and rebuild its engines with --refittable for TensorRT"
            )
        with torch.device("meta"):
            if name == "unet":
                modules[name] = diffusers.UNet2DConditionModel.from_config(config)
            else:
                cls = (
                    transformers.CLIPTextModelWithProjection if name == "text_encoder_2" else transformers.CLIPTextModel
                )
                known = {k: v for k, v in config.items() if not k.startswith("_")}
                modules[name] = cls(transformers.CLIPTextConfig(**known))
    return modules


def initializer_values(
    manifest: Manifest, folder: Path, component: str, deltas: Mapping[str, torch.Tensor], state: LoraState
) -> dict[str, np.ndarray]:
    """Initializer name -> base + delta, in the initializer's layout and dtype, for one component."""
    entry = manifest.components[component]
    mapping: Mapping[str, Any] = entry.extra.get("lora_map", {})
    absent = [name for name in deltas if name not in mapping]
    if absent:
        raise LoraError(
            f"the LoRA changes {len(absent)} {component} weight(s) this artifact cannot change by name, e.g. "
            f"{', '.join(absent[:3])} (the exporter folded or shared them); use the torch backend for this LoRA"
        )
    base = base_initializers(manifest, folder, component, [mapping[n]["initializer"] for n in deltas], state)
    values = {}
    for name, delta in deltas.items():
        place = mapping[name]
        value = base[place["initializer"]]
        d = delta.t() if place["transposed"] else delta
        if tuple(d.shape) != value.shape:
            raise ArtifactError(
                f"{component} weight {name} is {tuple(d.shape)} but initializer {place['initializer']} is "
                f"{value.shape}; the artifact's weight map is wrong, re-export it"
            )
        values[place["initializer"]] = (value.astype(np.float32) + d.numpy()).astype(value.dtype)
    return values


def base_initializers(
    manifest: Manifest, folder: Path, component: str, names: Sequence[str], state: LoraState
) -> dict[str, np.ndarray]:
    """The file's own values of the named initializers (read once, kept for the next switch)."""
    cache = state.base.setdefault(component, {})
    wanted = [n for n in names if n not in cache]
    if wanted:
        onnx = require("onnx", "applying LoRAs to ONNX Runtime or TensorRT engines", "export")
        from onnx import numpy_helper

        path = onnx_source(manifest, folder, component)
        model = onnx.load(str(path), load_external_data=True)
        keep = set(wanted)
        for tensor in model.graph.initializer:
            if tensor.name in keep:
                cache[tensor.name] = numpy_helper.to_array(tensor).copy()
        del model
        missing = [n for n in wanted if n not in cache]
        if missing:
            raise ArtifactError(f"{path.name} has no initializer(s) {missing[:3]}; re-export the artifact")
    return {n: cache[n] for n in names}


def onnx_source(manifest: Manifest, folder: Path, component: str) -> Path:
    """The ONNX file of ``component``: in the folder, or for an engine folder the artifact it was built from."""
    entry = manifest.components[component]
    if manifest.kind == "onnx":
        return resolve_file(folder, entry.file)
    artifacts = entry.extra.get("artifacts")
    if not isinstance(artifacts, str) or not Path(artifacts).is_dir():
        raise ArtifactError(
            f"the {component} engine does not name the ONNX artifact it was built from (or it moved: "
            f"{artifacts!r}); LoRAs need its weights. Rebuild the engines from the artifact"
        )
    from .manifest import read_manifest

    source = read_manifest(artifacts)
    return resolve_file(Path(artifacts), source.component(component).file)


def apply(
    state: LoraState,
    loras: list[tuple[LoraFile, float]],
    manifest: Manifest,
    folder: Path,
    engines: Mapping[str, Any],
    backend: str,
) -> None:
    """Make ``engines`` run the base model plus ``loras`` (an empty list: the base model, bit for bit)."""
    live = [(file, scale) for file, scale in loras if scale != 0.0]
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    if live:
        if state.skeletons is None:
            state.skeletons = structure(manifest, engines, backend)
        deltas = lora_deltas(live, state.skeletons)  # raises before any engine is touched
    components = [c for c in LORA_COMPONENTS if c in engines]
    if backend == "torch":
        for name in components:
            engines[name].set_weight_deltas(deltas.get(name))
    else:
        staged = {name: initializer_values(manifest, folder, name, deltas.get(name, {}), state) for name in components}
        for name in components:
            values = staged[name]
            if backend == "onnxruntime":
                engines[name].set_initializers(values)
            else:  # tensorrt: refit what changes now and put back what the previous LoRAs changed
                restore = state.touched.get(name, set()) - set(values)
                if restore:
                    values = {**values, **base_initializers(manifest, folder, name, sorted(restore), state)}
                if values:
                    engines[name].refit(values)
            state.touched[name] = set(staged[name])
    state.active = list(loras)
    log.info("LoRAs now: %s", ", ".join(f"{f.name}:{s:g}" for f, s in loras) or "none")
