"""Export the components of a ModelBundle to ONNX and write an artifact folder with its manifest.

How one network is traced and described is in ``export.trace``; this module picks the components, their
precisions and the order, and writes the folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import sdtrt
from sdtrt.runtime.deps import require, version_of
from sdtrt.runtime.errors import ExportError
from sdtrt.runtime.files import staging_dir, write_text_atomic
from sdtrt.runtime.lora.files import LORA_COMPONENTS
from sdtrt.runtime.manifest import MANIFEST_NAME, ComponentEntry, Manifest
from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.models.fp16 import half_with_fp32_norms
from sdtrt.runtime.models.wrappers import wrap
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import (
    COMPONENTS,
    ModelInfo,
    check_profile_fits,
    component_specs,
    controlnet_component,
    controlnet_spec,
    model_components,
)

from .controlnet import export_controlnets
from .graph import clean_graph
from .latent_preview import fit_latent_rgb
from .trace import (
    DEFAULT_CACHE_BRANCH,
    DEFAULT_OPSET,
    VAE_PRECISIONS,
    ExportOptions,
    Progress,
    dynamic_axes,
    profile_shapes,
    sample_inputs,
    save_component,
    tensor_entries,
    trace_to_onnx,
)
from .weights import called_weights, lora_map, module_config, target_digests

__all__ = [  # with the names of export.trace that callers import from here
    "DEFAULT_OPSET",
    "VAE_PRECISIONS",
    "ExportOptions",
    "Progress",
    "component_precision",
    "dynamic_axes",
    "export_artifacts",
    "export_component",
    "export_names",
    "sample_inputs",
    "save_tokenizers",
    "tool_versions",
    "write_source_artifact",
]

log = logging.getLogger(__name__)


def component_precision(name: str, model: ModelInfo, options: ExportOptions) -> str:
    """The precision ``name`` is exported in (see ``ExportOptions.vae_precision``)."""
    if not name.startswith("vae") or options.precision == "fp32":
        return options.precision
    if options.vae_precision != "auto":
        return options.vae_precision
    return "fp32" if model.vae_needs_fp32 else options.precision


def export_component(
    bundle: ModelBundle,
    name: str,
    folder: Path,
    options: ExportOptions,
    consume: bool = False,
    still_needed: tuple[str, ...] = (),
) -> ComponentEntry:
    """Export one component into ``folder`` and describe it.

    With ``consume`` an fp16 export converts the bundle's module in place instead of copying it, and modules
    no component in ``still_needed`` uses are dropped from the bundle once exported: this saves several GB.
    """
    spec = component_specs(bundle.model)[name]
    module = bundle.module(name)
    precision = component_precision(name, bundle.model, options)
    if precision == "fp16":
        # A VAE that stays fp32 must not be halved in place by an earlier VAE component.
        module = half_with_fp32_norms(module, inplace=consume)
    onnx = require("onnx", "ONNX export", "export")
    lora = name in LORA_COMPONENTS or name == "unet_shallow"  # the shallow UNet's weights are the UNet's
    with tempfile.TemporaryDirectory(prefix=f"sdtrt-{name}-", dir=folder) as tmp:
        raw = Path(tmp) / spec.file_name
        wrapper = wrap(name, module, bundle.model)
        trace_to_onnx(wrapper, spec, raw, bundle.model, options, precision)
        used = None
        if name == "unet_shallow":  # the part of the UNet's weights it runs: what a LoRA must change in it
            used = called_weights(wrapper, module, sample_inputs(spec, bundle.model, options.profile, precision))
        digests = target_digests(module) if lora else {}
        config = module_config(module) if lora else None
        del wrapper
        del module
        if consume:  # free the module before the graph is loaded back: the peak memory of an export
            bundle.release(still_needed)
        graph = clean_graph(onnx.load(str(raw), load_external_data=True))
    extra: dict[str, Any] = {}
    if lora:  # before saving: saving with external data moves the weights out of the in-memory graph
        extra = {"lora_map": lora_map(digests, graph), "module_config": config}
        if used is not None:
            extra["weights"] = used
    del digests
    return save_component(graph, spec, folder, bundle.model, options, precision, extra)


def tool_versions() -> dict[str, str | None]:
    return {
        "sdtrt": sdtrt.__version__,
        "torch": torch.__version__,
        "diffusers": version_of("diffusers"),
        "transformers": version_of("transformers"),
        "onnx": version_of("onnx"),
    }


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {str(out)!r} is a file; give a folder path for the artifact")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(
            f"output folder {str(out)!r} is not empty and is not an sdtrt artifact; refusing to replace it. "
            "Choose a new or empty folder"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"cannot create {str(out)!r}: {str(parent)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ExportError(
            f"output folder {str(out)!r} is not writable ({exc.strerror}); choose a folder you can write to"
        ) from exc


def export_artifacts(
    bundle: ModelBundle,
    out: str | Path,
    options: ExportOptions,
    progress: Progress | None = None,
    consume: bool = False,
    controlnets: Sequence[tuple[str, Any]] = (),
) -> Manifest:
    """Export the chosen components of ``bundle`` into the artifact folder ``out``.

    ``consume=True`` lets fp16 export convert the bundle's modules in place (less memory; the bundle must
    not be used afterwards as an fp32 reference). ``controlnets`` are (name, ``ControlNetSource``) pairs, checked
    against the model (``export.controlnet.load_controlnets``), exported as components ``controlnet_<name>``.

    The folder appears under its final name only when every file and the manifest are written. Unless ``consume``,
    the caller's ``bundle`` is left as it was (its ``model`` record included).
    """
    out = Path(out)
    if not consume:
        bundle = dataclasses.replace(bundle)
    plain_unet_unless_control_ready(bundle, options, controlnets)
    check_profile_fits(bundle.model, options.profile)
    with_step_cache(bundle, options)
    names = export_names(bundle.model, options.components)
    _check_output(out)
    preview = None
    if "vae_decoder" in names:  # before fp16 conversion or release can change the VAE
        model = bundle.model
        preview = fit_latent_rgb(bundle.vae, model.scaling_factor, model.vae_scale_factor)

    if consume:
        _halve_up_front(bundle, names, options)
    total = len(names) + len(controlnets)
    with staging_dir(out) as stage:
        components = _export_components(bundle, names, stage, options, consume, progress, total)
        components.update(export_controlnets(controlnets, bundle.model, stage, options, progress, len(names), total))
        if preview is not None:
            decoder = components["vae_decoder"]
            components["vae_decoder"] = dataclasses.replace(decoder, extra={**decoder.extra, "latent_rgb": preview})
        tokenizer_2 = save_tokenizers(bundle, stage)
        write_text_atomic(stage / "scheduler_config.json", json.dumps(bundle.scheduler_config, indent=2))
        manifest = Manifest(
            model=bundle.model,
            profile=options.profile,
            components=components,
            source=bundle.source,
            versions=tool_versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tokenizer_2=tokenizer_2,
        )
        manifest.write(stage)
    return manifest


def _export_components(
    bundle: ModelBundle,
    names: tuple[str, ...],
    stage: Path,
    options: ExportOptions,
    consume: bool,
    progress: Progress | None,
    total: int,
) -> dict[str, ComponentEntry]:
    """Export ``names`` into ``stage`` in order, reporting each to ``progress`` (as item ``index`` of ``total``)."""
    components: dict[str, ComponentEntry] = {}
    for index, name in enumerate(names):
        if progress:
            progress(name, index, total, -1.0)
        start = time.perf_counter()
        still_needed = names[index + 1 :]
        components[name] = export_component(bundle, name, stage, options, consume=consume, still_needed=still_needed)
        seconds = time.perf_counter() - start
        log.debug("exported %s (%s) in %.1f s", name, options.precision, seconds)
        if progress:
            progress(name, index, total, seconds)
    return components


def plain_unet_unless_control_ready(bundle: ModelBundle, options: ExportOptions, controlnets: Sequence[Any]) -> None:
    """Export a UNet without ControlNet inputs when ``options`` say so (none can run on it then)."""
    if options.control_ready:
        return
    if controlnets:
        raise ExportError("ControlNets need a UNet that takes their residuals; leave out --plain-unet")
    bundle.model = dataclasses.replace(bundle.model, control_residuals=())


def with_step_cache(bundle: ModelBundle, options: ExportOptions) -> None:
    """Record the skip branch in ``bundle.model`` when ``options`` ask for step caching (and the UNet is exported);
    a branch the UNet does not have is a ``ShapeError`` before any work."""
    from sdtrt.runtime.models.step_cache import cache_split, check_supported

    wanted = options.step_cache and ("unet" in options.components or "unet_shallow" in options.components)
    if not wanted or bundle.unet is None:
        bundle.model = dataclasses.replace(bundle.model, cache_branch=-1, cache_feature=())
        return
    check_supported(bundle.unet)
    split = cache_split(bundle.unet, options.cache_branch)
    bundle.model = dataclasses.replace(
        bundle.model, cache_branch=split.branch, cache_feature=split.feature, cache_context=split.context
    )


def _halve_up_front(bundle: ModelBundle, names: tuple[str, ...], options: ExportOptions) -> None:
    """Convert every module exported in fp16 before the first export, in place, and drop unexported ones.

    Otherwise the fp32 UNet waits in memory while the text encoders export: on SDXL that is 10 GB of the peak.
    """
    bundle.release(names)
    for name in names:
        if component_precision(name, bundle.model, options) == "fp16" and not name.startswith("vae"):
            half_with_fp32_norms(bundle.module(name), inplace=True)


def export_names(model: ModelInfo, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The components to export, in pipeline order: all the model has by default, else those asked for."""
    own = model_components(model)
    if tuple(requested) == COMPONENTS:
        return own
    if "unet" in requested and model.step_cache:  # the shallow UNet is cut from the UNet: they go together
        requested = (*requested, "unet_shallow")
    foreign = [c for c in requested if c not in own]
    if foreign:
        raise ExportError(f"this {model.family} model has no component {', '.join(foreign)}; it has {', '.join(own)}")
    if model.inpainting and "unet" in requested and "vae_encoder" not in requested:
        raise ExportError(
            f"this is an inpainting model (its UNet takes {model.unet_in_channels} channels: latents, mask, "
            f"masked-image latents), so every call needs the VAE encoder, but --components {','.join(requested)} "
            "leaves vae_encoder out; add vae_encoder"
        )
    return tuple(c for c in own if c in requested)


