"""What every sampler shares: the precomputed ``Schedule``, step indexing, img2img noising and noise drawing.

A sampler is ``make_schedule`` (all per-step numbers, computed once in float64 on the CPU and stored as
float32 device tensors) plus a pure ``step``. ``step`` indexes those tensors with the step index, which may be
a python int or a 0-dim int64 device tensor that a captured CUDA graph reads on every replay; so nothing here
calls ``.item()`` or branches on tensor values, and per-step special cases live in the coefficients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdtrt.runtime.errors import ShapeError
from sdtrt.runtime.schedulers.config import SchedulerConfig

StepIndex = int | torch.Tensor
Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True, eq=False)
class Schedule:
    """Every per-step number one sampling run needs, on the device; per-step tensors have ``steps`` rows.

    ``timesteps`` goes to the UNet, ``input_scale`` multiplies the latents fed to it, ``init_noise_sigma``
    scales the initial Gaussian latents (once, before the loop). ``signal_scale``/``noise_scale`` give the
    latents at step ``i`` as ``signal_scale[i] * clean + noise_scale[i] * noise`` (img2img).
    ``coefficients`` holds the sampler's own per-step numbers, one column per name in ``columns``.
    ``noise`` is the pre-drawn per-step noise of stochastic samplers, ``[steps, *latent_shape]``.
    """

    name: str
    timesteps: torch.Tensor
    input_scale: torch.Tensor
    init_noise_sigma: float
    signal_scale: torch.Tensor
    noise_scale: torch.Tensor
    coefficients: torch.Tensor
    columns: tuple[str, ...]
    noise: torch.Tensor | None = None
    clip_sample: bool = False

    def __post_init__(self) -> None:
        steps = self.timesteps.shape[0]
        for values in (self.input_scale, self.signal_scale, self.noise_scale):
            assert values.shape == (steps,), (values.shape, steps)
        assert self.coefficients.shape == (steps, len(self.columns)), self.coefficients.shape
        assert self.noise is None or self.noise.shape[0] == steps

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def device(self) -> torch.device:
        return self.timesteps.device


def at_step(values: torch.Tensor, i: StepIndex) -> torch.Tensor:
    """Row ``i`` of a per-step tensor. A tensor index goes through ``index_select``, because plain indexing
    with a 0-dim integer tensor reads it back to the host (a sync that breaks graph capture)."""
    if isinstance(i, torch.Tensor):
        return values.index_select(0, i.reshape(1)).squeeze(0)
    return values[i]


def coefficients_at(schedule: Schedule, i: StepIndex) -> dict[str, torch.Tensor]:
    """The sampler's coefficients of step ``i`` by name, as 0-dim device tensors (one gather for all)."""
    row = at_step(schedule.coefficients, i)
    return {name: row[column] for column, name in enumerate(schedule.columns)}


def noise_at(schedule: Schedule, i: StepIndex) -> torch.Tensor:
    assert schedule.noise is not None, f"{schedule.name} schedule was built without noise"
    return at_step(schedule.noise, i)


def initial_state(sample: torch.Tensor) -> torch.Tensor:
    """The ``state`` to pass to the first step: zeros shaped like the latents."""
    return torch.zeros_like(sample)


