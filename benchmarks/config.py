"""What a benchmark run measures: the model, the backends, the image size, the sampler, and how many runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.cache_plan import check_cache_args
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.control.slots import control_settings
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.models.presets import PRESETS, preset_configs, preset_guidance, shipped_config
from sdtrt.runtime.models.reference import DIFFUSERS_SCHEDULERS
from sdtrt.runtime.models.sources import native_size
from sdtrt.runtime.schedulers import default_sampler

# What the harness can measure (the module docstring of ``benchmarks.harness`` says what each one is).
BACKENDS = ("diffusers", "diffusers-compile", "torch", "torch-graph", "onnxruntime", "tensorrt")
CUDA_ONLY = ("diffusers-compile", "torch-graph", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16")  # auto: fp32 on a CPU, fp16 on CUDA, the precision every backend runs there
# The guidance scale of a model that names none (Stable Diffusion's usual one).
STANDARD_GUIDANCE = 7.5


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
    precision: str = "auto"
    runs: int = 10
    warmup: int = 3
    seed: int = 0
    scheduler: str = "euler_a"
    prompt: str = "a photo of an astronaut riding a horse on mars, detailed, sharp focus"
    device: str | None = None
    artifacts: str | None = None  # an existing artifact / engine folder for the sdtrt backends
    sequential: bool = False  # one backend open at a time, its runs in one block (models too big to hold twice)
    controls: tuple[ControlInput, ...] = ()  # ControlNets of ``artifacts`` every run of the sdtrt backends uses
    # Step caching: every sdtrt backend also runs cached at each of these intervals (> 1), as rows of their own
    # beside its uncached one; the diffusers baselines run uncached only.
    cache_intervals: tuple[int, ...] = ()
    cache_schedule: str = "uniform"

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ConfigError(f"unknown backend(s) {unknown or '(none)'}; choose from {', '.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs} warmup={self.warmup}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}; auto times every "
                "backend in fp32 on a CPU and in fp16 on CUDA"
            )
        if self.scheduler not in DIFFUSERS_SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(DIFFUSERS_SCHEDULERS)}")
        if self.batch < 1 or self.steps < 1:
            raise ConfigError(f"batch and steps must be >= 1, got batch={self.batch} steps={self.steps}")
        if self.controls:
            self._check_controls()
        self._check_cache()

    def _check_controls(self) -> None:
        if not self.artifacts:
            raise ConfigError(
                "--control runs the ControlNets of an artifact, but no --artifacts was given; export one with "
                "`sdtrt export MODEL --out FOLDER --controlnet CONTROLNET` and pass --artifacts FOLDER"
            )
        baselines = [b for b in self.backends if b.startswith("diffusers")]
        if baselines:
            raise ConfigError(
                f"ControlNets run on sdtrt's backends only, got {', '.join(baselines)}; leave it out of --backends "
                "(e.g. --backends onnxruntime)"
            )

    def _check_cache(self) -> None:
        check_cache_args(1, self.cache_schedule)  # a schedule typo is an error even with no interval given
        for interval in self.cache_intervals:
            check_cache_args(interval, self.cache_schedule)
        if self.cache_intervals and not self.sdtrt_backends:
            raise ConfigError(
                f"--cache-interval times sdtrt's backends cached, and none was asked for (got "
                f"{', '.join(self.backends)}); add one to --backends, e.g. --backends onnxruntime"
            )

    @property
    def sdtrt_backends(self) -> tuple[str, ...]:
        """The backends that run sdtrt's pipeline (all but the diffusers baselines)."""
        return tuple(b for b in self.backends if not b.startswith("diffusers"))

    @property
    def cached(self) -> tuple[int, ...]:
        """The cache intervals timed besides the uncached runs: those > 1, each once, in the order given."""
        return tuple(dict.fromkeys(n for n in self.cache_intervals if n > 1))

    def record(self) -> dict[str, Any]:
        """The settings as JSON-ready values; each control as its settings (name, scale, start, end, ...)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["backends"] = list(self.backends)
        values["cache_intervals"] = list(self.cache_intervals)
        values["controls"] = [setting.to_dict() for setting in control_settings(self.controls)]
        return values

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def run_precision(self) -> str:
        """The precision asked of every backend: ``auto`` becomes fp16 on CUDA and fp32 on a CPU.

        On a CPU the PyTorch backends run fp32 whatever is asked, so fp32 is the one precision every backend
        shares there; an explicit fp16 on a CPU times ONNX Runtime in fp16 against them (the table marks it).
        """
        if self.precision != "auto":
            return self.precision
        return "fp16" if self.torch_device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class ModelDefaults:
    """The settings a model runs with unless told otherwise: image side, sampler and guidance scale."""

    size: int
    scheduler: str
    guidance: float


def model_defaults(source: str) -> ModelDefaults:
    """``source``'s own defaults, read from its configs alone (nothing is loaded).

    The size is the one it was trained at, the sampler the one its scheduler config names, the guidance scale
    the one its preset records (``STANDARD_GUIDANCE`` when it records none).
    """
    guidance = preset_guidance(source) if _is_preset(source) else None
    return ModelDefaults(
        size=native_size(source),
        scheduler=default_sampler(_scheduler_config(source)),
        guidance=STANDARD_GUIDANCE if guidance is None else guidance,
    )


def _is_preset(source: str) -> bool:
    # as load_source decides: a preset name wins over a same-named folder that holds no model
    return source in PRESETS and not (Path(source).expanduser() / "model_index.json").is_file()


def _scheduler_config(source: str) -> dict[str, Any]:
    """The scheduler config ``source`` loads with; empty (the fallback sampler) when there is none to read."""
    path = Path(source).expanduser()
    if _is_preset(source):
        return preset_configs(source)[3]
    if path.is_dir():
        file = path / "scheduler" / "scheduler_config.json"
    elif path.is_file():
        # a single file is loaded with the shipped SDXL configs when it holds SDXL (native side 1024), else SD 1.5's
        file = shipped_config("sdxl" if native_size(source) >= 1024 else "sd15") / "scheduler" / "scheduler_config.json"
    else:
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # loading the model names the damage; the default sampler need not
    return data if isinstance(data, dict) else {}
