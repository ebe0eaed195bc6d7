"""LoRAs applied to the engines of an open pipeline, on every backend, without re-export or engine rebuild.

A LoRA file (``files.read_lora``) becomes one fp32 delta per changed PyTorch weight (``match.lora_deltas``). Each
engine gets them as one ``WeightUpdate`` through the engine protocol's ``update_weights`` (the shallow UNet of step
caching gets the UNet's deltas of the weights it runs); how the engine applies
it is the backend's business (the PyTorch modules change in place, ONNX Runtime opens a new session with the
changed initializers overridden, TensorRT refits engines built with ``--refittable``).

ONNX Runtime and TensorRT need to know which initializer holds each PyTorch weight, and in which layout: export
records that map in the manifest (``extra["lora_map"]``, see ``export/weights.py``), with the module configs
(``extra["module_config"]``) from which the LoRA's layer names are resolved against the model's structure
(modules built on the ``meta`` device: no weights are loaded). The new initializer value is the base value, read
from the artifact's ONNX file when an engine first asks for it, plus the delta.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.engine import WeightUpdate
from sdtrt.runtime.errors import ArtifactError, ConfigError, LoraError
from sdtrt.runtime.lora.files import LORA_COMPONENTS, LoraFile, read_lora
from sdtrt.runtime.lora.match import lora_deltas
from sdtrt.runtime.manifest import Manifest, read_manifest, resolve_file

log = logging.getLogger(__name__)

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


class ActiveLora(NamedTuple):
    """A LoRA in use: its file and the scale it is applied with; prints as ``LoraFile(...) x 0.8``."""

    file: LoraFile
    scale: float

    def __repr__(self) -> str:
        return f"{self.file!r} x {self.scale:g}"


@dataclass
class LoraState:
    """What a pipeline's engines run with now: the LoRAs, and what is kept to switch them quickly."""

    active: list[ActiveLora] = field(default_factory=list)
    files: dict[tuple[str, float], LoraFile] = field(default_factory=dict)  # read once per (path, mtime)
    base: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # component -> initializer -> base value
    skeletons: dict[str, torch.nn.Module] | None = None


def read_loras(state: LoraState, loras: Sequence[LoraSpec]) -> list[ActiveLora]:
    """Read (file, scale) pairs into (LoraFile, scale) pairs, each file once per modification time."""
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
        result.append(ActiveLora(state.files[key], float(scale)))
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
    source = read_manifest(artifacts)
    return resolve_file(Path(artifacts), source.component(component).file)


@dataclass
class ArtifactInitializers:
    """One component's LoRA deltas as ONNX initializer values of the artifact (``InitializerValues``).

    Nothing is read until an engine asks: the torch backend never does. The new values are computed once.
    """

    manifest: Manifest
    folder: Path
    component: str
    deltas: Mapping[str, torch.Tensor]
    state: LoraState
    _changed: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)

    def changed(self) -> Mapping[str, np.ndarray]:
        """Initializer name -> base + delta, for every initializer the deltas change."""
        if self._changed is None:
            self._changed = initializer_values(self.manifest, self.folder, self.component, self.deltas, self.state)
        return self._changed

    def base(self, names: Sequence[str]) -> Mapping[str, np.ndarray]:
        """The artifact's own values of ``names``."""
        return base_initializers(self.manifest, self.folder, self.component, names, self.state)


def weight_updates(
    state: LoraState,
    loras: Sequence[tuple[LoraFile, float]],
    manifest: Manifest,
    folder: Path,
    engines: Mapping[str, Any],
    backend: str,
) -> dict[str, WeightUpdate]:
    """The update of every LoRA component in ``engines`` that makes it run the base model plus ``loras``.

    Raises (LoraError) before anything is returned when a LoRA does not fit the model.
    """
    live = [(file, scale) for file, scale in loras if scale != 0.0]
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    if live:
        if state.skeletons is None:
            state.skeletons = structure(manifest, engines, backend)
        deltas = lora_deltas(live, state.skeletons)
    updates = {}
    for name in (c for c in LORA_COMPONENTS if c in engines):
        own = deltas.get(name, {})
        updates[name] = WeightUpdate(own, ArtifactInitializers(manifest, folder, name, own, state))
    if "unet_shallow" in engines and backend != "torch":  # torch runs the UNet's own module: updated with it
        own = shallow_deltas(manifest, deltas.get("unet", {}))
        updates["unet_shallow"] = WeightUpdate(own, ArtifactInitializers(manifest, folder, "unet_shallow", own, state))
    return updates


def shallow_deltas(manifest: Manifest, unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet deltas of the weights the shallow UNet runs (the export recorded which: ``extra["weights"]``)."""
    used = manifest.components["unet_shallow"].extra.get("weights")
    if not isinstance(used, list):
        raise ArtifactError(
            "this artifact's unet_shallow does not record which UNet weights it runs, so LoRAs cannot reach it; "
            "re-export the model"
        )
    names = set(used)
    return {name: delta for name, delta in unet.items() if name in names}


def apply(
    state: LoraState,
    loras: Sequence[tuple[LoraFile, float]],
    manifest: Manifest,
    folder: Path,
    engines: Mapping[str, Any],
    backend: str,
) -> None:
    """Make ``engines`` run the base model plus ``loras`` (an empty list: the base model, bit for bit).

    A LoRA that does not fit the model is refused before any engine changes. When an engine refuses its update
    (e.g. the artifact cannot change a weight by name, or a TensorRT engine is not refittable), the engines
    already updated go back to the LoRAs they ran before, and the error is raised.
    """
    updates = weight_updates(state, loras, manifest, folder, engines, backend)
    done: list[str] = []
    try:
        for name, update in updates.items():
            engines[name].update_weights(update)
            done.append(name)
    except Exception:
        if done:
            _restore(state, manifest, folder, {n: engines[n] for n in done}, backend)
        raise
    state.active = [ActiveLora(f, s) for f, s in loras]
    log.info("LoRAs now: %s", ", ".join(f"{f.name}:{s:g}" for f, s in loras) or "none")


def _restore(state: LoraState, manifest: Manifest, folder: Path, engines: Mapping[str, Any], backend: str) -> None:
    """Put ``engines`` back on ``state.active``; a failure here is logged, the caller raises the first error."""
    try:
        for name, update in weight_updates(state, state.active, manifest, folder, engines, backend).items():
            engines[name].update_weights(update)
    except Exception:
        log.exception("could not put %s back on the LoRAs before this change", ", ".join(engines))
