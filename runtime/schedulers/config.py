"""The noise schedule a model was trained with, read from a diffusers ``scheduler_config.json``.

Every sampler takes its betas, timestep spacing and prediction type from this one config, whatever sampler
class wrote the file (SD 1.5 ships a PNDM config), as diffusers' ``Scheduler.from_config(other.config)`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.errors import ArtifactError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys that change the math in ways these samplers do not implement: refuse them rather than ignore them.
_UNSUPPORTED_UNLESS = {"rescale_betas_zero_snr": False, "thresholding": False}


@dataclass(frozen=True)
class SchedulerConfig:
    """Training noise schedule and sampling conventions shared by every sampler.

    Keys missing from a config file take these defaults (diffusers' defaults differ a little per class;
    saved configs list every key, so this only matters for hand-written dicts).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False

    def __post_init__(self) -> None:
        _check_int("num_train_timesteps", self.num_train_timesteps, minimum=2)
        _check_int("steps_offset", self.steps_offset, minimum=0)
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            if not _is_real(value) or not 0.0 < value < 1.0:
                raise ArtifactError(f"scheduler config '{key}' must be a number in (0, 1), got {value!r}")
        if self.beta_start > self.beta_end:
            raise ArtifactError(
                f"scheduler config needs beta_start <= beta_end, got beta_start={self.beta_start!r} "
                f"and beta_end={self.beta_end!r}"
            )
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        for key in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, key), bool):
                raise ArtifactError(f"scheduler config '{key}' must be true or false, got {getattr(self, key)!r}")
        if self.trained_betas is not None:
            _check_trained_betas(self.trained_betas, self.num_train_timesteps)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a parsed ``scheduler_config.json``; keys this runtime does not use are ignored."""
        if not isinstance(data, Mapping):
            raise ArtifactError(f"scheduler config must be a JSON object, got {type(data).__name__}")
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if key in data and data[key] != allowed:
                raise ArtifactError(
                    f"scheduler config '{key}' = {data[key]!r} is not supported by the runtime samplers; "
                    f"only {allowed!r} is"
                )
        known = {field.name for field in fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        betas = kwargs.get("trained_betas")
        if betas is not None:
            if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence | np.ndarray):
                raise ArtifactError(
                    f"scheduler config 'trained_betas' must be null or a list of numbers, got {betas!r}"
                )
            kwargs["trained_betas"] = tuple(betas)
        return cls(**kwargs)

    def betas(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Per-training-step betas, computed in ``dtype`` on the CPU the way diffusers computes them."""
        count = self.num_train_timesteps
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=dtype)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, count, dtype=dtype)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, count, dtype=dtype) ** 2
        return torch.from_numpy(_squaredcos_cap_v2_betas(count)).to(dtype)

    def alphas_cumprod(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Cumulative product of ``1 - beta`` (signal fraction per training step), computed in ``dtype``."""
        return torch.cumprod(1.0 - self.betas(dtype), dim=0)


def _squaredcos_cap_v2_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal: betas that make alpha_bar(t) follow a squared cosine."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1.0 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)],
        dtype=np.float64,
    )


def _is_real(value: Any) -> bool:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ArtifactError(f"scheduler config '{key}' must be an integer >= {minimum}, got {value!r}")


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ArtifactError(
            f"scheduler config '{key}' = {value!r} is not supported; expected one of {', '.join(allowed)}"
        )


def _check_trained_betas(betas: tuple[float, ...], count: int) -> None:
    if len(betas) != count:
        raise ArtifactError(
            f"scheduler config 'trained_betas' must list num_train_timesteps={count} values, got {len(betas)}"
        )
    bad = [beta for beta in betas if not _is_real(beta) or not 0.0 < beta < 1.0]
    if bad:
        raise ArtifactError(f"scheduler config 'trained_betas' must hold numbers in (0, 1), got {bad[0]!r} among them")
