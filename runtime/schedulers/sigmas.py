"""ComfyUI's noise levels: the model's sigma table and the sigma schedules its KSampler nodes pick from.

ComfyUI samples in sigma space (k-diffusion): a schedule is a descending list of ``steps + 1`` sigmas ending in 0,
and the UNet is called at the training timestep nearest to each sigma (an integer, unlike diffusers' interpolated
timesteps). ``ModelSampling`` is the table of a discrete-time model (ComfyUI's ``ModelSamplingDiscrete``): training
sigmas from the betas in float64, stored as float32. Each schedule is written from its published definition and
computed in float32 torch ops, as ComfyUI computes it, so a setting gives ComfyUI's sigmas to the last bit or
within float32 rounding. ``ksampler_sigmas`` applies the KSampler node's ``denoise`` rule and ``advanced_sigmas``
the KSamplerAdvanced node's start/end slicing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.schedulers.config import SchedulerConfig


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """A discrete-time model's noise table: ``sigmas[t]`` for every training timestep ``t`` (ascending)."""

    sigmas: torch.Tensor  # [T] float32
    log_sigmas: torch.Tensor  # [T] float32, the log taken in float64 before rounding
    prediction_type: str  # "epsilon" or "v_prediction"

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> ModelSampling:
        """The table of a model's scheduler config: alphas_cumprod in float64, sigmas rounded to float32."""
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"ComfyUI sampling supports epsilon and v_prediction models, this one predicts "
                f"{config.prediction_type!r}; use sdtrt's own samplers (Pipeline.__call__) for it"
            )
        alphas_cumprod = config.alphas_cumprod(torch.float64)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(sigmas.float(), sigmas.log().float(), config.prediction_type)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep (int64) whose log-sigma is nearest to each ``sigma``'s."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(1, -1) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).reshape(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timesteps: linear interpolation of log-sigma between training timesteps."""
        t = torch.as_tensor(timestep).float().clamp(0, self.sigmas.shape[0] - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def _normal(model: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Evenly spaced timesteps from the last training timestep to the first; "sgm_uniform" leaves out the end."""
    start = model.timestep(torch.tensor(model.sigma_max))
    end = model.timestep(torch.tensor(model.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model.sigma(end)), 0.0, abs_tol=1e-5):  # a zero-SNR table already ends at 0
            steps, append_zero = steps + 1, False
        timesteps = torch.linspace(start, end, steps)
    values = [float(model.sigma(t)) for t in timesteps]
    return torch.tensor(values + ([0.0] if append_zero else []), dtype=torch.float32)


def _simple(model: ModelSampling, steps: int) -> torch.Tensor:
    """Every (T / steps)-th training sigma from the top, truncated to an index."""
    stride = model.sigmas.shape[0] / steps
    values = [float(model.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(values + [0.0], dtype=torch.float32)


def _ddim_uniform(model: ModelSampling, steps: int) -> torch.Tensor:
    """Training sigmas 1, 1 + k, 1 + 2k, ... (k = T // steps), reversed; may hold more than ``steps`` + 1."""
    values: list[float] = []
    if math.isclose(float(model.sigmas[1]), 0.0, abs_tol=1e-5):
        steps += 1
    else:
        values = [0.0]
    stride = max(model.sigmas.shape[0] // steps, 1)
    values += [float(model.sigmas[x]) for x in range(1, model.sigmas.shape[0], stride)]
    return torch.tensor(values[::-1], dtype=torch.float32)


def _karras(model: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: uniform in ``sigma ** (1 / rho)`` from sigma_max down to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps)
    low, high = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return torch.cat([(high + ramp * (low - high)) ** rho, torch.zeros(1)])


def _exponential(model: ModelSampling, steps: int) -> torch.Tensor:
    """Uniform in log-sigma from sigma_max down to sigma_min, then 0."""
    sigmas = torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), steps).exp()
    return torch.cat([sigmas, torch.zeros(1)])


def _linear_quadratic(model: ModelSampling, steps: int, threshold: float = 0.025) -> torch.Tensor:
    """Genmo's Mochi schedule: linear in the first half down to ``threshold``, quadratic after, times sigma_max."""
    if steps == 1:
        levels = [1.0, 0.0]
    else:
        linear = steps // 2
        linear_part = [i * threshold / linear for i in range(linear)]
        diff = linear - threshold * steps
        quadratic = steps - linear
        quad_coef = diff / (linear * quadratic**2)
        lin_coef = threshold / linear - 2 * diff / (quadratic**2)
        const = quad_coef * (linear**2)
        quad_part = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear, steps)]
        levels = [1.0 - x for x in linear_part + quad_part + [1.0]]
    return torch.tensor(levels, dtype=torch.float32) * model.sigmas[-1]


def _kl_optimal(model: ModelSampling, steps: int) -> torch.Tensor:
    """Uniform in arctan(sigma) from sigma_max to sigma_min (A1111 PR 15608, "Align Your Steps" KL-optimal), then 0."""
    if steps < 2:
        raise ConfigError(f"the kl_optimal schedule needs steps >= 2 (it divides by steps - 1), got {steps}")
    ramp = torch.arange(steps, dtype=torch.float32).div_(steps - 1)
    sigmas = torch.zeros(steps + 1)
    sigmas[:-1] = (ramp * math.atan(model.sigma_min) + (1 - ramp) * math.atan(model.sigma_max)).tan_()
    return sigmas


