"""ComfyUI's samplers (k-diffusion) over a given list of sigmas, as ``Schedule``s for the runtime's step loop.

Each k-diffusion sampler this runtime offers is, per step, a linear combination of the latents ``x``, the model's
denoised prediction, the previous step's denoised prediction and fresh noise, with coefficients that depend only
on the sigmas. So each one reuses the step function of the runtime sampler with the same update (euler,
euler_ancestral, dpmpp_2m, lcm) with coefficients computed here from the sigma list, and the existing
``Denoiser`` loop (and its CUDA graph) runs it. The UNet gets ComfyUI's integer timestep of each sigma and
``x / sqrt(sigma^2 + 1)``.

Stochastic samplers (euler_ancestral, lcm) add one ``torch.randn`` of the latents' shape per step whose next sigma
is above 0, drawn in step order from one generator: ComfyUI's ``default_noise_sampler`` with the KSampler seed. On
the CPU, ComfyUI seeds that generator with ``seed + 1`` (so it does not repeat the starting noise); on a GPU it uses
a CUDA generator seeded with ``seed``, whose numbers no CPU generator gives. This runtime draws the noise on the CPU
the way ComfyUI does on the CPU, so the same seed gives the same images as ComfyUI run on the CPU, on every backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, MissingDependencyError, ShapeError
from sdtrt.runtime.schedulers import Schedule, Scheduler
from sdtrt.runtime.schedulers.base import build_schedule
from sdtrt.runtime.schedulers.sigmas import ModelSampling

Coefficients = dict[str, np.ndarray]


def denoised_coefficients(prediction_type: str, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` with ComfyUI's denoised prediction ``a * x + b * model_output`` at ``sigma``."""
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / np.sqrt(sigma * sigma + 1.0)
    return np.ones_like(sigma), -sigma


def _euler(sigma: np.ndarray, sigma_next: np.ndarray, a: np.ndarray, b: np.ndarray) -> Coefficients:
    # x + (x - denoised) / sigma * (sigma_next - sigma), with denoised = a x + b out
    ratio = (sigma_next - sigma) / sigma
    return {"sample": 1.0 + ratio * (1.0 - a), "model_output": -ratio * b}


