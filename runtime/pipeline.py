"""The Stable Diffusion pipeline over an artifact folder: prompt -> text vectors -> denoising loop -> pixels.

pipe = Pipeline.from_artifacts("out/sd15", backend="onnxruntime")
result = pipe("a photo of a cat", steps=30, guidance_scale=7.5, seed=1)
result.images[0].save("cat.png")

SDXL artifacts are conditioned as diffusers' ``StableDiffusionXLPipeline`` conditions them: both text encoders'
penultimate hidden states side by side, the second encoder's pooled embedding, and six time ids (original size,
crop top-left, target size; by default the image size, (0, 0) and the image size). When no negative prompt is
given and the model asks for it (``force_zeros_for_empty_prompt``), the negative conditioning is zeros.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .denoise import Denoiser, StepBuffers
from .engine import BackendOptions, Engine, get_backend
from .errors import ArtifactError, BackendError, ConfigError, NumericsError, ShapeError
from .images import from_pil, latents_to_rgb, to_pil
from .manifest import Manifest, read_manifest, resolve_file
from .prompts import PromptTokenizer
from .schedulers import SCHEDULER_NAMES, SchedulerConfig, add_noise, default_sampler, get_scheduler, start_index
from .specs import COMPONENTS, check_size, required_components

log = logging.getLogger(__name__)

Callback = Callable[[int, int, torch.Tensor], Any]  # (step, total steps, latents) between steps


@dataclass
class StageTimes:
    """Seconds per stage of one call; ``steps`` has one entry per denoising step."""

    text_encode: float = 0.0
    denoise: float = 0.0
    steps: list[float] = field(default_factory=list)
    vae_encode: float = 0.0
    vae_decode: float = 0.0
    total: float = 0.0

    @property
    def step_median(self) -> float:
        ordered = sorted(self.steps)
        return ordered[len(ordered) // 2] if ordered else 0.0


@dataclass(frozen=True)
class _Request:
    """One call's arguments, validated and expanded to one entry per image."""

    prompts: list[str]
    negatives: list[str]
    height: int
    width: int
    scheduler: str
    steps: int
    first: int  # first step run (img2img starts later)
    seeds: list[int]
    guidance_scale: float
    shape: tuple[int, int, int, int]  # latents
    zero_negatives: bool = False  # SDXL: the negative conditioning is zeros, not an encoded prompt
    time_ids: tuple[int, ...] = ()  # SDXL: original size, crop top-left, target size (each height, width)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    times: StageTimes
    settings: dict[str, Any]
    pixels: torch.Tensor  # [B, 3, H, W] float32 in [0, 1] on the CPU, before 8-bit rounding


