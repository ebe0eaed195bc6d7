"""DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2,
midpoint, final sigma 0), optionally on Karras sigmas.

The second-order update needs the previous step's denoised prediction, which the caller carries in ``state``.
The first executed step and the last step are first order, as in diffusers (the last step lands on sigma 0).
"""

from __future__ import annotations

import numpy as np
import torch

from sdtrt.runtime.errors import ShapeError
from sdtrt.runtime.schedulers.base import (
    Schedule,
    StepIndex,
    build_schedule,
    check_noise,
    check_start,
    check_steps,
    coefficients_at,
    denoise_coefficients,
    karras_sigmas,
    sigmas_at,
    timesteps_for_sigmas,
    training_sigmas,
)
from sdtrt.runtime.schedulers.config import SchedulerConfig


def solver_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """Descending timesteps: this solver spaces ``steps + 1`` points and drops the last (except trailing)."""
    train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, train - 1, steps + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(steps + 1) * (train // (steps + 1)))[::-1][:-1] + config.steps_offset
    else:
        timesteps = np.round(train - np.arange(steps) * (train / steps)) - 1
    return np.ascontiguousarray(timesteps, dtype=np.float64)


def solver_sigmas(config: SchedulerConfig, steps: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and the ``steps + 1`` sigmas they run at, the last one 0."""
    if karras:
        table = training_sigmas(config)
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
        timesteps = timesteps_for_sigmas(config, sigmas)
        if config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        timesteps = solver_timesteps(config, steps)
        sigmas = sigmas_at(config, timesteps)
    if np.any(np.diff(sigmas) >= 0) or timesteps.max() > config.num_train_timesteps - 1:
        raise ShapeError(
            f"{steps} steps with '{config.timestep_spacing}' spacing give repeated or out-of-range timesteps "
            f"for {config.num_train_timesteps} training timesteps; use fewer steps"
        )
    return timesteps, np.append(sigmas, 0.0)


def make_schedule(
    config: SchedulerConfig,
    steps: int,
    device: torch.device | str,
    *,
    noise: torch.Tensor | None = None,
    start: int = 0,
    karras: bool = False,
) -> Schedule:
    """Precompute ``x_next = a[i] x + b[i] x0 + c[i] x0_prev`` where ``x0 = d[i] x + e[i] model_output``.

    ``start`` is the first step that will run (img2img): that step is first order (``c = 0``).
    """
    check_steps(steps, config)
    check_start(start, steps)
    check_noise("dpmpp_2m", noise, steps, stochastic=False)
    timesteps, sigmas = solver_sigmas(config, steps, karras)
    alpha = 1.0 / np.sqrt(sigmas * sigmas + 1.0)
    sigma_t = sigmas * alpha
    x0_sample, x0_model = denoise_coefficients(config.prediction_type, alpha[:-1], sigma_t[:-1])
    # First order: x' = (sigma_t'/sigma_t) x + alpha' (1 - e^-h) x0, with e^-h = sigmas[i+1] / sigmas[i].
    first = alpha[1:] * (1.0 - sigmas[1:] / sigmas[:-1])
    on_x0, on_prev = first.copy(), np.zeros(steps)
    # Second order (midpoint) on steps that have a previous x0 and do not land on sigma 0:
    # x0 + (x0 - x0_prev) / (2 r), with r = h_prev / h.
    second = np.arange(start + 1, steps - 1)
    if second.size:
        log_sigmas = np.log(sigmas[:-1])
        r = (log_sigmas[second - 1] - log_sigmas[second]) / (log_sigmas[second] - np.log(sigmas[second + 1]))
        on_x0[second] = first[second] * (1.0 + 0.5 / r)
        on_prev[second] = -first[second] * 0.5 / r
    return build_schedule(
        "dpmpp_2m_karras" if karras else "dpmpp_2m",
        device,
        timesteps=timesteps,
        input_scale=1.0,
        init_noise_sigma=1.0,
        signal_scale=alpha[:-1],
        noise_scale=sigma_t[:-1],
        coefficients={
            "x0_sample": x0_sample,
            "x0_model": x0_model,
            "sample": sigma_t[1:] / sigma_t[:-1],
            "x0": on_x0,
            "x0_prev": on_prev,
        },
    )


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1`` and the new state (this step's x0 prediction).

    ``state`` must hold the previous step's x0 prediction, or anything finite (e.g. zeros) on the first step.
    """
    c = coefficients_at(schedule, i)
    x0 = c["x0_sample"] * sample + c["x0_model"] * model_output
    return c["sample"] * sample + c["x0"] * x0 + c["x0_prev"] * state, x0
