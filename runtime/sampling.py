"""The pipeline's stages as ComfyUI's nodes use them: conditioning, KSampler sigmas, sampling given latents, VAE.

Latents here are unscaled (VAE space, ComfyUI's ``LATENT["samples"]``); the UNet sees them times the model's
scaling factor. Sampling follows ComfyUI's KSampler (comfy/samplers.py, comfy/sample.py): starting noise is one
``torch.randn`` of the whole latent batch from a CPU generator seeded with the seed (``comfy_noise``), scaled by
``sqrt(1 + sigma0^2)`` when the first sigma is the model's largest and by ``sigma0`` otherwise, and added to the
input latents; classifier-free guidance is ``uncond + (cond - uncond) * cfg``, and cfg 1 runs the conditional
rows only; a noise mask blends each step with the noised input latents as ComfyUI's KSamplerX0Inpaint does;
ControlNets come with the conditioning (``runtime.control.comfy``), and so do an inpainting UNet's concat inputs
(``runtime.comfy_tensors``). The samplers (``runtime.schedulers.ksampling``) run in the runtime's denoising loop,
so a CUDA graph replays each step, with step caching when asked.

``ComfyStages`` holds these stages as methods of ``Pipeline``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.cache_plan import check_cache_args, check_cache_supported, full_steps
from sdtrt.runtime.comfy_tensors import (
    concat_condition,
    lcm_length,
    noised_start,
    prepare_mask,
    repeat_text,
)
from sdtrt.runtime.control.comfy import ControlApply, check_applies, fill_comfy_slots, make_comfy_slots
from sdtrt.runtime.denoise import Denoiser, DenoiserCache, StepBuffers, X0Inpaint, step_cache, zero_residuals
from sdtrt.runtime.engine import Engine, input_dtype
from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.manifest import Manifest
from sdtrt.runtime.progress import Cancel
from sdtrt.runtime.schedulers.config import SchedulerConfig
from sdtrt.runtime.schedulers.ksampling import (
    SIGMA_SAMPLERS,
    check_sigmas,
    denoised_coefficients,
    draw_step_noise,
    make_k_schedule,
    next_seed,
    require_sampler,
    sampler_module,
)
from sdtrt.runtime.schedulers.sigmas import SIGMA_SCHEDULES, ModelSampling, advanced_sigmas, ksampler_sigmas
from sdtrt.runtime.specs import check_size

# sdtrt's sampler names (``sdtrt generate --scheduler``) -> the ComfyUI sampler_name that computes the same steps
# over a sigma schedule. dpmpp_2m_karras has none: ComfyUI spells it dpmpp_2m with the karras schedule.
COMFY_SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler_a": "euler_ancestral",
    "dpmpp_2m": "dpmpp_2m",
    "ddim": "ddim",
    "lcm": "lcm",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
}
MAX_SEED = 2**64 - 1  # ComfyUI's seed widget range is [0, 0xffffffffffffffff]


@dataclass(frozen=True)
class Conditioning:
    """ComfyUI's CONDITIONING for one prompt: text vectors [1, 77 * k, D] float32 on the CPU, SDXL's pooled
    embedding [1, P] (None for other models), ControlNet applications, and an inpainting model's concat inputs."""

    text: torch.Tensor
    pooled: torch.Tensor | None = None
    controls: tuple[ControlApply, ...] = ()
    concat_latent_image: torch.Tensor | None = None  # InpaintModelConditioning: unscaled latents [1 or B, C, h, w]
    concat_mask: torch.Tensor | None = None  # InpaintModelConditioning: [h, w], [B, h, w] or [B, 1, h, w]

    def __post_init__(self) -> None:
        if not isinstance(self.text, torch.Tensor) or self.text.dim() != 3 or self.text.shape[0] != 1:
            found = tuple(self.text.shape) if isinstance(self.text, torch.Tensor) else type(self.text).__name__
            raise ShapeError(f"conditioning text must be a tensor [1, 77 * k, D], got {found}")
        if self.pooled is not None and (self.pooled.dim() != 2 or self.pooled.shape[0] != 1):
            raise ShapeError(f"a pooled embedding must be [1, P], got {tuple(self.pooled.shape)}")
        if self.concat_latent_image is not None and self.concat_latent_image.dim() != 4:
            raise ShapeError(
                f"concat_latent_image must be latents [B, C, h, w], got {tuple(self.concat_latent_image.shape)}"
            )
        if self.concat_mask is not None and self.concat_mask.dim() not in (2, 3, 4):
            raise ShapeError(
                f"concat_mask must be [h, w], [B, h, w] or [B, 1, h, w], got {tuple(self.concat_mask.shape)}"
            )


