"""Build TensorRT engines from an ONNX artifact folder into an engine folder the runtime opens like an artifact.

engines = build_engines("out/sd15", "out/sd15-trt", ShapeProfile.static(512, 512), TensorRTBuildOptions())
pipe = Pipeline.from_artifacts("out/sd15-trt", backend="tensorrt")

The engine folder holds one ``NAME.plan`` per component, the artifact's tokenizer and scheduler config, and a
manifest of kind "tensorrt" whose entries record, under ``extra``, the plan's build key (ONNX sha256, profile id,
TensorRT version, GPU name and compute capability, builder options, precision), the build time, the peak device
memory of the build and the activation memory the engine needs, and it carries over what the runtime reads from
the ONNX entry to apply LoRAs (``lora_map``, ``module_config``; a LoRA refits an engine built ``--refittable``)
and to name ControlNets (``controlnet``).

ControlNets (components ``controlnet_<name>``) are built like every other component, under the same profile: their
inputs share the UNet's symbolic dimensions, so where they take the same tensors their ranges are the UNet's, and the
hint's image sides and the residual outputs follow from the same sizes. Their engines join the activation memory
the runtime shares between the engines it opens together.

A step-cache artifact's shallow UNet (``unet_shallow``) is built like the UNet, under the same profile; its
``cache_feature`` input's ranges follow from the spec (the latent size, divided where the feature is deeper), and
the UNet engine keeps its second output ``cache_feature``. The manifest keeps the model's cache fields, each UNet's
own ``lora_map`` and the list of UNet weights the shallow one runs (``weights``: what a LoRA refits in it). The
two are built together: naming ``unet`` in ``components`` names ``unet_shallow`` too.

Building again into the same folder reuses every engine whose key still matches (same ONNX sha256, profile,
TensorRT, GPU and builder options) and rebuilds the others: after ``sdtrt export CONTROLNET --into ARTIFACTS``,
``sdtrt build ARTIFACTS --out ENGINES`` builds only the new ControlNet and keeps the UNet.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sdtrt
from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.backends.tensorrt import check_interface
from sdtrt.runtime.errors import ArtifactError, BuildError, ShapeError
from sdtrt.runtime.files import sha256_file, write_bytes_atomic
from sdtrt.runtime.manifest import MANIFEST_NAME, ComponentEntry, Manifest, read_manifest, resolve_file
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import COMPONENTS, ModelInfo, check_profile_fits, component_spec, is_controlnet, shape_ranges
from sdtrt.runtime.verify import verified_model_file

from .trt_builder import PeakDeviceMemory, TensorRTBuildOptions, build

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width)
# What the runtime reads from an ONNX entry to apply LoRAs (``weights``: the UNet weights the shallow UNet runs), to
# preview latents and to name ControlNets, kept with the engine built from it.
CARRIED_EXTRAS = ("lora_map", "module_config", "latent_rgb", "controlnet", "weights")
# Told about each engine as the build goes: (component, "reused" | "building" | "built").
BuildProgress = Callable[[str, str], None]

__all__ = [
    "BuildProgress",
    "ProfileRequest",
    "TensorRTBuildOptions",
    "build",
    "build_engines",
    "engine_key",
    "existing_profile",
    "resolve_profile",
]


@dataclass(frozen=True)
class ProfileRequest:
    """The shapes asked for on the command line; what is not given comes from the artifact's profile.

    static_size: one image size (min = opt = max). dynamic: a size range, from min/opt/max_size where given.
    batch: one batch size; otherwise min/opt/max_batch where given.
    """

    static_size: Size | None = None
    dynamic: bool = False
    min_size: Size | None = None
    opt_size: Size | None = None
    max_size: Size | None = None
    batch: int | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None

    def __post_init__(self) -> None:
        ranged = (self.min_size, self.opt_size, self.max_size)
        if self.static_size is not None and (self.dynamic or any(s is not None for s in ranged)):
            raise ShapeError(
                "choose either a static size (--static WxH) or a size range (--dynamic with --min-size/--opt-size/"
                "--max-size), not both"
            )
        if self.batch is not None and any(b is not None for b in (self.min_batch, self.opt_batch, self.max_batch)):
            raise ShapeError("choose either --batch N or --min-batch/--opt-batch/--max-batch, not both")

    @property
    def empty(self) -> bool:
        return self == ProfileRequest()


def resolve_profile(request: ProfileRequest, base: ShapeProfile) -> ShapeProfile | None:
    """The engine profile ``request`` asks for, on top of the artifact's profile ``base``; None if nothing asked."""
    if request.empty:
        return None
    if request.static_size is not None:
        low = opt = high = request.static_size
    else:
        low = request.min_size or (base.min_height, base.min_width)
        high = request.max_size or (base.max_height, base.max_width)
        opt = request.opt_size or _between((base.opt_height, base.opt_width), low, high)
    if request.batch is not None:
        batches = (request.batch,) * 3
    else:
        lo_b = request.min_batch or base.min_batch
        hi_b = request.max_batch or base.max_batch
        batches = (lo_b, request.opt_batch or min(max(base.opt_batch, lo_b), hi_b), hi_b)
    return ShapeProfile(
        *batches, low[0], opt[0], high[0], low[1], opt[1], high[1], max_prompt_windows=base.max_prompt_windows
    )


