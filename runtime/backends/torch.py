"""PyTorch backend: runs the source modules an artifact was exported from, as the baseline the others are held to.

The modules come from ``manifest.source`` (a preset, a diffusers folder or a checkpoint), loaded once per
``open_engines`` call; the VAE serves both VAE components. Precision "auto" is fp16 on CUDA and fp32 on the CPU;
fp16 is the half-precision module with fp32 norms that the fp16 ONNX files are exported from. Attention runs on
``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``).

``infer`` only enqueues work on the current stream (no host syncs, no grad state), so on CUDA it can be captured
in a CUDA graph. It runs under ``torch.no_grad()`` rather than ``inference_mode()``: inference tensors cannot be
used by a graph capture outside inference mode. Outputs are fresh tensors from the module.

Only this backend imports diffusers/transformers model code, and only inside ``open_engines``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdtrt.runtime.backends.common import EngineBase, bind_dims, close_all, engine_device, resolve_shape, torch_dtype
from sdtrt.runtime.deps import require
from sdtrt.runtime.engine import BackendOptions, WeightUpdate
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.manifest import Manifest, TensorEntry
from sdtrt.runtime.specs import ComponentSpec, component_spec, component_specs, is_controlnet

log = logging.getLogger(__name__)

NAME = "torch"
INSTALL_HINT = 'pip install "sdtrt[export]"'


def available() -> tuple[bool, str]:
    """(True, "") when diffusers and transformers are installed (the source models need them); never raises."""
    missing = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        return False, f"the torch backend needs {' and '.join(missing)} to load the source model: {INSTALL_HINT}"
    return True, ""


def run_precision(requested: str, device: torch.device) -> str:
    """The precision the modules run in: "auto" is fp16 on CUDA, fp32 elsewhere."""
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


class TorchEngine(EngineBase):
    """One component run by its PyTorch module; outputs are fresh tensors in the declared dtypes."""

    def __init__(
        self,
        name: str,
        inputs: Sequence[TensorEntry],
        outputs: Sequence[TensorEntry],
        device: torch.device,
        module: torch.nn.Module,
        scale_factor: int,
    ) -> None:
        super().__init__(name, inputs, outputs, device)
        self.graph_capturable = device.type == "cuda"
        self._module: torch.nn.Module | None = module
        self._scale_factor = scale_factor
        self._output_dtypes = [torch_dtype(entry.dtype) for entry in self.outputs]
        self._base_weights: dict[str, torch.Tensor] = {}  # parameters a LoRA changed, as they were

    @property
    def module(self) -> torch.nn.Module:
        self.check_open()
        assert self._module is not None
        return self._module

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. Feeds must have the declared dtypes (the module's precision; the timestep stays fp32)."""
        module = self.module
        dims = bind_dims(self.name, self.inputs, feeds, self.device)
        for entry in self.outputs:
            # Same checks as the other backends (e.g. image sides a multiple of the VAE factor).
            resolve_shape(entry.shape, dims, self._scale_factor)
        with torch.no_grad():
            result = module(*(feeds[entry.name] for entry in self.inputs))
        results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        return {
            entry.name: tensor.to(dtype)
            for entry, tensor, dtype in zip(self.outputs, results, self._output_dtypes, strict=True)
        }

    def update_weights(self, update: WeightUpdate) -> None:
        """Run with ``base + delta`` for each parameter ``update.deltas`` names (LoRA); no deltas: the base model.

        Names are those of the wrapped diffusers/transformers module's state dict. The base values of every
        parameter ever changed are kept, so going back to the base model restores it bit for bit; parameters keep
        their storage, so a captured CUDA graph reads the new weights.
        """
        deltas = update.deltas
        inner = next(iter(self.module.children()))
        params = dict(inner.named_parameters())
        unknown = [name for name in deltas if name not in params]
        if unknown:
            raise ConfigError(f"{self.name} has no parameter(s) {unknown[:3]} ({len(unknown)} in all)")
        with torch.no_grad():
            for name, base in self._base_weights.items():
                if name not in deltas:
                    params[name].copy_(base)
            for name, delta in deltas.items():
                param = params[name]
                base = self._base_weights.setdefault(name, param.detach().clone())
                param.copy_((base.float() + delta.to(base.device, torch.float32)).to(param.dtype))
        for name in [n for n in self._base_weights if n not in deltas]:
            del self._base_weights[name]

    def _release(self) -> None:
        self._module = None
        self._base_weights.clear()


