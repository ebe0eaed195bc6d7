"""The one engine protocol every backend implements, and the registry that finds backends by name.

An engine runs one component (text encoder, UNet, VAE decoder/encoder) of an artifact folder. Feeds and outputs
are torch tensors on the engine's device, in the dtypes the manifest declares. Output tensors may be buffers the
engine reuses on the next call: a caller that keeps an output past the next ``infer`` must clone it.

Weights change through one method, ``update_weights(WeightUpdate)`` (LoRA uses it): the update is given as fp32
deltas on the component's PyTorch parameters, and, for engines that run an ONNX file's weights, as new ONNX
initializer values computed on demand. The PyTorch backend adds the deltas to its live modules, ONNX Runtime opens a
new session with the initializers overridden, TensorRT refits. An engine that cannot change its weights raises.

Optional capabilities are asked for, not assumed: ``supports_refit(engine)`` says whether ``engine.refit(weights)``
can replace its weights in place (TensorRT engines built with ``sdtrt build --refittable``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from sdtrt.runtime.errors import BackendError, ConfigError
from sdtrt.runtime.manifest import Manifest, TensorEntry

BACKENDS: dict[str, str] = {
    "onnxruntime": "sdtrt.runtime.backends.onnxruntime",
    "torch": "sdtrt.runtime.backends.torch",
    "tensorrt": "sdtrt.runtime.backends.tensorrt",
}


class InitializerValues(Protocol):
    """A weight change in ONNX terms, for engines that run the weights of an ONNX file (read when asked for)."""

    def changed(self) -> Mapping[str, np.ndarray]:
        """Initializer name -> its new value (base plus delta), in the initializer's layout and dtype."""
        ...

    def base(self, names: Sequence[str]) -> Mapping[str, np.ndarray]:
        """The ONNX file's own values of the named initializers."""
        ...


@dataclass(frozen=True)
class WeightUpdate:
    """The weights an engine runs with from now on, as a change to the weights it was opened with.

    ``deltas`` maps parameter names of the component's PyTorch module (its diffusers/transformers state-dict
    names) to fp32 tensors added to the base values; empty means the base weights. ``initializers`` gives the same
    change as ONNX initializer values, for engines that know initializers rather than parameters. An update
    replaces the previous one (it does not add to it), so the empty update restores the base weights exactly.
    """

    deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)
    initializers: InitializerValues | None = None

    def initializer_values(self) -> Mapping[str, np.ndarray]:
        """The change as initializer name -> new value; {} for the base weights."""
        if self.initializers is None:
            if self.deltas:
                raise BackendError(
                    "this weight update names PyTorch parameters only; an engine that runs ONNX weights needs them "
                    "as initializer values too"
                )
            return {}
        return self.initializers.changed()

    def base_initializers(self, names: Sequence[str]) -> Mapping[str, np.ndarray]:
        """The ONNX file's own values of ``names`` (to put back what an earlier update changed)."""
        if not names:
            return {}
        if self.initializers is None:
            raise BackendError(f"this weight update cannot give the base values of {len(names)} initializer(s)")
        return self.initializers.base(names)


@runtime_checkable
class Engine(Protocol):
    """One runnable component."""

    name: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    device: torch.device
    # True when ``infer`` only enqueues device work on the current CUDA stream, so a CUDA graph can capture it.
    graph_capturable: bool

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. Outputs may be reused buffers: clone what you keep past the next call."""
        ...

    def update_weights(self, update: WeightUpdate) -> None:
        """Run with ``update``'s weights from the next call on; BackendError when this engine cannot."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Engine: ...

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend understands; a backend ignores what does not apply to it.

    precision: "auto" runs the artifact's precision (torch: fp16 on CUDA, fp32 on CPU), or "fp32"/"fp16".
    """

    precision: str = "auto"
    threads: int = 0  # CPU threads for ONNX Runtime; 0 = its default
    # ONNX Runtime: the intra-op threads spin between runs, ready for the next (False: they sleep at once; faster
    # where other threads share the cores, e.g. a server's HTTP threads; measured in RESULTS.md)
    spin: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ConfigError(f"backend precision must be auto, fp32 or fp16, got {self.precision!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if not isinstance(self.spin, bool):
            raise ConfigError(f"spin must be True or False (ONNX Runtime threads spin or sleep), got {self.spin!r}")


class Backend(Protocol):
    """What a backend module provides (each module under ``sdtrt/runtime/backends``)."""

    NAME: str

    def available(self) -> tuple[bool, str]:
        """(usable here, reason when not)."""
        ...

    def open_engines(
        self,
        folder: Path,
        manifest: Manifest,
        components: Sequence[str],
        device: torch.device,
        options: BackendOptions,
    ) -> dict[str, Engine]: ...


def supports_refit(engine: Engine) -> bool:
    """True when ``engine.refit(weights)`` can replace the engine's weights (ONNX initializer name -> array)."""
    return bool(getattr(engine, "supports_refit", False))


def get_backend(name: str) -> ModuleType:
    """Import the backend module registered as ``name`` (only now: its dependencies are optional)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def input_dtype(engine: Engine, name: str) -> torch.dtype:
    """The torch dtype of ``engine``'s input ``name`` (float16 or float32)."""
    for tensor in engine.inputs:
        if tensor.name == name:
            return torch.float16 if tensor.dtype == "float16" else torch.float32
    raise KeyError(name)