class Interrupted(Exception):
    """``sample_latents`` was cancelled before its last step; ``steps`` steps of ``total`` had run."""

    def __init__(self, steps: int, total: int) -> None:
        super().__init__(f"sampling interrupted after {steps} of {total} steps")
        self.steps, self.total = steps, total


def comfy_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """ComfyUI's starting noise (comfy/sample.py prepare_noise): one ``torch.randn`` of the whole ``shape`` from a
    CPU generator seeded with ``seed``, float32, so the same seed and latent shape give ComfyUI's noise."""
    check_seed(seed)
    return torch.randn(tuple(int(n) for n in shape), generator=torch.Generator().manual_seed(seed))


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")


@dataclass(frozen=True)
class KLayout:
    """What a sampling run's denoiser is built for, besides its sigmas and ControlNets."""

    sampler: str
    shape: tuple[int, ...]  # latents
    text_shape: tuple[int, ...]  # the UNet's text rows
    guided: bool
    masked: bool  # a noise mask
    plan: tuple[bool, ...] | None  # step caching: which steps run the full UNet


class ComfyStages:
    """ComfyUI's stages over this pipeline's engines (a base of ``Pipeline``)."""

    engines: dict[str, Engine]
    manifest: Manifest
    scheduler_config: SchedulerConfig
    device: torch.device
    cuda_graph: bool
    controlnets: list[str]
    _denoisers: DenoiserCache
    _model_sampling: ModelSampling | None = None
    encode_prompts: Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor | None]]  # Pipeline's

    @property
    def model_sampling(self) -> ModelSampling:
        """The model's sigma table (ComfyUI's ModelSamplingDiscrete), from its scheduler config."""
        if self._model_sampling is None:
            self._model_sampling = ModelSampling.from_config(self.scheduler_config)
        return self._model_sampling

    def encode_conditioning(self, prompt: str, clip_skip: int = 1) -> Conditioning:
        """ComfyUI's CLIPTextEncode: the prompt's text vectors (75-token windows side by side) and pooled output."""
        if not isinstance(prompt, str):
            raise ConfigError(f"a prompt must be a string, got {type(prompt).__name__}")
        text, pooled = self.encode_prompts([prompt], clip_skip)
        return Conditioning(text.float().cpu(), None if pooled is None else pooled.float().cpu())

    def ksampler_sigmas(self, scheduler: str, steps: int, denoise: float = 1.0) -> np.ndarray:
        """The KSampler node's sigmas for ``scheduler`` (one of SIGMA_SCHEDULES), ``steps`` and ``denoise``."""
        return ksampler_sigmas(self.model_sampling, scheduler, steps, denoise)

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """ComfyUI's VAEDecode: unscaled latents [B, C, h, w] -> IMAGE [B, H, W, 3] float32 in [0, 1] (CPU)."""
        latents = self._check_latents(latents)
        engine = self.engines["vae_decoder"]
        image = engine.infer({"latent": latents.to(self.device, input_dtype(engine, "latent"))})["image"]
        return torch.clamp((image.float().cpu() + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI's VAEEncode: IMAGE [B, H, W, 3+] in [0, 1] -> unscaled latents (the VAE's mean, no sampling),
        after cropping each side to a multiple of the VAE's factor around the center, as ComfyUI crops."""
        if "vae_encoder" not in self.engines:
            raise ConfigError("this artifact has no vae_encoder; re-export it with the VAE encoder to encode images")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3:
            found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ShapeError(f"images must be a tensor [B, H, W, 3] in [0, 1], got {found}")
        factor = self.manifest.model.vae_scale_factor
        pixels = images[..., :3].float().cpu()
        for dim in (1, 2):
            size = pixels.shape[dim]
            keep = (size // factor) * factor
            if keep == 0:
                raise ShapeError(f"images must be at least {factor} pixels on each side, got {tuple(images.shape)}")
            pixels = pixels.narrow(dim, (size % factor) // 2, keep)
        self.manifest.profile.check(pixels.shape[1], pixels.shape[2], pixels.shape[0])
        engine = self.engines["vae_encoder"]
        feed = (pixels.movedim(-1, 1) * 2.0 - 1.0).to(self.device, input_dtype(engine, "image"))
        return engine.infer({"image": feed})["latent_mean"].float().cpu().clone()

    def sample_latents(
        self,
        latents: torch.Tensor,
        positive: Conditioning,
        negative: Conditioning,
        *,
        sampler: str,
        sigmas: np.ndarray | torch.Tensor | Sequence[float],
        cfg: float,
        seed: int,
        add_noise: bool = True,
        noise_mask: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor], Any] | None = None,
        cancel: Cancel | None = None,
        cache_interval: int = 1,
        cache_schedule: str = "uniform",
    ) -> torch.Tensor:
        """ComfyUI's KSampler over ``sigmas`` from unscaled ``latents`` [B, C, h, w]; returns unscaled latents.

        ``sampler``: one of SIGMA_SAMPLERS. ``add_noise`` False starts from ``latents`` as they are (zero noise).
        ``noise_mask`` (SetLatentNoiseMask): 1 where the latents are resampled, 0 where they are kept.
        ``callback(step, total, latents)`` runs after each step with the current unscaled latents. ``cancel`` is
        read before each step; once set, ``Interrupted`` is raised. No sigmas: the latents come back unchanged.
        ``cache_interval`` > 1: step caching, the full UNet on one step in N (``cache_schedule`` "uniform" or
        "quadratic", see ``runtime.cache_plan``) and the shallow one between.
        """
        require_sampler(sampler)
        table = check_sigmas(sigmas)
        latents = self._check_latents(latents, unet=True)
        self._check_options(positive, negative, cfg, seed, (cache_interval, cache_schedule))
        if table.size == 0:
            return latents.clone()
        scale = self.manifest.model.scaling_factor
        noise = comfy_noise(latents.shape, seed) if add_noise else torch.zeros_like(latents)
        clean = latents * scale
        start = noised_start(noise, clean, table[0], self.model_sampling.sigma_max)
        if table.size == 1:
            return start / scale
        mask = None if noise_mask is None else prepare_mask(noise_mask, tuple(latents.shape))
        guided = not math.isclose(cfg, 1.0)
        everywhere = check_applies(
            positive.controls, negative.controls, self.controlnets, self.manifest.model.control_ready
        )
        text, pooled = self._text_rows(positive, negative, latents.shape[0], guided)
        plan = full_steps(table.size - 1, 0, cache_interval, cache_schedule) if cache_interval > 1 else None
        layout = KLayout(sampler, tuple(latents.shape), tuple(text.shape), guided, mask is not None, plan)
        denoiser = self._k_denoiser(layout, table, seed, positive.controls, everywhere)
        buffers = denoiser.buffers
        buffers.latents.copy_(start.to(self.device))
        buffers.state.zero_()
        buffers.guidance.fill_(float(cfg))
        if mask is not None:
            self._fill_mask(buffers, mask, clean, noise, sampler, seed)
        conds = (negative, positive) if guided else (positive,)
        self._fill_conditioning(denoiser, conds, (text, pooled), table, (clean, mask))
        return self._run(denoiser, table.size - 1, scale, callback, cancel)

    # -- helpers -------------------------------------------------------------------------------------------
    def _fill_conditioning(
        self,
        denoiser: Denoiser,
        conds: tuple[Conditioning, ...],
        rows: tuple[torch.Tensor, torch.Tensor | None],
        sigmas: np.ndarray,
        init: tuple[torch.Tensor, torch.Tensor | None],
    ) -> None:
        """Copy the text rows (SDXL: and pooled outputs), ControlNet hints and an inpainting UNet's concat channels
        of ``conds`` (negative first when guided; ``init``: the scaled input latents and the prepared noise mask)
        into the denoiser's buffers."""
        buffers, (text, pooled), positive = denoiser.buffers, rows, conds[-1]
        shape = tuple(buffers.latents.shape)
        buffers.text.copy_(text.to(buffers.text.dtype))
        if pooled is not None:
            self._fill_sdxl(buffers, pooled, shape)
        fill_comfy_slots(denoiser.controls, positive.controls, self.model_sampling, sigmas, shape[0])
        if buffers.condition is not None:
            scale = self.manifest.model.scaling_factor
            concat = [concat_condition((c.concat_latent_image, c.concat_mask), *init, scale) for c in conds]
            buffers.condition.copy_(torch.cat(concat).to(self.device))

    def _check_latents(self, latents: torch.Tensor, unet: bool = False) -> torch.Tensor:
        channels = self.manifest.model.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != channels:
            found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ShapeError(f"latents must be a tensor [B, {channels}, h, w] for this model, got {found}")
        if not bool(torch.isfinite(latents).all()):
            raise ShapeError("latents hold NaN or Inf values")
        factor = self.manifest.model.vae_scale_factor  # engines are built for the profile's sizes only
        height, width = latents.shape[2] * factor, latents.shape[3] * factor
        if unet:  # the UNet's downsampling
            check_size(height, width, self.manifest.model)
        self.manifest.profile.check(height, width, latents.shape[0])
        return latents.float().cpu()

    def _check_options(
        self, positive: Conditioning, negative: Conditioning, cfg: float, seed: int, cache: tuple[int, str]
    ) -> None:
        for name, cond in (("positive", positive), ("negative", negative)):
            if not isinstance(cond, Conditioning):
                raise ConfigError(f"{name} must be a Conditioning (Pipeline.encode_conditioning), got {cond!r}")
            if (cond.pooled is None) != (self.manifest.model.family != "sdxl"):
                raise ShapeError(
                    f"the {name} conditioning's pooled embedding does not fit this {self.manifest.model.family} model"
                )
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise ConfigError(f"cfg must be a finite number, got {cfg!r}")
        check_seed(seed)
        check_cache_args(*cache)
        check_cache_supported(cache[0], self.engines, "this pipeline")

    def _text_rows(
        self, positive: Conditioning, negative: Conditioning, batch: int, guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's text rows: the negative's for each latent, then the positive's (positive only at cfg 1)."""
        conds = [negative, positive] if guided else [positive]
        length = lcm_length(*(c.text for c in conds))
        text = torch.cat([repeat_text(c.text, length).expand(batch, -1, -1) for c in conds])
        if positive.pooled is None:
            return text, None
        return text, torch.cat([c.pooled.expand(batch, -1) for c in conds if c.pooled is not None])

    def _fill_sdxl(self, buffers: StepBuffers, pooled: torch.Tensor, shape: torch.Size) -> None:
        # ComfyUI's SDXL time ids: original and target size = the latent size in pixels, crop (0, 0)
        factor = self.manifest.model.vae_scale_factor
        height, width = shape[2] * factor, shape[3] * factor
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(pooled.shape[0], -1)
        buffers.extra["text_embeds"].copy_(pooled.to(buffers.text.dtype))
        buffers.extra["time_ids"].copy_(ids.to(buffers.text.dtype))

    def _fill_mask(
        self,
        buffers: StepBuffers,
        mask: torch.Tensor,
        clean: torch.Tensor,
        noise: torch.Tensor,
        sampler: str,
        seed: int,
    ) -> None:
        inpaint = buffers.x0_inpaint
        assert inpaint is not None
        if sampler == "ddim":  # ComfyUI's ddim blends fresh noise of seed + 1 (inpaint_options "random")
            noise = torch.randn(tuple(noise.shape), generator=torch.Generator().manual_seed(next_seed(seed)))
        inpaint.mask.copy_(mask.to(self.device))
        inpaint.clean.copy_(clean.to(self.device))
        inpaint.noise.copy_(noise.to(self.device))

    def _k_denoiser(
        self, layout: KLayout, sigmas: np.ndarray, seed: int, applies: Sequence[ControlApply], everywhere: bool
    ) -> Denoiser:
        """The denoiser for ``layout`` and these sigmas and ControlNets, kept between calls so a captured CUDA graph
        is replayed (its per-step noise refreshed for ``seed``)."""
        shape, rows = layout.shape, layout.text_shape[0]
        noise = draw_step_noise(layout.sampler, sigmas, shape, seed)
        key = ("comfy", layout, tuple(float(s) for s in sigmas), tuple(a.name for a in applies), everywhere)
        cached = self._denoisers.get(key, noise)
        if cached is not None:
            return cached
        model, unet, family = self.model_sampling, self.engines["unet"], self.manifest.model
        schedule = make_k_schedule(layout.sampler, model, sigmas, self.device, noise)
        widths = {"text_embeds": family.add_text_embeds_width, "time_ids": family.add_time_ids}
        dtype = input_dtype(unet, "encoder_hidden_states")
        extra = widths if family.family == "sdxl" else None
        buffers = StepBuffers.allocate(shape, layout.text_shape, dtype, self.device, extra)
        factor, steps = family.vae_scale_factor, len(sigmas) - 1
        size = (shape[2] * factor, shape[3] * factor)
        hint_rows = (rows, False) if everywhere or not layout.guided else (shape[0], True)
        slots = make_comfy_slots(applies, self.engines, size, steps, hint_rows, self.device)
        if not slots:
            buffers.residuals = zero_residuals(unet, rows, shape[2], shape[3], self.device)
        if family.inpainting:
            buffers.condition = torch.zeros((rows, family.condition_channels, shape[2], shape[3]), device=self.device)
        if layout.masked:
            sigma = sigmas[:-1].astype(np.float64)
            a, b = denoised_coefficients(model.prediction_type, sigma)
            levels = torch.from_numpy(np.stack([sigma, a, b], axis=1)).float().to(self.device)
            zeros = torch.zeros(shape, device=self.device)
            buffers.x0_inpaint = X0Inpaint(zeros.clone(), zeros.clone(), zeros.clone(), levels)
        cache = step_cache(self.engines, layout.plan, buffers, slots) if layout.plan is not None else None
        engines = [unet] + [slot.engine for slot in slots] + ([cache.shallow] if cache else [])
        use_graph = self.cuda_graph and all(engine.graph_capturable for engine in engines)
        sampler = sampler_module(layout.sampler)
        denoiser = Denoiser(unet, sampler, schedule, buffers, layout.guided, use_graph, slots, cache)
        self._denoisers.put(key, denoiser)
        return denoiser

    def _run(
        self,
        denoiser: Denoiser,
        steps: int,
        scale: float,
        callback: Callable[[int, int, torch.Tensor], Any] | None,
        cancel: Cancel | None,
    ) -> torch.Tensor:
        for i in range(steps):
            if cancel is not None and cancel.is_set():
                raise Interrupted(i, steps)
            denoiser.step(i)
            if callback is not None:
                callback(i, steps, denoiser.buffers.latents.float().cpu() / scale)
        return denoiser.buffers.latents.float().cpu() / scale


__all__ = [
    "COMFY_SAMPLERS",
    "ControlApply",
    "SIGMA_SAMPLERS",
    "SIGMA_SCHEDULES",
    "ComfyStages",
    "Conditioning",
    "Interrupted",
    "advanced_sigmas",
    "comfy_noise",
    "prepare_mask",
]