def save_tokenizers(bundle: ModelBundle, folder: Path) -> str | None:
    """Write ``tokenizer.json`` (and SDXL's ``tokenizer_2.json``); returns the second one's name, if any."""
    from sdtrt.runtime.models.tokenizer import save_tokenizer

    save_tokenizer(bundle.tokenizer, folder / "tokenizer.json")
    if bundle.model.family != "sdxl":
        return None
    if bundle.tokenizer_2 is None:
        raise ExportError("this SDXL model has no second tokenizer (tokenizer_2); load it from a complete model")
    save_tokenizer(bundle.tokenizer_2, folder / "tokenizer_2.json")
    return "tokenizer_2.json"


def write_source_artifact(
    bundle: ModelBundle,
    out: str | Path,
    profile: ShapeProfile,
    controlnets: Sequence[tuple[str, Any]] = (),
    step_cache: bool = True,
    cache_branch: int = DEFAULT_CACHE_BRANCH,
) -> Manifest:
    """A folder for the ``torch`` backend only: manifest, tokenizer and scheduler config, no ONNX files.

    The torch backend runs the source model the manifest names (and the ControlNets, (name, ``ControlNetSource``)
    pairs, their records name), so benchmarks and quick experiments need no export. Its manifest kind is
    "torch"; other backends refuse it with a message saying so. The caller's ``bundle`` is left as it was.
    """
    out = Path(out)
    bundle = dataclasses.replace(bundle)
    check_profile_fits(bundle.model, profile)
    _check_output(out)
    with_step_cache(bundle, ExportOptions(profile=profile, step_cache=step_cache, cache_branch=cache_branch))

    specs = dict(component_specs(bundle.model))
    extras: dict[str, dict[str, Any]] = {}
    for name, source in controlnets:
        component = controlnet_component(name)
        specs[component] = controlnet_spec(bundle.model, component)
        extras[component] = {"controlnet": {"name": name, "family": source.family, "source": source.source}}
    components = {}
    for name, spec in specs.items():
        components[name] = ComponentEntry(
            file="",
            sha256="",
            precision="fp32",
            inputs=tensor_entries(spec.inputs, "fp32"),
            outputs=tensor_entries(spec.outputs, "fp32"),
            shapes=profile_shapes(spec, profile, bundle.model),
            extra=extras.get(name, {}),
        )
    with staging_dir(out) as stage:
        tokenizer_2 = save_tokenizers(bundle, stage)
        write_text_atomic(stage / "scheduler_config.json", json.dumps(bundle.scheduler_config, indent=2))
        manifest = Manifest(
            model=bundle.model,
            profile=profile,
            components=components,
            source=bundle.source,
            versions=tool_versions(),
            tokenizer_2=tokenizer_2,
            kind="torch",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.write(stage)
    return manifest
