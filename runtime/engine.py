"""The one engine protocol every backend implements, and the registry that finds backends by name.

An engine runs one component (text encoder, UNet, VAE decoder/encoder) of an artifact folder. Feeds and outputs
are torch tensors on the engine's device, in the dtypes the manifest declares. Output tensors may be buffers the
engine reuses on the next call: a caller that keeps an output past the next ``infer`` must clone it.

Optional capabilities are asked for, not assumed: ``supports_refit(engine)`` says whether ``engine.refit(weights)``
can replace its weights in place (TensorRT engines built with ``sdtrt build --refittable``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Protocol, runtime_checkable

import torch

from .errors import ConfigError
from .manifest import Manifest, TensorEntry

BACKENDS: dict[str, str] = {
    "onnxruntime": "sdtrt.runtime.backends.onnxruntime",
    "torch": "sdtrt.runtime.backends.torch",
    "tensorrt": "sdtrt.runtime.backends.tensorrt",
}


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

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ConfigError(f"backend precision must be auto, fp32 or fp16, got {self.precision!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")


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
