"""DDIM sampler with eta = 0 (diffusers' DDIMScheduler): predict x0 and eps, then re-noise x0
deterministically to the previous timestep ``t - num_train_timesteps // steps``."""

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
    epsilon_coefficients,
    spaced_timesteps,
    training_alphas_cumprod,
)
from sdtrt.runtime.schedulers.config import SchedulerConfig


def make_schedule(
    config: SchedulerConfig,
    steps: int,
    device: torch.device | str,
    *,
    noise: torch.Tensor | None = None,
    start: int = 0,
) -> Schedule:
    """Precompute x0 / eps predictions and ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps``."""
    check_steps(steps, config)
    check_start(start, steps)
    check_noise("ddim", noise, steps, stochastic=False)
    timesteps = spaced_timesteps(config, steps, round_linspace=True)
    alphas_cumprod = training_alphas_cumprod(config)
    current = timesteps.astype(np.int64)
    # diffusers steps back by a fixed stride whatever the spacing; below 0 it uses the "final" alpha_bar.
    previous = current - config.num_train_timesteps // steps
    final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
    ab = alphas_cumprod[current]
    ab_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    x0_sample, x0_model = denoise_coefficients(config.prediction_type, alpha, sigma)
    eps_sample, eps_model = epsilon_coefficients(config.prediction_type, alpha, sigma)
    return build_schedule(
        "ddim",
        device,
        timesteps=timesteps,
        input_scale=1.0,
        init_noise_sigma=1.0,
        signal_scale=alpha,
        noise_scale=sigma,
        coefficients={
            "x0_sample": x0_sample,
            "x0_model": x0_model,
            "eps_sample": eps_sample,
            "eps_model": eps_model,
            "x0": np.sqrt(ab_prev),
            "eps": np.sqrt(1.0 - ab_prev),
        },
        clip_sample=config.clip_sample,
    )


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1``; ``state`` is returned unchanged."""
    c = coefficients_at(schedule, i)
    x0 = c["x0_sample"] * sample + c["x0_model"] * model_output
    if schedule.clip_sample:
        x0 = x0.clamp(-1.0, 1.0)
    # eps comes from the unclipped prediction, as in diffusers (use_clipped_model_output=False).
    eps = c["eps_sample"] * sample + c["eps_model"] * model_output
    return c["x0"] * x0 + c["eps"] * eps, state
