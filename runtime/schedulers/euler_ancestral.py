"""Euler ancestral sampler (diffusers' EulerAncestralDiscreteScheduler): an Euler step down to ``sigma_down``,
then fresh noise of std ``sigma_up`` brings the latents to the next sigma."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sdtrt.runtime.schedulers.base import (
    Generator,
    Schedule,
    StepIndex,
    build_schedule,
    check_noise,
    check_start,
    check_steps,
    coefficients_at,
    draw_step_noise,
    noise_at,
)
from sdtrt.runtime.schedulers.config import SchedulerConfig
from sdtrt.runtime.schedulers.euler import euler_sigmas, init_noise_sigma, sigma_space_denoise


def draw_noise(
    steps: int,
    shape: Sequence[int],
    generator: Generator,
    *,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[steps, *shape]`` noise, one draw per executed step in order (diffusers draws one in every step).
    Call it after drawing the initial latents from the same generator, as diffusers does."""
    check_start(start, steps)
    return draw_step_noise(steps, shape, generator, first=start, stop=steps, dtype=dtype)


def make_schedule(
    config: SchedulerConfig,
    steps: int,
    device: torch.device | str,
    *,
    noise: torch.Tensor | None = None,
    start: int = 0,
) -> Schedule:
    """Precompute ``x_next = a[i] * x + b[i] * model_output + c[i] * noise[i]`` for every step."""
    check_steps(steps, config)
    check_start(start, steps)
    check_noise("euler_ancestral", noise, steps, stochastic=True)
    timesteps, sigmas = euler_sigmas(config, steps)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = sigma_next**2 / sigma  # sqrt(sigma_next**2 - sigma_up**2), without the cancellation
    on_sample, on_model = sigma_space_denoise(config.prediction_type, sigma)
    ratio = (sigma_down - sigma) / sigma
    return build_schedule(
        "euler_a",
        device,
        timesteps=timesteps,
        input_scale=1.0 / np.sqrt(sigma * sigma + 1.0),
        init_noise_sigma=init_noise_sigma(config, sigmas),
        signal_scale=np.ones_like(sigma),
        noise_scale=sigma,
        coefficients={
            "sample": 1.0 + ratio * (1.0 - on_sample),
            "model_output": -ratio * on_model,
            "noise": sigma_up,
        },
        noise=noise,
    )


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1``, using pre-drawn ``schedule.noise[i]``; ``state`` is returned unchanged."""
    c = coefficients_at(schedule, i)
    ode_step = c["sample"] * sample + c["model_output"] * model_output
    return ode_step + c["noise"] * noise_at(schedule, i), state