def existing_profile(out: str | os.PathLike[str], artifact: ShapeProfile) -> ShapeProfile | None:
    """The profile of the engine folder already at ``out`` when it lies inside the artifact's profile, else None:
    building into it again without asking for shapes keeps its engines' shapes (and so the engines)."""
    try:
        previous = read_manifest(out) if (Path(out) / MANIFEST_NAME).is_file() else None
    except ArtifactError:
        return None  # build_engines says what is wrong with the folder
    if previous is None or previous.kind != "tensorrt":
        return None
    profile = previous.profile
    inside = all(
        getattr(artifact, f"min_{d}") <= getattr(profile, f"min_{d}")
        and getattr(profile, f"max_{d}") <= getattr(artifact, f"max_{d}")
        for d in ("batch", "height", "width")
    )
    return profile if inside and profile.max_prompt_windows <= artifact.max_prompt_windows else None


def _between(value: Size, low: Size, high: Size) -> Size:
    return (min(max(value[0], low[0]), high[0]), min(max(value[1], low[1]), high[1]))


def check_profile_inside(profile: ShapeProfile, artifact: ShapeProfile, model: ModelInfo) -> None:
    """ShapeError unless every size and batch of ``profile`` lies inside the artifact's profile and fits the model."""
    outside = []
    for dim in ("batch", "height", "width"):
        lo, hi = getattr(profile, f"min_{dim}"), getattr(profile, f"max_{dim}")
        a_lo, a_hi = getattr(artifact, f"min_{dim}"), getattr(artifact, f"max_{dim}")
        if lo < a_lo or hi > a_hi:
            outside.append(f"{dim} {lo}..{hi} (the artifact has {a_lo}..{a_hi})")
    if profile.max_prompt_windows > artifact.max_prompt_windows:
        outside.append(f"{profile.max_prompt_windows} prompt windows (the artifact has {artifact.max_prompt_windows})")
    if outside:
        raise ShapeError(
            f"the engine profile {profile.id} asks for shapes outside the artifact's profile {artifact.id}: "
            f"{'; '.join(outside)}. Choose sizes and batches inside the range the ONNX files were exported for, "
            "or re-export the artifact with a wider --min-size/--max-size/--max-batch"
        )
    check_profile_fits(model, profile)


def engine_key(
    entry: ComponentEntry, profile: ShapeProfile, environment: dict[str, str], options: TensorRTBuildOptions
) -> dict[str, Any]:
    """Everything an engine depends on: equal keys mean the existing plan can be reused."""
    return {
        "onnx_sha256": entry.sha256,
        "onnx_data_sha256": entry.data_sha256,
        "precision": entry.precision,
        "profile": profile.id,
        "tensorrt": environment["tensorrt"],
        "gpu": environment["gpu"],
        "compute_capability": environment["compute_capability"],
        "builder": options.key(),
    }


def stale_reason(folder: Path, old: ComponentEntry | None, key: dict[str, Any]) -> str | None:
    """Why the engine recorded as ``old`` cannot be reused for ``key``, or None when it can."""
    if old is None:
        return "no engine built yet"
    old_key = old.extra.get("key")
    if not isinstance(old_key, dict):
        return "the existing engine has no build key"
    changed = [f"{k} {old_key.get(k)!r} -> {key.get(k)!r}" for k in key if old_key.get(k) != key.get(k)]
    if changed:
        return "the build key changed: " + ", ".join(changed)
    try:
        path = resolve_file(folder, old.file)
    except ArtifactError:
        return f"{old.file} is missing"
    if sha256_file(path) != old.sha256:
        return f"{old.file} does not match the manifest's sha256"
    return None


