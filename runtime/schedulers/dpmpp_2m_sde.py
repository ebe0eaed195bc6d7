"""DPM-Solver++(2M) SDE, as k-diffusion's ``sample_dpmpp_2m_sde`` (eta 1, midpoint): the DPM-Solver++(2M) update
on the previous step's denoised prediction, plus fresh noise on every step that does not land on sigma 0.

Only ComfyUI's sampling runs it (``runtime.schedulers.ksampling``, which computes its coefficients from the sigmas
and draws its noise from a Brownian tree); the caller carries the previous denoised prediction in ``state``.
"""

from __future__ import annotations

import torch

from sdtrt.runtime.schedulers.base import Schedule, StepIndex, coefficients_at, noise_at


def step(
    schedule: Schedule, i: StepIndex, model_output: torch.Tensor, sample: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of step ``i + 1`` (with pre-drawn ``schedule.noise[i]``) and the new state (this step's x0)."""
    c = coefficients_at(schedule, i)
    x0 = c["x0_sample"] * sample + c["x0_model"] * model_output
    ode = c["sample"] * sample + c["x0"] * x0 + c["x0_prev"] * state
    return ode + c["noise"] * noise_at(schedule, i), x0