class _Clock:
    """Stage timer: CUDA events on a GPU (no sync until read), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, start: int, stop: int) -> float:
        a, b = self.marks[start], self.marks[stop]
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b)) / 1000.0
        return float(b - a)


def _default_device(backend: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and backend != "onnxruntime" else "cpu")


class Pipeline:
    """Text-to-image and image-to-image over the engines of one artifact folder."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        engines: dict[str, Engine],
        tokenizer: PromptTokenizer,
        scheduler_config: SchedulerConfig,
        device: torch.device,
        backend: str,
        cuda_graph: bool,
        default_scheduler: str = "euler_a",
        tokenizer_2: PromptTokenizer | None = None,
    ) -> None:
        self.folder, self.manifest, self.engines = folder, manifest, engines
        self.default_scheduler = default_scheduler  # the sampler of the model's own scheduler config
        self.tokenizer, self.scheduler_config = tokenizer, scheduler_config
        self.tokenizer_2 = tokenizer_2  # SDXL's second tokenizer (pads with "!")
        self.device, self.backend = device, backend
        self.cuda_graph = cuda_graph and device.type == "cuda" and engines["unet"].graph_capturable
        self._denoisers: dict[tuple[Any, ...], tuple[Denoiser, Any]] = {}
        self._lora: Any = None  # runtime.lora.LoraState once set_loras is called

    @classmethod
    def from_artifacts(
        cls,
        path: str | os.PathLike[str],
        backend: str = "onnxruntime",
        device: str | torch.device | None = None,
        options: BackendOptions | None = None,
        cuda_graph: bool = True,
        components: Sequence[str] = COMPONENTS,
    ) -> Pipeline:
        """Open the engines of the artifact (or engine) folder ``path`` on ``device`` with ``backend``.

        ``components`` missing from the artifact are skipped unless required (the text encoders, UNet, VAE
        decoder); without a VAE encoder, img2img is unavailable.
        """
        folder = Path(path)
        manifest = read_manifest(folder)
        module = get_backend(backend)
        usable, reason = module.available()
        if not usable:
            raise BackendError(f"backend {backend!r} cannot run here: {reason}")
        required = required_components(manifest.model)
        for name in required:
            manifest.component(name)
        present = [c for c in COMPONENTS if c in manifest.components and (c in components or c in required)]
        dev = torch.device(device) if device is not None else _default_device(backend)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
        tokenizer = PromptTokenizer.from_file(resolve_file(folder, manifest.tokenizer))
        tokenizer_2 = None
        if manifest.model.family == "sdxl":
            if not manifest.tokenizer_2:
                raise ArtifactError(f"the SDXL artifact {folder} names no second tokenizer; re-export it")
            tokenizer_2 = PromptTokenizer.from_file(resolve_file(folder, manifest.tokenizer_2))
        try:
            scheduler_data = json.loads(resolve_file(folder, manifest.scheduler).read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest.scheduler} in {folder} is not valid JSON ({exc}); re-export") from exc
        engines = module.open_engines(folder, manifest, present, dev, options or BackendOptions())
        return cls(
            folder,
            manifest,
            engines,
            tokenizer,
            SchedulerConfig.from_dict(scheduler_data),
            dev,
            backend,
            cuda_graph,
            default_scheduler=default_sampler(scheduler_data),
            tokenizer_2=tokenizer_2,
        )

    # -- lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        self._denoisers.clear()
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- LoRA ----------------------------------------------------------------------------------------------
    def set_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]] = ()) -> None:
        """Run with these LoRAs ((file, scale) pairs, applied together) from the next call on; () for none.

        No re-export or engine rebuild: the torch backend merges them into its modules, ONNX Runtime opens new
        sessions with the changed weights overridden, TensorRT refits engines built with ``--refittable``. Going
        back to none (or scale 0) restores the base model bit for bit. A LoRA that does not fit this model is
        refused before anything changes.
        """
        from .lora import LoraState, apply, read_loras

        if self._lora is None:
            self._lora = LoraState()
        files = read_loras(self._lora, loras)
        apply(self._lora, files, self.manifest, self.folder, self.engines, self.backend)
        self._denoisers.clear()  # new sessions or refitted engines: capture the step again

    @property
    def loras(self) -> list[tuple[Any, float]]:
        """The LoRAs in use: (runtime.models.lora.LoraFile, scale) pairs."""
        return list(self._lora.active) if self._lora is not None else []

    # -- stages --------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text vectors [len(prompts), 77 * windows, D], and SDXL's pooled embeddings [len(prompts), P] (else None).

        Long prompts are split into 75-token windows, each encoded on its own and concatenated along the sequence
        (A1111's convention); SDXL's pooled embedding is that of a prompt's first window, as A1111 does.
        """
        model = self.manifest.model
        windows_allowed = self.manifest.profile.max_prompt_windows
        ids = self.tokenizer.encode(prompts, max_windows=windows_allowed)
        windows = ids.shape[0] // len(prompts)
        hidden = self.engines["text_encoder"].infer({"input_ids": ids.to(self.device)})[model.text_output]
        pooled = None
        if self.tokenizer_2 is not None:
            ids_2 = self.tokenizer_2.encode(prompts, max_windows=windows_allowed, warn=False)
            out = self.engines["text_encoder_2"].infer({"input_ids": ids_2.to(self.device)})
            hidden = torch.cat([hidden, out[model.text_output].to(hidden.dtype)], dim=-1)
            pooled = out["text_embeds"].reshape(len(prompts), windows, -1)[:, 0].clone()
        return hidden.reshape(len(prompts), windows * hidden.shape[1], hidden.shape[2]).clone(), pooled

    def _encode_text(self, req: _Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's text rows for ``req``: uncond rows first when guided."""
        if not req.guided:
            return self.encode_prompts(req.prompts)
        if not req.zero_negatives:
            return self.encode_prompts(req.negatives + req.prompts)
        text, pooled = self.encode_prompts(req.prompts)
        assert pooled is not None
        return torch.cat([torch.zeros_like(text), text]), torch.cat([torch.zeros_like(pooled), pooled])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (scaled, as the UNet sees them) -> images [B, 3, H, W] in [-1, 1]."""
        engine = self.engines["vae_decoder"]
        dtype = _dtype(engine, "latent")
        image = engine.infer({"latent": (latents / self.manifest.model.scaling_factor).to(dtype)})["image"]
        return image.clone()

    def _validate(self, steps: int, guidance_scale: float, height: int, width: int, batch: int, scheduler: str) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ShapeError(f"steps must be an integer >= 1, got {steps!r}")
        if not guidance_scale >= 0:
            raise ConfigError(f"guidance_scale must be >= 0 (1 or less turns guidance off), got {guidance_scale}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)):
            raise ShapeError(f"image height and width must be integers, got {height!r} x {width!r}")
        if scheduler not in SCHEDULER_NAMES:
            raise ConfigError(f"unknown scheduler {scheduler!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
        check_size(height, width, self.manifest.model)
        self.manifest.profile.check(height, width, batch)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        seed: int | Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        num_images: int = 1,
        image: Image.Image | None = None,
        strength: float = 0.8,
        callback: Callback | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images per prompt.

        ``height``/``width`` default to the size the artifact is tuned for (its profile's opt size). Image ``k``
        of the batch uses seed ``seed + k`` (or ``seed[k]`` when a list of one seed per image is given: requests
        batched together keep their own seeds); its starting noise is drawn on the CPU, so a seed gives the same
        image on every backend and device. ``image`` + ``strength`` run img2img. ``callback(step, total,
        latents)`` runs between steps (clone ``latents`` to keep them; see ``latents_to_rgb`` for previews).

        SDXL only: ``original_size``, ``crops_coords_top_left`` and ``target_size`` ((height, width) pairs, as in
        diffusers) are the micro-conditioning; the sizes default to the image size. ``negative_prompt=None``
        gives zero negative conditioning when the model says so (``force_zeros_for_empty_prompt``), as diffusers
        does; an explicit ``""`` is encoded like any prompt.
        """
        start_time = time.perf_counter()
        req = self._request(
            prompt, negative_prompt, steps, guidance_scale, seed, height, width, scheduler, num_images, image, strength
        )
        req = self._conditioning(req, negative_prompt is None, original_size, crops_coords_top_left, target_size)
        times = StageTimes()
        clock = _Clock(self.device)

        t0 = clock.mark()  # text: uncond rows first, encoded once before the loop
        text, pooled = self._encode_text(req)
        times.text_encode = clock.seconds(t0, clock.mark())

        denoiser = self._start(req, text, pooled, image, times, clock)
        marks = [clock.mark()]
        for i in range(req.first, steps):
            denoiser.step(i)
            marks.append(clock.mark())
            if callback is not None:
                callback(i, steps, denoiser.buffers.latents)
        times.steps = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
        times.denoise = clock.seconds(marks[0], marks[-1])

        d0 = clock.mark()
        pixels = self.decode_latents(denoiser.buffers.latents)
        times.vae_decode = clock.seconds(d0, clock.mark())
        if not bool(torch.isfinite(pixels).all()):
            raise NumericsError(
                "the VAE decoder produced NaN/Inf pixels (fp16 overflow is the usual cause); re-export the "
                "vae_decoder with --precision fp32, or check the latents for NaN"
            )
        unit = (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()
        images = to_pil(unit * 2 - 1)
        times.total = time.perf_counter() - start_time
        settings = {
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": req.height,
            "width": req.width,
            "scheduler": req.scheduler,
            "strength": strength if image is not None else None,
            "backend": self.backend,
        }
        if self.loras:
            settings["loras"] = [{"name": f.name, "scale": scale, "hash": f.short_hash} for f, scale in self.loras]
        if req.time_ids:
            settings["time_ids"] = list(req.time_ids)
            settings["zero_negative"] = req.zero_negatives
        return GenerationResult(images, req.seeds, req.prompts, req.negatives, times, settings, unit)

    def _request(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        steps: int,
        guidance_scale: float,
        seed: int | Sequence[int] | None,
        height: int | None,
        width: int | None,
        scheduler: str | None,
        num_images: int,
        image: Image.Image | None,
        strength: float,
    ) -> _Request:
        """Validate a call's arguments and expand them to one entry per image."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("prompt list is empty; give at least one prompt")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ConfigError(f"num_images must be an integer >= 1, got {num_images!r}")
        negatives = _negatives(negative_prompt, len(prompts))
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]
        profile = self.manifest.profile
        height = profile.opt_height if height is None else height
        width = profile.opt_width if width is None else width
        name = scheduler or self.default_scheduler
        self._validate(steps, guidance_scale, height, width, len(prompts), name)
        first = start_index(steps, strength) if image is not None else 0
        if image is not None and "vae_encoder" not in self.engines:
            raise ArtifactError("img2img needs the vae_encoder component; export it with --components ...,vae_encoder")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        model = self.manifest.model
        shape = (len(prompts), model.latent_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
        seeds = _seeds(seed, len(prompts))
        return _Request(prompts, negatives, height, width, name, steps, first, seeds, guidance_scale, shape)

    def _conditioning(
        self,
        req: _Request,
        no_negative: bool,
        original_size: tuple[int, int] | None,
        crop: tuple[int, int],
        target_size: tuple[int, int] | None,
    ) -> _Request:
        """Add SDXL's micro-conditioning and negative-prompt rule to ``req``; other families take none of it."""
        model = self.manifest.model
        given = original_size is not None or target_size is not None or tuple(crop) != (0, 0)
        if model.family != "sdxl":
            if given:
                raise ConfigError(
                    f"original_size, crops_coords_top_left and target_size are SDXL conditioning; this is a "
                    f"{model.family} model. Leave them out"
                )
            return req
        pairs = {"original_size": original_size, "crops_coords_top_left": crop, "target_size": target_size}
        for key, pair in pairs.items():
            if pair is None:
                continue
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
                raise ConfigError(f"{key} must be two integers >= 0 (height, width), got {pair!r}")
        size = (req.height, req.width)
        time_ids = (*(original_size or size), *crop, *(target_size or size))
        zero = no_negative and model.force_zeros_for_empty_prompt
        return dataclasses.replace(req, zero_negatives=zero, time_ids=tuple(int(v) for v in time_ids))

    def _start(
        self,
        req: _Request,
        text: torch.Tensor,
        pooled: torch.Tensor | None,
        image: Image.Image | None,
        times: StageTimes,
        clock: _Clock,
    ) -> Denoiser:
        """Fill the denoiser's static buffers with this call's text, guidance and starting latents.

        Draw order per image generator matches diffusers: starting noise (or VAE sample, then noise), then the
        sampler's per-step noise.
        """
        generators = [torch.Generator().manual_seed(s) for s in req.seeds]
        sampler = get_scheduler(req.scheduler)
        shape = req.shape
        if image is None:
            init: Any = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
        else:
            init, times.vae_encode = self._encode_image(image, req.height, req.width, generators, clock)
        noise = sampler.draw_noise(req.steps, shape, generators, start=req.first)
        denoiser, schedule = self._denoiser(sampler, req.steps, req.first, shape, text, req.guided, noise)
        buffers = denoiser.buffers
        buffers.text.copy_(text.to(buffers.text.dtype))
        if pooled is not None:
            buffers.extra["text_embeds"].copy_(pooled.to(buffers.text.dtype))
            time_ids = torch.tensor(req.time_ids, dtype=torch.float32).expand(pooled.shape[0], -1)
            buffers.extra["time_ids"].copy_(time_ids.to(buffers.text.dtype))
        buffers.guidance.fill_(float(req.guidance_scale))
        if image is None:
            buffers.latents.copy_(init.to(self.device) * schedule.init_noise_sigma)
        else:
            clean, noised = init
            buffers.latents.copy_(add_noise(schedule, req.first, clean.to(self.device), noised.to(self.device)))
        buffers.state.zero_()
        return denoiser

    def _encode_image(
        self, image: Image.Image, height: int, width: int, generators: list[torch.Generator], clock: _Clock
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        """Init image -> (clean scaled latents, noise), drawing from each image's generator as diffusers does."""
        engine = self.engines["vae_encoder"]
        pixels = from_pil(image, height, width).repeat(len(generators), 1, 1, 1)
        e0 = clock.mark()
        out = engine.infer({"image": pixels.to(self.device, _dtype(engine, "image"))})
        mean, std = out["latent_mean"].float().cpu(), out["latent_std"].float().cpu()
        e1 = clock.mark()
        sample = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
        clean = (mean + std * sample) * self.manifest.model.scaling_factor
        noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
        return (clean, noise), clock.seconds(e0, e1)

    def _denoiser(
        self,
        sampler: Any,
        steps: int,
        first: int,
        shape: tuple[int, ...],
        text: torch.Tensor,
        guided: bool,
        noise: torch.Tensor | None,
    ) -> tuple[Denoiser, Any]:
        """The denoiser for this shape, reused between calls so a captured CUDA graph is replayed."""
        key = (sampler.name, steps, first, shape, tuple(text.shape), guided)
        cached = self._denoisers.get(key)
        if cached is not None:
            denoiser, schedule = cached
            if noise is not None and schedule.noise is not None:
                schedule.noise.copy_(noise.to(schedule.noise.device))
            return denoiser, schedule
        schedule = sampler.make_schedule(self.scheduler_config, steps, self.device, noise=noise, start=first)
        unet_dtype = _dtype(self.engines["unet"], "encoder_hidden_states")
        model = self.manifest.model
        extra = {}
        if model.family == "sdxl":  # static too, so a captured graph reads this call's values
            rows = text.shape[0]
            extra = {
                "text_embeds": torch.zeros((rows, model.add_text_embeds_width), dtype=unet_dtype, device=self.device),
                "time_ids": torch.zeros((rows, model.add_time_ids), dtype=unet_dtype, device=self.device),
            }
        buffers = StepBuffers(
            latents=torch.zeros(shape, device=self.device),
            state=torch.zeros(shape, device=self.device),
            index=torch.zeros((), dtype=torch.int64, device=self.device),
            text=torch.zeros(text.shape, dtype=unet_dtype, device=self.device),
            guidance=torch.zeros((), device=self.device),
            extra=extra,
        )
        denoiser = Denoiser(self.engines["unet"], sampler, schedule, buffers, guided, self.cuda_graph)
        if len(self._denoisers) >= 8:
            self._denoisers.pop(next(iter(self._denoisers)))
        self._denoisers[key] = (denoiser, schedule)
        return denoiser, schedule


def _dtype(engine: Engine, name: str) -> torch.dtype:
    for tensor in engine.inputs:
        if tensor.name == name:
            return torch.float16 if tensor.dtype == "float16" else torch.float32
    raise KeyError(name)


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per image: ``seed + k``, or the list given (one per image)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + k for k in range(count)]
    if isinstance(seed, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        if len(seed) != count:
            raise ConfigError(f"got {len(seed)} seeds for {count} images; give one seed, or one per image")
        return list(seed)
    raise ConfigError(f"seed must be an integer or a list of integers, got {seed!r}")


def _negatives(negative: str | list[str] | None, count: int) -> list[str]:
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [negative] * count
    if len(negative) != count:
        raise ConfigError(f"got {len(negative)} negative prompts for {count} prompts; give one per prompt or one")
    return list(negative)


__all__ = ["GenerationResult", "Pipeline", "StageTimes", "latents_to_rgb"]