def _previous_engines(out: Path, artifacts: Path) -> Manifest | None:
    """The engine folder already at ``out``, if any; BuildError for anything else that must not be replaced."""
    if out.exists() and out.resolve() == artifacts.resolve():
        raise BuildError(f"--out {str(out)!r} is the artifact folder itself; give a separate folder for the engines")
    if out.exists() and not out.is_dir():
        raise BuildError(f"output path {str(out)!r} is a file; give a folder path for the engines")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST_NAME).is_file():
        raise BuildError(
            f"output folder {str(out)!r} is not empty and is not an sdtrt engine folder; refusing to write into it. "
            "Choose a new or empty folder"
        )
    try:
        previous = read_manifest(out)
    except ArtifactError as exc:
        raise BuildError(
            f"output folder {str(out)!r} has an unreadable manifest ({exc}); remove it or choose another"
        ) from exc
    if previous.kind != "tensorrt":
        raise BuildError(f"output folder {str(out)!r} is an ONNX artifact folder; give another folder for the engines")
    return previous


def build_engines(
    artifacts: str | os.PathLike[str],
    out: str | os.PathLike[str],
    profile: ShapeProfile | None = None,
    options: TensorRTBuildOptions | None = None,
    progress: BuildProgress | None = None,
) -> Manifest:
    """Build (or reuse) one TensorRT engine per component of the ONNX artifact ``artifacts`` into ``out``.

    ``profile`` defaults to the artifact's own profile and must lie inside it. Engines whose build key matches the
    one already in ``out`` are reused; the others are built (and the reason logged); ``progress`` hears of each.
    The manifest is rewritten after every engine, so an interrupted build keeps the engines it finished. Needs
    tensorrt and an NVIDIA GPU.
    """
    options = options or TensorRTBuildOptions()
    source_dir, out_dir = Path(artifacts), Path(out)
    trt_compat.require_tensorrt("building TensorRT engines")
    device = trt_compat.engine_device(None, BuildError)
    source = read_manifest(source_dir)
    if source.kind != "onnx":
        raise BuildError(f"{str(source_dir)!r} already holds {source.kind} engines; build from the ONNX artifact")
    profile = profile or source.profile
    check_profile_inside(profile, source.profile, source.model)
    names = components_to_build(source, options)
    environment = trt_compat.environment(device)
    previous = _previous_engines(out_dir, source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        file = getattr(source, name)
        if file:
            write_bytes_atomic(out_dir / file, resolve_file(source_dir, file).read_bytes())
    components = _kept_entries(out_dir, previous, source, names, profile, environment)
    todo = []
    for name in names:
        key = engine_key(source.components[name], profile, environment, options)
        reused = _reusable(out_dir, previous, name, key)
        if reused is not None:
            components[name] = dataclasses.replace(reused, extra={**reused.extra, **_carried(source.components[name])})
            if progress:
                progress(name, "reused")
        else:
            todo.append((name, key))
    manifest = _engine_manifest(source, profile, components, environment)
    manifest.write(out_dir)
    for name, key in todo:
        if progress:
            progress(name, "building")
        components[name] = _build_entry(source, source_dir, out_dir, name, profile, key, options)
        if progress:
            progress(name, "built")
        manifest = _engine_manifest(source, profile, components, environment)
        manifest.write(out_dir)
    return manifest


def components_to_build(source: Manifest, options: TensorRTBuildOptions) -> list[str]:
    """The components of ``source`` that ``options`` asks for: all it has (ControlNets too) unless they are named.

    A named network the artifact lacks is skipped (logged); a named ControlNet it lacks is a BuildError. Naming
    ``unet`` of a step-cache artifact builds ``unet_shallow`` too (see ``with_shallow_unet``).
    """
    if options.components is None:
        return [c for c in COMPONENTS if c in source.components] + list(source.controlnets.values())
    named = with_shallow_unet(options.components, source)
    absent = [c for c in named if is_controlnet(c) and c not in source.components]
    if absent:
        raise BuildError(
            f"the artifact has no {', '.join(absent)} (its ControlNets: "
            f"{', '.join(source.controlnets.values()) or 'none'}); name one of those, or add the ControlNet to the "
            "artifact first with `sdtrt export CONTROLNET --into ARTIFACTS`"
        )
    names = [c for c in named if c in source.components]
    if not names:
        raise BuildError(
            f"the artifact has none of the components {list(options.components)} (it has {sorted(source.components)})"
        )
    skipped = [c for c in named if c not in source.components]
    if skipped:
        log.info("the artifact has no %s; not building it", ", ".join(skipped))
    return names


def with_shallow_unet(names: tuple[str, ...], source: Manifest) -> tuple[str, ...]:
    """``names`` with ``unet_shallow`` right after ``unet`` when the artifact has both and only ``unet`` is named.

    The two are cut from one UNet export and run together (the shallow one reads the feature the full one gives),
    so an engine folder never pairs a new UNet engine with a shallow engine of an older export. The shallow engine
    alone may still be named (e.g. to rebuild it with other builder options).
    """
    if "unet" not in names or "unet_shallow" in names or "unet_shallow" not in source.components:
        return names
    log.info("building unet_shallow with unet: the step-cache engines are built together")
    at = names.index("unet") + 1
    return (*names[:at], "unet_shallow", *names[at:])


def _reusable(out: Path, previous: Manifest | None, name: str, key: dict[str, Any]) -> ComponentEntry | None:
    """The engine of ``name`` already in ``out`` if its build key is ``key`` and its plan is intact (logged)."""
    old = previous.components.get(name) if previous else None
    reason = stale_reason(out, old, key)
    if reason is None and old is not None:
        log.info("reusing %s: its build key matches", old.file)
        return old
    log.info("building the %s engine: %s", name, reason)
    return None


def _kept_entries(
    out: Path,
    previous: Manifest | None,
    source: Manifest,
    names: list[str],
    profile: ShapeProfile,
    environment: dict[str, str],
) -> dict[str, ComponentEntry]:
    """Engines of other components already in ``out`` that still fit this artifact, profile and machine (the rest
    go: an engine of an ONNX file the artifact no longer has would not match the engines built beside it)."""
    kept: dict[str, ComponentEntry] = {}
    if previous is None:
        return kept
    for name, entry in previous.components.items():
        if name in names:
            continue
        key = entry.extra.get("key", {})
        same = {"profile": profile.id, **{k: environment[k] for k in ("tensorrt", "compute_capability")}}
        onnx = source.components.get(name)
        if not isinstance(key, dict) or any(key.get(k) != v for k, v in same.items()):
            log.info("removing the %s engine: it was built for another profile, TensorRT or GPU", name)
        elif onnx is None or (key.get("onnx_sha256"), key.get("onnx_data_sha256")) != (onnx.sha256, onnx.data_sha256):
            log.info("removing the %s engine: the artifact no longer has the ONNX file it was built from", name)
        else:
            kept[name] = entry
            continue
        (out / entry.file).unlink(missing_ok=True)
    return kept


def _build_entry(
    source: Manifest,
    source_dir: Path,
    out: Path,
    name: str,
    profile: ShapeProfile,
    key: dict[str, Any],
    options: TensorRTBuildOptions,
) -> ComponentEntry:
    """Build the engine of component ``name`` and describe it for the engine manifest."""
    entry = source.components[name]
    ranges = shape_ranges(component_spec(source.model, name), profile, source.model)
    onnx_path = verified_model_file(source_dir, entry)
    start = time.perf_counter()
    with PeakDeviceMemory(trt_compat.engine_device(None, BuildError)) as peak:
        plan = build(onnx_path, ranges, options, out=out / f"{name}.plan")
    seconds = time.perf_counter() - start
    activation = _activation_memory(plan, entry)
    log.info("built %s in %.1f s", plan.name, seconds)
    return ComponentEntry(
        file=plan.name,
        sha256=sha256_file(plan),
        precision=entry.precision,
        inputs=entry.inputs,
        outputs=entry.outputs,
        shapes={k: {"min": list(lo), "opt": list(op), "max": list(hi)} for k, (lo, op, hi) in ranges.items()},
        opset=entry.opset,
        extra={
            "key": key,
            "build_seconds": round(seconds, 3),
            "peak_device_memory": peak.peak,
            "device_memory_size": activation,
            "artifacts": str(source_dir.resolve()),
            **_carried(entry),
        },
    )


def _carried(entry: ComponentEntry) -> dict[str, Any]:
    return {k: entry.extra[k] for k in CARRIED_EXTRAS if k in entry.extra}


def _activation_memory(plan: Path, entry: ComponentEntry) -> int:
    """Load the plan just written (it must deserialize) and return the activation memory one context needs."""
    engine = trt_compat.create_runtime(BuildError).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise BuildError(f"the engine just built ({plan.name}) does not deserialize: {trt_compat.error_text()}")
    check_interface(entry, engine)
    return trt_compat.device_memory_size(engine)


def _engine_manifest(
    source: Manifest, profile: ShapeProfile, components: dict[str, ComponentEntry], environment: dict[str, str]
) -> Manifest:
    return Manifest(
        model=source.model,
        profile=profile,
        components={name: components[name] for name in _pipeline_order(components)},
        source=source.source,
        versions={**source.versions, "sdtrt": sdtrt.__version__, "tensorrt": environment["tensorrt"]},
        tokenizer=source.tokenizer,
        tokenizer_2=source.tokenizer_2,
        scheduler=source.scheduler,
        kind="tensorrt",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _pipeline_order(components: dict[str, ComponentEntry]) -> list[str]:
    """The networks in pipeline order, then the ControlNets by name (as the ONNX manifest lists them)."""
    return [c for c in COMPONENTS if c in components] + sorted(c for c in components if is_controlnet(c))