def _euler_ancestral(sigma: np.ndarray, sigma_next: np.ndarray, a: np.ndarray, b: np.ndarray) -> Coefficients:
    # k-diffusion's get_ancestral_step with eta 1: step down to sigma_down, then add sigma_up of fresh noise
    up = np.minimum(sigma_next, np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = np.sqrt(sigma_next**2 - up**2)
    return {**_euler(sigma, down, a, b), "noise": np.where(down == 0.0, 0.0, up)}


def _dpmpp_2m(sigma: np.ndarray, sigma_next: np.ndarray, a: np.ndarray, b: np.ndarray) -> Coefficients:
    # DPM-Solver++(2M): x_next = (s_next / s) x + (1 - s_next / s) * D, with D the denoised prediction, corrected
    # with the previous one from the second step on (first order on the first step and onto sigma 0)
    ratio = sigma_next / sigma
    weight = 1.0 - ratio
    on_x0, on_prev = weight.copy(), np.zeros_like(weight)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.log(sigma / sigma_next)
        h_last = np.log(np.concatenate([[np.nan], sigma[:-1]]) / sigma)
        half_inverse_r = h / (2.0 * h_last)
    second = (np.arange(len(sigma)) > 0) & (sigma_next > 0)
    on_x0[second] = weight[second] * (1.0 + half_inverse_r[second])
    on_prev[second] = -weight[second] * half_inverse_r[second]
    return {"x0_sample": a, "x0_model": b, "sample": ratio, "x0": on_x0, "x0_prev": on_prev}


def _dpmpp_2m_sde(sigma: np.ndarray, sigma_next: np.ndarray, a: np.ndarray, b: np.ndarray) -> Coefficients:
    # eta 1, midpoint: with h = log(sigma / sigma_next) and g = 1 - exp(-2h), x_next = (sigma_next / sigma) exp(-h) x
    # + g D (+ g / (2 r) (D - D_prev) from the second step on, r = h_prev / h) + sigma_next sqrt(g) noise;
    # the step onto sigma 0 returns D
    last = sigma_next == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.log(sigma / sigma_next)
        g = -np.expm1(-2.0 * h)
        half_inverse_r = h / (2.0 * np.concatenate([[np.nan], h[:-1]]))
    second = (np.arange(len(sigma)) > 0) & ~last
    on_x0 = np.where(last, 1.0, g)
    on_prev = np.zeros_like(sigma)
    on_x0[second] = g[second] * (1.0 + half_inverse_r[second])
    on_prev[second] = -g[second] * half_inverse_r[second]
    on_sample = np.where(last, 0.0, sigma_next / sigma * np.exp(-np.where(last, 0.0, h)))
    noise = np.where(last, 0.0, sigma_next * np.sqrt(np.where(last, 0.0, g)))
    return {"x0_sample": a, "x0_model": b, "sample": on_sample, "x0": on_x0, "x0_prev": on_prev, "noise": noise}


def _lcm(sigma: np.ndarray, sigma_next: np.ndarray, a: np.ndarray, b: np.ndarray) -> Coefficients:
    # x_next = denoised + sigma_next * fresh noise
    ones = np.ones_like(sigma)
    return {"x0_sample": a, "x0_model": b, "skip": 0 * ones, "out": ones, "denoised": ones, "noise": sigma_next}


# ComfyUI sampler name -> (the runtime sampler module whose step runs it, its coefficients, stochastic). ComfyUI's
# "ddim" is its euler sampler (comfy/samplers.py sampler_object); it differs only in the noise a noise mask blends.
_SAMPLERS: Mapping[str, tuple[str, Callable[..., Coefficients], bool]] = MappingProxyType(
    {
        "euler": ("euler", _euler, False),
        "euler_ancestral": ("euler_ancestral", _euler_ancestral, True),
        "dpmpp_2m": ("dpmpp_2m", _dpmpp_2m, False),
        "ddim": ("euler", _euler, False),
        "lcm": ("lcm", _lcm, True),
        "dpmpp_2m_sde": ("dpmpp_2m_sde", _dpmpp_2m_sde, True),
    }
)
SIGMA_SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)
# Samplers that need an optional module: (module, what needs it, the extra that installs it)
_NEEDS: Mapping[str, tuple[str, str, str]] = MappingProxyType(
    {"dpmpp_2m_sde": ("torchsde", "the dpmpp_2m_sde sampler (ComfyUI's Brownian-tree noise)", "sde")}
)


def require_sampler(sampler: str) -> None:
    """``ConfigError`` for a sampler that is not one of SIGMA_SAMPLERS, ``MissingDependencyError`` (naming the
    install) when the module it needs does not import."""
    _entry(sampler)
    if sampler in _NEEDS:
        require(*_NEEDS[sampler])


def available_samplers() -> tuple[str, ...]:
    """SIGMA_SAMPLERS whose optional modules import here."""
    available = []
    for sampler in SIGMA_SAMPLERS:
        try:
            require_sampler(sampler)
        except MissingDependencyError:
            continue
        available.append(sampler)
    return tuple(available)


def check_sigmas(sigmas: np.ndarray | torch.Tensor | list[float]) -> np.ndarray:
    """``sigmas`` as a float32 array; raises ShapeError unless it is 1-D, finite and >= 0."""
    array = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ShapeError(f"sigmas must be a 1-D list of finite numbers >= 0, got {np.asarray(sigmas)!r}")
    if array.size > 1 and np.any(array[:-1] == 0):
        raise ShapeError(f"only the last sigma may be 0 (a step from sigma 0 is undefined), got {array.tolist()}")
    return array.astype(np.float32)


def stochastic(sampler: str) -> bool:
    """Whether ``sampler`` adds fresh noise on its steps."""
    return _entry(sampler)[2]


def sampler_module(sampler: str) -> Scheduler:
    """The runtime sampler whose ``step`` runs ComfyUI's ``sampler``."""
    module = importlib.import_module(f"sdtrt.runtime.schedulers.{_entry(sampler)[0]}")
    return Scheduler(name=sampler, module=module)


