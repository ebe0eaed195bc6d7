"""Export ControlNets as components of an artifact: with the model, or into an existing ONNX artifact.

Each ControlNet becomes the component ``controlnet_<name>`` (file ``controlnet_<name>.onnx``): the UNet's inputs
and the hint image in, the unscaled residuals the UNet takes out. Adding one to an artifact leaves its UNet and
every other file untouched: the UNet of an artifact exported by this version already takes the residuals.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ExportError
from sdtrt.runtime.files import write_text_atomic
from sdtrt.runtime.manifest import MANIFEST_NAME, ComponentEntry, Manifest, read_manifest
from sdtrt.runtime.models.controlnet import ControlNetSource, check_controlnet_family, load_controlnet
from sdtrt.runtime.models.fp16 import half_with_fp32_norms
from sdtrt.runtime.models.wrappers import wrap
from sdtrt.runtime.specs import ModelInfo, controlnet_component, controlnet_spec, residual_layout

from .graph import clean_graph
from .trace import ExportOptions, Progress, save_component, trace_to_onnx

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ControlNetArg:
    """A ControlNet asked for on the command line: ``PATH``, or ``NAME=PATH`` to choose its name."""

    path: str
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ControlNetArg:
        name, sep, path = text.partition("=")
        if sep and NAME_PATTERN.match(name) and path:
            return cls(path, name)
        return cls(text)


def check_name(name: str) -> str:
    """``name`` if it can name a ControlNet (file names and ``--control NAME:IMAGE`` use it); ExportError else."""
    if not NAME_PATTERN.match(name):
        raise ExportError(
            f"ControlNet name {name!r} cannot be used: names are 1-64 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit; choose one with NAME=PATH"
        )
    return name


def check_controlnet_fits(source: ControlNetSource, model: ModelInfo) -> None:
    """Refuse a ControlNet made for another model (family, text width, or residual shapes) before any work."""
    check_controlnet_family(source, model)
    if not model.control_ready:
        raise ExportError(
            "this artifact's UNet takes no ControlNet residuals (exported without them or by an older sdtrt); "
            "re-export the model with `sdtrt export MODEL --out FOLDER --controlnet CONTROLNET`"
        )
    config = source.model.config
    layout = residual_layout(config.block_out_channels, config.layers_per_block)
    if layout != model.control_residuals:
        raise ExportError(
            f"ControlNet {source.name} gives residuals of shapes (channels, downscale) {list(layout)}, but the "
            f"model's UNet takes {list(model.control_residuals)}: it was made for another model; use a "
            "ControlNet trained for this one"
        )


def load_controlnets(
    args: Sequence[ControlNetArg],
    model: ModelInfo,
    *,
    allow_pickle: bool = False,
    config_dir: str | os.PathLike[str] | None = None,
    taken: Sequence[str] = (),
) -> list[tuple[str, ControlNetSource]]:
    """Load and check every ControlNet asked for: (name, source) pairs, names unique and not in ``taken``.
    ``config_dir`` is the config of single files whose architecture is not their family's standard one."""
    from sdtrt.runtime.models.presets import SHIPPED_CONTROLNET_NAMES, shipped_controlnet

    loaded: list[tuple[str, ControlNetSource]] = []
    names = set(taken)
    for arg in args:
        shipped = shipped_controlnet(arg.path)
        source = load_controlnet(shipped or Path(arg.path), allow_pickle=allow_pickle, config_dir=config_dir)
        name = check_name(arg.name or SHIPPED_CONTROLNET_NAMES.get(arg.path, source.name))
        if name in names:
            raise ExportError(
                f"the artifact would have two ControlNets named {name!r}; name one with NAME=PATH "
                "(e.g. --controlnet canny2=/path/to/it)"
            )
        check_controlnet_fits(source, model)
        names.add(name)
        loaded.append((name, source))
    return loaded


def export_controlnet(
    name: str, source: ControlNetSource, model: ModelInfo, folder: Path, options: ExportOptions
) -> ComponentEntry:
    """Export one ControlNet into ``folder`` as the component ``controlnet_<name>`` in ``options.precision``."""
    component = controlnet_component(name)
    spec = controlnet_spec(model, component)
    precision = options.precision
    module = half_with_fp32_norms(source.model, inplace=False) if precision == "fp16" else source.model
    onnx = require("onnx", "ONNX export", "export")
    with tempfile.TemporaryDirectory(prefix=f"sdtrt-{component}-", dir=folder) as tmp:
        raw = Path(tmp) / spec.file_name
        trace_to_onnx(wrap(component, module, model), spec, raw, model, options, precision)
        graph = clean_graph(onnx.load(str(raw), load_external_data=True))
    extra: dict[str, Any] = {"controlnet": {"name": name, "family": source.family, "source": source.source}}
    return save_component(graph, spec, folder, model, options, precision, extra)


def export_controlnets(
    controlnets: Sequence[tuple[str, ControlNetSource]],
    model: ModelInfo,
    folder: Path,
    options: ExportOptions,
    progress: Progress | None = None,
    offset: int = 0,
    total: int | None = None,
) -> dict[str, ComponentEntry]:
    """Export each (name, source) into ``folder``; component entries by component name."""
    entries = {}
    total = total if total is not None else len(controlnets)
    for index, (name, source) in enumerate(controlnets, start=offset):
        component = controlnet_component(name)
        if progress:
            progress(component, index, total, -1.0)
        start = time.perf_counter()
        entries[component] = export_controlnet(name, source, model, folder, options)
        if progress:
            progress(component, index, total, time.perf_counter() - start)
    return entries


def add_controlnets(
    folder: str | os.PathLike[str],
    args: Sequence[ControlNetArg],
    *,
    allow_pickle: bool = False,
    config_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Add ControlNets to the ONNX artifact ``folder`` without touching its other files.

    Every check runs before the first export; the new files are written under temporary names and the manifest
    is replaced last, so an interrupted run leaves the artifact as it was.
    """
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest.kind != "onnx":
        raise ExportError(
            f"{root} holds {manifest.kind} files, not ONNX: add the ControlNet to the ONNX artifact it was built "
            "from, then run `sdtrt build` again (only the new ControlNet is built)"
        )
    taken = list(manifest.controlnets)
    controlnets = load_controlnets(args, manifest.model, allow_pickle=allow_pickle, config_dir=config_dir, taken=taken)
    precision = "fp16" if manifest.precision in ("fp16", "int8", "fp8") else "fp32"
    options = ExportOptions(profile=manifest.profile, precision=precision, opset=_opset(manifest))
    with tempfile.TemporaryDirectory(prefix=".controlnet-", dir=root) as tmp:
        entries = export_controlnets(controlnets, manifest.model, Path(tmp), options, progress)
        for entry in entries.values():
            for name in (entry.file, entry.data_file):
                if name:
                    os.replace(Path(tmp) / name, root / name)
    updated = dataclasses.replace(manifest, components={**manifest.components, **entries})
    write_text_atomic(root / MANIFEST_NAME, updated.to_json())
    return updated


def _opset(manifest: Manifest) -> int:
    unet = manifest.components.get("unet")
    return unet.opset if unet is not None and unet.opset else 18
