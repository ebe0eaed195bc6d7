"""Latent Consistency Model sampler (diffusers' LCMScheduler): each step predicts x0, applies the consistency
boundary-condition scalings, and re-noises the result to the next timestep with fresh noise (not after the
last step). Timesteps come from the distillation schedule of ``original_inference_steps`` steps; the
config's timestep spacing and offset do not apply."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sdtrt.runtime.errors import ShapeError
from sdtrt.runtime.schedulers.base import (
    Generator,
    Schedule,
    StepIndex,
    build_schedule,
    check_noise,
    check_start,
    check_steps,
    coefficients_at,
    denoise_coefficients,
    draw_step_noise,
    noise_at,
    training_alphas_cumprod,
)
from sdtrt.runtime.schedulers.config import SchedulerConfig

SIGMA_DATA = 0.5


def draw_noise(
    steps: int,
    shape: Sequence[int],
    generator: Generator,
    *,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[steps, *shape]`` noise, one draw per executed step but the last (whose row stays zero), in order.
    Call it after drawing the initial latents from the same generator, as diffusers does."""
    check_start(start, steps)
    return draw_step_noise(steps, shape, generator, first=start, stop=steps - 1, dtype=dtype)


def lcm_timesteps(config: SchedulerConfig, steps: int, original_inference_steps: int) -> np.ndarray:
    """``steps`` timesteps picked evenly (from the top) out of the distillation schedule."""
    stride = config.num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * stride - 1)[::-1]
    picks = np.floor(np.linspace(0, origin.shape[0], num=steps, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.float64)


def make_schedule(
    config: SchedulerConfig,
    steps: int,
    device: torch.device | str,
    *,
    noise: torch.Tensor | None = None,
    start: int = 0,
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
) -> Schedule:
    """Precompute ``x_next = n[i] (skip[i] x + out[i] x0) + m[i] noise[i]``, ``x0 = a[i] x + b[i] output``."""
    train = config.num_train_timesteps
    if isinstance(original_inference_steps, bool) or not isinstance(original_inference_steps, int):
        raise ShapeError(f"original_inference_steps must be an integer, got {original_inference_steps!r}")
    if not 1 <= original_inference_steps <= train:
        raise ShapeError(f"original_inference_steps must be in [1, {train}], got {original_inference_steps}")
    check_steps(steps, limit=original_inference_steps, why=" (LCM picks its steps from original_inference_steps)")
    check_start(start, steps)
    check_noise("lcm", noise, steps, stochastic=True)
    timesteps = lcm_timesteps(config, steps, original_inference_steps)
    alphas_cumprod = training_alphas_cumprod(config)
    current = timesteps.astype(np.int64)
    ab = alphas_cumprod[current]
    ab_next = alphas_cumprod[np.append(current[1:], current[-1])]
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    x0_sample, x0_model = denoise_coefficients(config.prediction_type, alpha, sigma)
    scaled = timesteps * timestep_scaling
    last = np.arange(steps) == steps - 1
    return build_schedule(
        "lcm",
        device,
        timesteps=timesteps,
        input_scale=1.0,
        init_noise_sigma=1.0,
        signal_scale=alpha,
        noise_scale=sigma,
        coefficients={
            "x0_sample": x0_sample,
            "x0_model": x0_model,
            "skip": SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2),
            "out": scaled / np.sqrt(scaled**2 + SIGMA_DATA**2),
            "denoised": np.where(last, 1.0, np.sqrt(ab_next)),
            "noise": np.where(last, 0.0, np.sqrt(1.0 - ab_next)),
        },
        noise=noise,
        clip_sample=config.clip_sample,
    )


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1`` (denoised latents after the last step); ``state`` is returned unchanged."""
    c = coefficients_at(schedule, i)
    x0 = c["x0_sample"] * sample + c["x0_model"] * model_output
    if schedule.clip_sample:
        x0 = x0.clamp(-1.0, 1.0)
    denoised = c["skip"] * sample + c["out"] * x0
    return c["denoised"] * denoised + c["noise"] * noise_at(schedule, i), state