def add_noise(schedule: Schedule, i: StepIndex, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise clean latents to the level of step ``i`` (img2img starts the loop there)."""
    return at_step(schedule.signal_scale, i) * original + at_step(schedule.noise_scale, i) * noise


def start_index(steps: int, strength: float) -> int:
    """First step an img2img run executes: it runs the last ``int(steps * strength)`` steps."""
    check_steps(steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ShapeError(f"img2img strength must be in (0, 1], got {strength!r}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise ShapeError(
            f"strength {strength} of {steps} steps runs no denoising step; use strength >= {1 / steps:.3g} "
            "or more steps"
        )
    return steps - run


def check_steps(steps: int, config: SchedulerConfig | None = None, limit: int | None = None, why: str = "") -> None:
    """Raise ShapeError unless ``1 <= steps <= limit`` (default limit: the config's training timesteps)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ShapeError(f"steps must be an integer >= 1, got {steps!r}")
    if limit is None and config is not None:
        limit, why = config.num_train_timesteps, " (the config's num_train_timesteps)"
    if limit is not None and steps > limit:
        raise ShapeError(f"steps must be <= {limit}{why}, got {steps}")


def check_start(start: int, steps: int) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < steps:
        raise ShapeError(f"start must be a step index in [0, {steps - 1}], got {start!r}")


def spaced_timesteps(config: SchedulerConfig, steps: int, round_linspace: bool) -> np.ndarray:
    """Descending training timesteps for ``steps`` sampling steps, by ``config.timestep_spacing``."""
    train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0.0, train - 1, steps)[::-1]
        if round_linspace:
            timesteps = timesteps.round()
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(steps) * (train // steps))[::-1] + config.steps_offset
    else:
        timesteps = np.round(train - np.arange(steps) * (train / steps)) - 1
    timesteps = np.ascontiguousarray(timesteps, dtype=np.float64)
    if timesteps.max() > train - 1:
        raise ShapeError(
            f"{steps} steps with '{config.timestep_spacing}' spacing and steps_offset={config.steps_offset} "
            f"reach timestep {timesteps.max():g}, past the last training timestep {train - 1}; "
            "use fewer steps"
        )
    return timesteps


def training_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """The training table every sampler starts from, as float64.

    It is computed in float32 because that is how diffusers defines it: at t = 0, ``1 - alpha_bar`` keeps only
    a few float32 digits, which moves the smallest sigma by up to 1e-4 relative, and Karras schedules start
    from that sigma, so a float64 table would not reproduce diffusers' images. Everything derived from the
    table is computed in float64.
    """
    return config.alphas_cumprod(torch.float32).double().numpy()


def training_sigmas(config: SchedulerConfig) -> np.ndarray:
    """Noise-to-signal ratio ``sqrt((1 - alpha_bar) / alpha_bar)`` of every training timestep (ascending)."""
    alphas_cumprod = training_alphas_cumprod(config)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigmas_at(config: SchedulerConfig, timesteps: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linearly interpolated between training timesteps."""
    table = training_sigmas(config)
    return np.interp(timesteps, np.arange(table.shape[0]), table)


def timesteps_for_sigmas(config: SchedulerConfig, sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma is ``sigmas``, interpolating linearly in log-sigma."""
    log_table = np.log(training_sigmas(config))
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_table, np.arange(log_table.shape[0]))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): uniform in ``sigma ** (1 / rho)`` from ``sigma_max`` down to ``sigma_min``."""
    ramp = np.linspace(0.0, 1.0, steps)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (high + ramp * (low - high)) ** rho


def denoise_coefficients(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(a, b)`` with ``x0 = a * x_t + b * model_output`` where ``x_t = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    assert prediction_type == "sample", prediction_type
    return np.zeros_like(alpha), np.ones_like(alpha)


def epsilon_coefficients(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(a, b)`` with ``eps = a * x_t + b * model_output`` where ``x_t = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        return np.zeros_like(alpha), np.ones_like(alpha)
    if prediction_type == "v_prediction":
        return sigma, alpha
    assert prediction_type == "sample", prediction_type
    return 1.0 / sigma, -alpha / sigma


def build_schedule(
    name: str,
    device: torch.device | str,
    *,
    timesteps: np.ndarray,
    input_scale: np.ndarray,
    init_noise_sigma: float,
    signal_scale: np.ndarray,
    noise_scale: np.ndarray,
    coefficients: Mapping[str, np.ndarray],
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
) -> Schedule:
    """Cast the float64 per-step arrays to float32 and move them, and the noise, to ``device``."""

    def to_device(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(values, dtype=np.float64)).to(torch.float32).to(device)

    table = np.stack([np.broadcast_to(values, timesteps.shape) for values in coefficients.values()], axis=1)
    return Schedule(
        name=name,
        timesteps=to_device(timesteps),
        input_scale=to_device(np.broadcast_to(input_scale, timesteps.shape)),
        init_noise_sigma=float(init_noise_sigma),
        signal_scale=to_device(np.broadcast_to(signal_scale, timesteps.shape)),
        noise_scale=to_device(np.broadcast_to(noise_scale, timesteps.shape)),
        coefficients=to_device(table),
        columns=tuple(coefficients),
        noise=None if noise is None else noise.to(device),
        clip_sample=clip_sample,
    )


def check_noise(name: str, noise: torch.Tensor | None, steps: int, stochastic: bool) -> None:
    """Stochastic samplers need ``[steps, *latent_shape]`` pre-drawn noise; the others take none."""
    if not stochastic:
        if noise is not None:
            raise ShapeError(f"{name} is deterministic and takes no noise, got a tensor of {tuple(noise.shape)}")
        return
    if noise is None or not isinstance(noise, torch.Tensor) or noise.dim() < 2 or noise.shape[0] != steps:
        found = "None" if noise is None else f"shape {tuple(getattr(noise, 'shape', ()))}"
        raise ShapeError(
            f"{name} needs pre-drawn noise of shape [{steps}, *latent_shape], got {found}; "
            f"draw it with sdtrt.runtime.schedulers.{name}.draw_noise(steps, latent_shape, generator)"
        )


def draw_step_noise(
    steps: int,
    shape: Sequence[int],
    generator: Generator,
    *,
    first: int,
    stop: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[steps, *shape]`` noise whose rows ``first..stop-1`` are drawn in step order (zeros elsewhere).

    Each row is one ``torch.randn(shape)`` on the generator's device, as diffusers draws it inside its
    ``step``, so a seeded generator gives the same numbers; a list gives one generator per batch item.
    """
    check_steps(steps)
    shape = tuple(int(size) for size in shape)
    rows = [_randn(shape, generator, dtype) for _ in range(first, stop)]
    device = rows[0].device if rows else "cpu"
    noise = torch.zeros((steps, *shape), dtype=dtype, device=device)
    if rows:
        noise[first:stop] = torch.stack(rows)
    return noise


def _randn(shape: tuple[int, ...], generator: Generator, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(generator, Sequence):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ShapeError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
        else:
            return torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            )
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
