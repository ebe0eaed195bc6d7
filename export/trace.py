"""Tracing one network to ONNX and describing the file for the manifest: what every exported component shares.

Exporter: torch's TorchScript-based ``torch.onnx.export`` (``dynamo=False``). On the tiny UNet it exports in about
1 s where the ``dynamo=True`` exporter takes about 30 s, both produce graphs that match PyTorch to ~1e-6, and it
names symbolic dimensions directly. Its one-file-per-weight external data is rewritten as one data file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.errors import ExportError
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.manifest import ComponentEntry, TensorEntry
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import (
    CLIP_SKIP,
    COMPONENTS,
    DEFAULT_CACHE_BRANCH,
    ComponentSpec,
    ModelInfo,
    TensorSpec,
    resolve_dim,
    shape_ranges,
)

from .graph import save_model

DEFAULT_OPSET = 18
Progress = Callable[[str, int, int, float], None]  # (component, index, total, seconds or -1 at start)


VAE_PRECISIONS = ("auto", "fp32", "fp16")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how. ``profile`` records the shapes the artifact is meant for.

    ``components`` defaults to every component the model has. ``vae_precision`` "auto" follows ``precision``,
    except that an fp16 SDXL artifact keeps its VAE in fp32 when the VAE's config says it must be upcast
    (``force_upcast``: SDXL's VAE overflows in fp16 and gives black or NaN images; an fp16-safe VAE such as
    the "fp16-fix" one sets it false). "fp16" forces a half-precision VAE.
    """

    profile: ShapeProfile = field(default_factory=ShapeProfile)
    precision: str = "fp32"
    components: tuple[str, ...] = COMPONENTS
    opset: int = DEFAULT_OPSET
    vae_precision: str = "auto"
    # The UNet takes ControlNet residuals (zeros when no ControlNet runs): ControlNets can be added later
    # without a new UNet. False gives the plain UNet of older artifacts.
    control_ready: bool = True
    # Step caching: export the shallow UNet cut at skip branch ``cache_branch`` (runtime.models.step_cache), and
    # the feature it needs as a second output of the UNet.
    step_cache: bool = True
    cache_branch: int = DEFAULT_CACHE_BRANCH

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(
                f"export precision must be 'fp32' or 'fp16', got {self.precision!r} "
                "(int8/fp8 artifacts are made from an fp16 artifact by `sdtrt calibrate`)"
            )
        if self.vae_precision not in VAE_PRECISIONS:
            raise ExportError(f"VAE precision must be one of {', '.join(VAE_PRECISIONS)}, got {self.vae_precision!r}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise ExportError(f"unknown component(s) {unknown or '(none given)'}; choose from {', '.join(COMPONENTS)}")
        if self.cache_branch < 0:
            raise ExportError(f"the skip branch must be 0 or more (0 caches the most), got {self.cache_branch}")
        if not 17 <= self.opset <= 21:
            raise ExportError(f"opset must be between 17 and 21, got {self.opset}")


def sample_inputs(
    spec: ComponentSpec, model: ModelInfo, profile: ShapeProfile, precision: str
) -> tuple[torch.Tensor, ...]:
    """Trace inputs: batch 2 (so nothing specializes on batch 1) at a small size the model accepts.

    The size only has to be legal (dimensions stay symbolic); a small one keeps tracing cheap, which matters
    for fp16, whose CPU kernels are slow.
    """
    side = max(model.size_multiple, 64)
    sizes = {
        "batch": 2,
        "text_batch": 2,
        "unet_batch": 2,
        "text_length": 77,
        "height": side,
        "width": side,
        "latent_height": side // model.vae_scale_factor,
        "latent_width": side // model.vae_scale_factor,
    }
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for tensor in spec.inputs:
        shape = [resolve_dim(d, sizes) for d in tensor.shape]
        dtype = tensor.concrete_dtype(precision)
        if tensor.name == CLIP_SKIP:  # a valid layer choice: the graph takes any at run time
            tensors.append(torch.ones(shape, dtype=torch.int32))
        elif dtype == "int32":
            tensors.append(torch.randint(0, 49406, shape, generator=generator, dtype=torch.int32))
        elif tensor.name == "timestep":
            tensors.append(torch.full(shape, 500.0))
        else:
            torch_dtype = torch.float16 if dtype == "float16" else torch.float32
            tensors.append(torch.randn(shape, generator=generator).to(torch_dtype))
    return tuple(tensors)


def dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for tensor in spec.inputs + spec.outputs:
        named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
        if named:
            axes[tensor.name] = named
    return axes


def save_component(
    graph: Any,
    spec: ComponentSpec,
    folder: Path,
    model: ModelInfo,
    options: ExportOptions,
    precision: str,
    extra: dict[str, Any] | None = None,
) -> ComponentEntry:
    """Write the cleaned ONNX ``graph`` of ``spec`` into ``folder`` and describe it for the manifest."""
    onnx_file, data_file = save_model(graph, folder / spec.file_name)
    return ComponentEntry(
        file=onnx_file.name,
        sha256=sha256_file(onnx_file),
        precision=precision,
        inputs=tensor_entries(spec.inputs, precision),
        outputs=tensor_entries(spec.outputs, precision),
        shapes=profile_shapes(spec, options.profile, model),
        opset=options.opset,
        data_file=data_file.name if data_file else None,
        data_sha256=sha256_file(data_file) if data_file else None,
        extra=extra or {},
    )


def trace_to_onnx(
    wrapper: torch.nn.Module, spec: ComponentSpec, raw: Path, model: ModelInfo, options: ExportOptions, precision: str
) -> None:
    """Write the traced graph of ``wrapper`` to ``raw``, with the symbolic dimensions ``spec`` names."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper,
                sample_inputs(spec, model, options.profile, precision),
                str(raw),
                dynamo=False,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes(spec),
                opset_version=options.opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; name the component and keep the cause
        raise ExportError(f"exporting {spec.name} to ONNX failed: {exc}") from exc


def tensor_entries(tensors: tuple[TensorSpec, ...], precision: str) -> tuple[TensorEntry, ...]:
    return tuple(TensorEntry(t.name, t.concrete_dtype(precision), t.shape) for t in tensors)


def profile_shapes(spec: ComponentSpec, profile: ShapeProfile, model: ModelInfo) -> dict[str, dict[str, list[int]]]:
    """The min/opt/max shape of each input of ``spec`` under ``profile``, as the manifest records them."""
    return {
        key: {"min": list(lo), "opt": list(opt), "max": list(hi)}
        for key, (lo, opt, hi) in shape_ranges(spec, profile, model).items()
    }
