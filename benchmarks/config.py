"""What a benchmark run measures: the model, the backends, the image size, the sampler, and how many runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.models.reference import DIFFUSERS_SCHEDULERS

# What the harness can measure (the module docstring of ``benchmarks.harness`` says what each one is).
BACKENDS = ("diffusers", "diffusers-compile", "torch", "torch-graph", "onnxruntime", "tensorrt")
CUDA_ONLY = ("diffusers-compile", "torch-graph", "tensorrt")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: ``source`` (a preset, folder or checkpoint) on ``backends``, same seed and sampler for all."""

    source: str
    backends: tuple[str, ...] = ("diffusers", "torch", "onnxruntime")
    height: int = 512
    width: int = 512
    steps: int = 30
    guidance: float = 7.5
    batch: int = 1
    precision: str = "fp16"
    runs: int = 10
    warmup: int = 3
    seed: int = 0
    scheduler: str = "euler_a"
    prompt: str = "a photo of an astronaut riding a horse on mars, detailed, sharp focus"
    device: str | None = None
    artifacts: str | None = None  # an existing artifact / engine folder for the sdtrt backends
    sequential: bool = False  # one backend open at a time, its runs in one block (models too big to hold twice)

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ConfigError(f"unknown backend(s) {unknown or '(none)'}; choose from {', '.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs} warmup={self.warmup}")
        if self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.scheduler not in DIFFUSERS_SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(DIFFUSERS_SCHEDULERS)}")
        if self.batch < 1 or self.steps < 1:
            raise ConfigError(f"batch and steps must be >= 1, got batch={self.batch} steps={self.steps}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
