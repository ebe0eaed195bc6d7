"""Samplers for the lean runtime: one file each, a precomputed ``Schedule`` and a pure, capturable ``step``.

Use ``get_scheduler(name)`` to pick one; each module is imported only when asked for. ``SAMPLERS`` is the one
table of what each sampler is called by AUTOMATIC1111 and by diffusers. ComfyUI's sigma schedules are in
``sigmas`` (``ModelSampling``, ``ksampler_sigmas``, ``SIGMA_SCHEDULES``) and its samplers over them in
``ksampling``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.schedulers.base import Generator, Schedule, StepIndex, add_noise, at_step, initial_state, start_index
from sdtrt.runtime.schedulers.config import SchedulerConfig
from sdtrt.runtime.schedulers.sigmas import (
    SIGMA_SCHEDULES,
    ModelSampling,
    advanced_sigmas,
    calculate_sigmas,
    ksampler_sigmas,
)


@dataclass(frozen=True)
class SamplerEntry:
    """One row of the sampler table: where a sampler's algorithm lives and what other tools call it."""

    module: str  # the module in this package
    a1111: str  # the label AUTOMATIC1111 writes in PNG "parameters" metadata
    diffusers: str  # the diffusers scheduler class that computes the same steps
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to the module's make_schedule
    diffusers_options: Mapping[str, Any] = field(default_factory=dict)  # on top of the model's scheduler config


_DPMPP_2M = MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2})

# The one table of samplers; the names below are views of it.
SAMPLERS: Mapping[str, SamplerEntry] = MappingProxyType(
    {
        "euler": SamplerEntry("euler", "Euler", "EulerDiscreteScheduler"),
        "euler_a": SamplerEntry("euler_ancestral", "Euler a", "EulerAncestralDiscreteScheduler"),
        "ddim": SamplerEntry("ddim", "DDIM", "DDIMScheduler"),
        "dpmpp_2m": SamplerEntry("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {}, _DPMPP_2M),
        "dpmpp_2m_karras": SamplerEntry(
            "dpmpp_2m",
            "DPM++ 2M Karras",
            "DPMSolverMultistepScheduler",
            {"karras": True},
            {**_DPMPP_2M, "use_karras_sigmas": True},
        ),
        "lcm": SamplerEntry("lcm", "LCM", "LCMScheduler"),
    }
)

SCHEDULER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
A1111_LABELS: Mapping[str, str] = MappingProxyType({name: entry.a1111 for name, entry in SAMPLERS.items()})
# sdtrt sampler name -> (diffusers scheduler class, options on top of the model's scheduler config)
DIFFUSERS_SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {name: (entry.diffusers, entry.diffusers_options) for name, entry in SAMPLERS.items()}
)


@dataclass(frozen=True)
class Scheduler:
    """One registered sampler: its module and the options its name implies."""

    name: str
    module: ModuleType
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return A1111_LABELS[self.name]

    @property
    def stochastic(self) -> bool:
        """Whether ``make_schedule`` needs noise from ``draw_noise``."""
        return hasattr(self.module, "draw_noise")

    def make_schedule(
        self,
        config: SchedulerConfig,
        steps: int,
        device: torch.device | str,
        *,
        noise: torch.Tensor | None = None,
        start: int = 0,
    ) -> Schedule:
        return self.module.make_schedule(config, steps, device, noise=noise, start=start, **self.options)

    def draw_noise(
        self, steps: int, shape: Sequence[int], generator: Generator, *, start: int = 0
    ) -> torch.Tensor | None:
        """Pre-drawn per-step noise for stochastic samplers, ``None`` for the others."""
        if not self.stochastic:
            return None
        return self.module.draw_noise(steps, shape, generator, start=start)

    def step(
        self,
        schedule: Schedule,
        i: StepIndex,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.step(schedule, i, model_output, sample, state)


# The diffusers scheduler class a model ships with -> the first sampler that reproduces it. Classes with no sampler
# here (PNDM, the SD 1.x default; LMS; Heun; UniPC) map to euler_a, the sampler those models are usually run with.
DIFFUSERS_CLASSES: Mapping[str, str] = MappingProxyType(
    {entry.diffusers: name for name, entry in reversed(SAMPLERS.items())}  # reversed: the first one wins
)
FALLBACK_SAMPLER = "euler_a"


def default_sampler(config: Mapping[str, Any]) -> str:
    """The sampler a model's ``scheduler_config.json`` asks for (by its ``_class_name``); see DIFFUSERS_CLASSES."""
    name = DIFFUSERS_CLASSES.get(str(config.get("_class_name", "")), FALLBACK_SAMPLER)
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        return "dpmpp_2m_karras"
    return name


def get_scheduler(name: str) -> Scheduler:
    """The sampler registered as ``name``; raises ConfigError listing the valid names on an unknown one."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
    entry = SAMPLERS[name]
    module = importlib.import_module(f"{__name__}.{entry.module}")
    return Scheduler(name=name, module=module, options=MappingProxyType(dict(entry.options)))


__all__ = [
    "A1111_LABELS",
    "SIGMA_SCHEDULES",
    "ModelSampling",
    "advanced_sigmas",
    "calculate_sigmas",
    "ksampler_sigmas",
    "DIFFUSERS_SCHEDULERS",
    "SAMPLERS",
    "SCHEDULER_NAMES",
    "SamplerEntry",
    "Schedule",
    "Scheduler",
    "SchedulerConfig",
    "DIFFUSERS_CLASSES",
    "add_noise",
    "default_sampler",
    "at_step",
    "get_scheduler",
    "initial_state",
    "start_index",
]