def _beta(model: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. (2024, arXiv 2407.12173): training timesteps at the Beta(0.6, 0.6) quantiles of 1, 1 - 1/steps,
    ..., 1/steps, rounded (half to even), repeats dropped; their sigmas, then 0. May hold fewer than steps + 1."""
    last = model.sigmas.shape[0] - 1
    levels = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    timesteps = np.rint(beta_quantile(levels, alpha, beta) * last).astype(np.int64)
    keep = np.concatenate([[True], timesteps[1:] != timesteps[:-1]])
    values = [float(model.sigmas[int(t)]) for t in timesteps[keep]]
    return torch.tensor(values + [0.0], dtype=torch.float32)


def beta_quantile(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The quantiles of the Beta(a, b) distribution at probabilities ``q`` in [0, 1], in float64, by bisection on
    its CDF to the last bit (what ``scipy.stats.beta.ppf`` gives, without scipy)."""
    q = np.asarray(q, dtype=np.float64)
    low, high = np.zeros_like(q), np.ones_like(q)
    for _ in range(64):  # halves [0, 1] down to float64's resolution
        mid = 0.5 * (low + high)
        below = beta_cdf(mid, a, b) < q
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return np.where(q >= 1.0, 1.0, np.where(q <= 0.0, 0.0, 0.5 * (low + high)))


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), taken on the
    side where it converges fast: I_x(a, b) = 1 - I_(1-x)(b, a)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    flip = x > (a + 1.0) / (a + b + 2.0)
    xs, aa, bb = np.where(flip, 1.0 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    inner = (0.0 < xs) & (xs < 1.0)
    xs = np.where(inner, xs, 0.5)  # the ends are set below; keep the logs finite
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # B(a, b) = B(b, a): one value for both sides
    front = np.exp(aa * np.log(xs) + bb * np.log1p(-xs) - log_beta) / aa
    value = front * _beta_fraction(xs, aa, bb)
    return np.where(inner, np.where(flip, 1.0 - value, value), np.where(x >= 1.0, 1.0, 0.0))


def _beta_fraction(x: np.ndarray, a: np.ndarray, b: np.ndarray, terms: int = 300) -> np.ndarray:
    tiny = 1e-300
    c = np.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, terms + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + numerator / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1.0) < 3e-16):
            break
    return h


# ComfyUI's scheduler names, in its own order.
SCHEDULES: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": _simple,
    "sgm_uniform": lambda model, steps: _normal(model, steps, sgm=True),
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
SIGMA_SCHEDULES: tuple[str, ...] = tuple(SCHEDULES)
MAX_STEPS = 10000


def calculate_sigmas(model: ModelSampling, schedule: str, steps: int) -> np.ndarray:
    """ComfyUI's ``calculate_sigmas``: the float32 sigmas of ``schedule`` for ``steps`` steps."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown sigma schedule {schedule!r}; expected one of: {', '.join(SIGMA_SCHEDULES)}")
    _check_steps(steps)
    return SCHEDULES[schedule](model, steps).numpy().astype(np.float32)


def ksampler_sigmas(model: ModelSampling, schedule: str, steps: int, denoise: float = 1.0) -> np.ndarray:
    """The KSampler node's sigmas: the full schedule when ``denoise`` > 0.9999, none when it is <= 0, else the
    last ``steps + 1`` sigmas of a schedule of ``int(steps / denoise)`` steps."""
    _check_steps(steps)
    if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not math.isfinite(denoise):
        raise ConfigError(f"denoise must be a number in [0, 1], got {denoise!r}")
    if denoise > 0.9999:
        return calculate_sigmas(model, schedule, steps)
    if denoise <= 0.0:
        return np.zeros(0, dtype=np.float32)
    total = int(steps / denoise)
    if total > MAX_STEPS:
        raise ConfigError(f"steps / denoise = {total} steps is too many (at most {MAX_STEPS}); raise denoise")
    return calculate_sigmas(model, schedule, total)[-(steps + 1) :]


def advanced_sigmas(sigmas: Sequence[float] | np.ndarray, start: int, end: int, force_full_denoise: bool) -> np.ndarray:
    """The KSamplerAdvanced node's slice: sigmas up to step ``end`` (the last set to 0 when
    ``force_full_denoise``), then from step ``start``; empty when ``start`` leaves no step to run."""
    for name, value in (("start_at_step", start), ("end_at_step", end)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    sigmas = np.array(sigmas, dtype=np.float32)
    if end < len(sigmas) - 1:
        sigmas = sigmas[: end + 1]
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start < len(sigmas) - 1:
        return sigmas[start:]
    return np.zeros(0, dtype=np.float32)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")


__all__ = [
    "SIGMA_SCHEDULES",
    "ModelSampling",
    "advanced_sigmas",
    "calculate_sigmas",
    "ksampler_sigmas",
]
