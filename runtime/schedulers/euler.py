"""Euler sampler (diffusers' EulerDiscreteScheduler, no churn): one Euler step of the probability-flow ODE in
sigma space, where the latents are ``x0 + sigma * eps``."""

from __future__ import annotations

import numpy as np
import torch

from sdtrt.runtime.schedulers.base import (
    Schedule,
    StepIndex,
    build_schedule,
    check_noise,
    check_start,
    check_steps,
    coefficients_at,
    denoise_coefficients,
    sigmas_at,
    spaced_timesteps,
)
from sdtrt.runtime.schedulers.config import SchedulerConfig


def euler_sigmas(config: SchedulerConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (fractional for linspace spacing) and their ``steps + 1`` sigmas, the last one 0."""
    # Sigmas are taken at the float32 timesteps the UNet sees.
    timesteps = spaced_timesteps(config, steps, round_linspace=False).astype(np.float32).astype(np.float64)
    return timesteps, np.append(sigmas_at(config, timesteps), 0.0)


def init_noise_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """Std of the initial latents; 'leading' spacing starts below the top sigma, hence the ``+ 1``."""
    top = float(sigmas.max())
    return (top * top + 1.0) ** 0.5 if config.timestep_spacing == "leading" else top


def sigma_space_denoise(prediction_type: str, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` with ``x0 = a * x + b * model_output`` for sigma-space latents ``x = x0 + sigma * eps``."""
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    on_sample, on_model = denoise_coefficients(prediction_type, alpha, sigma * alpha)
    return on_sample * alpha, on_model


def make_schedule(
    config: SchedulerConfig,
    steps: int,
    device: torch.device | str,
    *,
    noise: torch.Tensor | None = None,
    start: int = 0,
) -> Schedule:
    """Precompute ``x_next = a[i] * x + b[i] * model_output`` for every step."""
    check_steps(steps, config)
    check_start(start, steps)
    check_noise("euler", noise, steps, stochastic=False)
    timesteps, sigmas = euler_sigmas(config, steps)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    on_sample, on_model = sigma_space_denoise(config.prediction_type, sigma)
    # x + (x - x0) / sigma * (sigma_next - sigma), with x0 written out.
    ratio = (sigma_next - sigma) / sigma
    return build_schedule(
        "euler",
        device,
        timesteps=timesteps,
        input_scale=1.0 / np.sqrt(sigma * sigma + 1.0),
        init_noise_sigma=init_noise_sigma(config, sigmas),
        signal_scale=np.ones_like(sigma),
        noise_scale=sigma,
        coefficients={"sample": 1.0 + ratio * (1.0 - on_sample), "model_output": -ratio * on_model},
    )


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1``; ``state`` is returned unchanged."""
    c = coefficients_at(schedule, i)
    return c["sample"] * sample + c["model_output"] * model_output, state