def draw_step_noise(sampler: str, sigmas: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor | None:
    """The per-step noise of a stochastic ``sampler`` ([steps, *shape], zeros on steps onto sigma 0), drawn as
    ComfyUI draws it on the CPU (a Brownian tree for dpmpp_2m_sde); None for a deterministic one."""
    if not stochastic(sampler):
        return None
    if sampler == "dpmpp_2m_sde":
        return brownian_step_noise(sigmas, shape, seed)
    generator = torch.Generator().manual_seed(next_seed(seed))
    steps = len(sigmas) - 1
    noise = torch.zeros((steps, *shape))
    for i in range(steps):
        if sigmas[i + 1] > 0:
            noise[i] = torch.randn(shape, generator=generator)
    return noise


def brownian_step_noise(sigmas: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-step noise from a Brownian motion over [smallest sigma > 0, largest sigma], as ComfyUI's
    BrownianTreeNoiseSampler on the CPU: a torchsde ``BrownianTree`` with entropy ``seed`` (the KSampler seed as is)
    and zeros of the latents' shape at its start; step i's noise is the increment from sigma[i] down to sigma[i+1]
    over sqrt(sigma[i] - sigma[i+1]). The tree's values depend on the entropy only, not on the order of queries."""
    steps = len(sigmas) - 1
    noise = torch.zeros((steps, *shape))
    table = torch.from_numpy(np.asarray(sigmas, dtype=np.float32).copy())
    live = [i for i in range(steps) if table[i + 1] > 0]
    if not live:
        return noise
    torchsde = require(*_NEEDS["dpmpp_2m_sde"])
    tree = torchsde.BrownianTree(table[table > 0].min(), torch.zeros(shape), table.max(), entropy=seed)
    for i in live:
        high, low = table[i], table[i + 1]
        noise[i] = -tree(low, high) / (low - high).abs().sqrt()  # time runs from high sigma to low: the sign flips
    return noise


def next_seed(seed: int) -> int:
    """``seed + 1``, the seed ComfyUI's CPU noise sampler uses; the largest seed wraps to 0 (where ComfyUI's own
    ``manual_seed(2**64)`` fails)."""
    return (seed + 1) % 2**64


def make_k_schedule(
    sampler: str,
    model: ModelSampling,
    sigmas: np.ndarray,
    device: torch.device | str,
    noise: torch.Tensor | None = None,
) -> Schedule:
    """The ``Schedule`` of ComfyUI's ``sampler`` over ``sigmas`` (at least 2), with the per-step ``noise`` of a
    stochastic sampler (``draw_step_noise``)."""
    _, coefficients, is_stochastic = _entry(sampler)
    if len(sigmas) < 2:
        raise ShapeError(f"a schedule needs at least 2 sigmas (one step), got {len(sigmas)}")
    if is_stochastic != (noise is not None):
        raise ShapeError(f"{sampler} {'needs' if is_stochastic else 'takes no'} per-step noise")
    table = sigmas.astype(np.float64)
    sigma, sigma_next = table[:-1], table[1:]
    a, b = denoised_coefficients(model.prediction_type, sigma)
    timesteps = model.timestep(torch.from_numpy(sigmas[:-1].copy())).double().numpy()
    return build_schedule(
        f"comfy_{sampler}",
        device,
        timesteps=timesteps,
        input_scale=1.0 / np.sqrt(sigma * sigma + 1.0),
        init_noise_sigma=1.0,
        signal_scale=np.ones_like(sigma),
        noise_scale=sigma,
        coefficients=coefficients(sigma, sigma_next, a, b),
        noise=noise,
    )


def _entry(sampler: str) -> tuple[str, Callable[..., Coefficients], bool]:
    if sampler not in _SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SIGMA_SAMPLERS)}")
    return _SAMPLERS[sampler]


__all__ = [
    "SIGMA_SAMPLERS",
    "available_samplers",
    "brownian_step_noise",
    "check_sigmas",
    "denoised_coefficients",
    "draw_step_noise",
    "make_k_schedule",
    "next_seed",
    "require_sampler",
    "sampler_module",
    "stochastic",
]
