"""Samplers for the lean runtime: one file each, a precomputed ``Schedule`` and a pure, capturable ``step``.

Use ``get_scheduler(name)`` to pick one; each module is imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch

from ..errors import ConfigError
from .base import Generator, Schedule, StepIndex, add_noise, at_step, initial_state, start_index
from .config import SchedulerConfig

# name -> (module in this package, options passed to its make_schedule)
_REGISTRY: dict[str, tuple[str, Mapping[str, Any]]] = {
    "euler": ("euler", {}),
    "euler_a": ("euler_ancestral", {}),
    "ddim": ("ddim", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_karras": ("dpmpp_2m", {"karras": True}),
    "lcm": ("lcm", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# Sampler names as AUTOMATIC1111 writes them in PNG "parameters" metadata.
A1111_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "euler": "Euler",
        "euler_a": "Euler a",
        "ddim": "DDIM",
        "dpmpp_2m": "DPM++ 2M",
        "dpmpp_2m_karras": "DPM++ 2M Karras",
        "lcm": "LCM",
    }
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


# The diffusers scheduler class a model ships with -> the sampler that reproduces it. Classes with no sampler
# here (PNDM, the SD 1.x default; LMS; Heun; UniPC) map to euler_a, the sampler those models are usually run with.
DIFFUSERS_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_a",
        "DDIMScheduler": "ddim",
        "DPMSolverMultistepScheduler": "dpmpp_2m",
        "LCMScheduler": "lcm",
    }
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
    if name not in _REGISTRY:
        raise ConfigError(f"unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
    module_name, options = _REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return Scheduler(name=name, module=module, options=MappingProxyType(dict(options)))


__all__ = [
    "A1111_LABELS",
    "SCHEDULER_NAMES",
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