def open_engines(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    components: Sequence[str],
    device: torch.device | str,
    options: BackendOptions | None = None,
) -> dict[str, TorchEngine]:
    """One engine per component, running the PyTorch modules of ``manifest.source`` on ``device``.

    ``folder`` is not read: this backend needs only the manifest (the source model and its description).
    """
    options = options or BackendOptions()
    device = engine_device(device)
    precision = run_precision(options.precision, device)
    specs = component_specs(manifest.model)
    names = list(dict.fromkeys(components))
    unknown = [name for name in names if name not in specs and name not in manifest.controlnets.values()]
    if unknown:
        raise ConfigError(f"unknown component(s) {unknown}; expected some of: {', '.join(specs)}")
    require("diffusers", "the torch backend", "export")
    require("transformers", "the torch backend", "export")
    from sdtrt.runtime.models.controlnet import recorded_controlnet
    from sdtrt.runtime.models.fp16 import half_with_fp32_norms
    from sdtrt.runtime.models.sources import reload_source
    from sdtrt.runtime.models.wrappers import wrap

    networks = [name for name in names if not is_controlnet(name)]
    bundle = reload_source(manifest.source)
    _check_same_source(manifest.source, bundle.source)
    bundle.release(networks)
    engines: dict[str, TorchEngine] = {}
    try:
        for name in names:
            module = (
                recorded_controlnet(manifest.components[name].extra, name)
                if is_controlnet(name)
                else bundle.module(name)
            )
            use_sdpa(module)
            wrapped = wrap(name, module, manifest.model)
            own = component_precision(name, manifest, precision)
            if own == "fp16":
                # In place: the VAE is shared by both VAE wrappers, and converting it twice is harmless.
                wrapped = half_with_fp32_norms(wrapped, inplace=True)
            wrapped.to(device).requires_grad_(False)
            inputs, outputs = declared_tensors(component_spec(manifest.model, name), own)
            engines[name] = TorchEngine(name, inputs, outputs, device, wrapped, manifest.model.vae_scale_factor)
    except BaseException:
        close_all(engines)
        raise
    return engines


def component_precision(name: str, manifest: Manifest, precision: str) -> str:
    """fp16 runs keep SDXL's VAE in fp32 when its config says it must be upcast, as diffusers does."""
    if name.startswith("vae") and manifest.model.vae_needs_fp32:
        return "fp32"
    return precision


def declared_tensors(spec: ComponentSpec, precision: str) -> tuple[tuple[TensorEntry, ...], tuple[TensorEntry, ...]]:
    """Inputs and outputs with the dtypes of the precision the module runs in (the timestep stays fp32)."""

    def entries(tensors: Sequence[Any]) -> tuple[TensorEntry, ...]:
        return tuple(TensorEntry(t.name, t.concrete_dtype(precision), tuple(t.shape)) for t in tensors)

    return entries(spec.inputs), entries(spec.outputs)


def use_sdpa(module: Any) -> None:
    """Make a diffusers model attend with ``scaled_dot_product_attention`` (text encoders are left as loaded)."""
    if hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())


def _check_same_source(expected: Mapping[str, Any], found: Mapping[str, Any]) -> None:
    want, got = expected.get("sha256"), found.get("sha256")
    if want and got and want != got:
        raise ArtifactError(
            f"the model source ({found.get('description', expected.get('kind'))}) changed since this artifact was "
            f"exported (sha256 {got[:12]}..., manifest says {want[:12]}...); re-export the artifact from it"
        )
