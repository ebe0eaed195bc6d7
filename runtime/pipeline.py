"""The Stable Diffusion pipeline over an artifact folder: prompt -> text vectors -> denoising loop -> pixels.

pipe = Pipeline.from_artifacts("out/sd15", backend="onnxruntime")
result = pipe("a photo of a cat", steps=30, guidance_scale=7.5, seed=1)
result.images[0].save("cat.png")

The pipeline is a recipe over stages that can also be called on their own: ``request.make_request`` (validate
and expand the arguments), ``encode_text``, ``prepare_latents``, ``denoise`` and ``decode_latents``; ``__call__``
runs them in that order. SDXL artifacts are conditioned as diffusers' ``StableDiffusionXLPipeline`` conditions
them: both text encoders' penultimate hidden states side by side, the second encoder's pooled embedding, and the
micro-conditioning time ids of the request (see ``runtime.request``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from sdtrt.runtime.control.inputs import ControlInput, check_controls
from sdtrt.runtime.control.slots import control_key, control_settings, fill_slots, make_slots
from sdtrt.runtime.denoise import Denoiser, DenoiserCache, InpaintBlend, StepBuffers, step_cache, zero_residuals
from sdtrt.runtime.engine import BackendOptions, Engine, get_backend, input_dtype
from sdtrt.runtime.errors import ArtifactError, BackendError, ConfigError
from sdtrt.runtime.images import from_pil, latents_to_rgb, to_pil, unit_pixels
from sdtrt.runtime.inpaint import Inpaint, MaskPlan, composite, fill_condition, plan_inpaint, start_inpaint
from sdtrt.runtime.manifest import Manifest, read_manifest, resolve_file
from sdtrt.runtime.progress import Cancel
from sdtrt.runtime.prompts import PromptTokenizer
from sdtrt.runtime.request import LoraSetting, Request, Settings, make_request
from sdtrt.runtime.sampling import ComfyStages
from sdtrt.runtime.schedulers import SchedulerConfig, add_noise, default_sampler, get_scheduler
from sdtrt.runtime.specs import COMPONENTS, required_components
from sdtrt.runtime.text_encode import encode_prompts
from sdtrt.runtime.timing import StageClock, StageTimes
from sdtrt.runtime.vae_encode import encode_image, inpaint_condition

log = logging.getLogger(__name__)

Callback = Callable[[int, int, torch.Tensor], Any]  # (step, total steps, latents) between steps
E = TypeVar("E", bound=Engine)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    times: StageTimes
    settings: Settings
    pixels: torch.Tensor  # [B, 3, H, W] float32 in [0, 1] on the CPU, before 8-bit rounding
    interrupted: bool = False  # stopped early by ``cancel``: the images are the latents of the last step run


def _default_device(backend: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and backend != "onnxruntime" else "cpu")


class Pipeline(ComfyStages):
    """Text-to-image and image-to-image over one artifact folder's engines; ComfyUI's stages: ``ComfyStages``."""

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
        self._graph_allowed = cuda_graph and device.type == "cuda"
        self.cuda_graph = self._graph_allowed and engines["unet"].graph_capturable
        self._denoisers = DenoiserCache()
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
        # ControlNets: all the artifact has unless components are chosen, then those named
        chosen = tuple(components) == COMPONENTS
        present += [c for c in manifest.controlnets.values() if chosen or c in components]
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

    # -- engines -------------------------------------------------------------------------------------------
    def wrap_engine(self, name: str, wrap: Callable[[Engine], E]) -> E:
        """Run engine ``name`` as ``wrap(engine)`` from the next call on, and return the new engine.

        For recorders, counters or a stand-in (``wrap`` may ignore its argument). Cached denoisers hold the old
        engine (and maybe a CUDA graph captured over it), so they are dropped; the step is captured as a graph
        again only when the new UNet allows it.
        """
        if name not in self.engines:
            raise ConfigError(f"no engine {name!r} in this pipeline; it has: {', '.join(self.engines)}")
        wrapped = wrap(self.engines[name])
        self.engines[name] = wrapped
        self._denoisers.clear()
        self.cuda_graph = self._graph_allowed and self.engines["unet"].graph_capturable
        return wrapped

    # -- ControlNet ----------------------------------------------------------------------------------------
    @property
    def controlnets(self) -> list[str]:
        """The names of the artifact's ControlNets open in this pipeline (for ``ControlInput.name``)."""
        return [name for name, component in self.manifest.controlnets.items() if component in self.engines]

    def check_controls(self, controls: Sequence[ControlInput]) -> None:
        """Refuse controls this pipeline cannot run (``ControlError``), before any work."""
        available = {name: self.manifest.controlnets[name] for name in self.controlnets}
        model = self.manifest.model
        check_controls(controls, available, model.control_ready, self.manifest.controlnet_families(), model.family)

    # -- LoRA ----------------------------------------------------------------------------------------------
    def set_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]] = ()) -> None:
        """Run with these LoRAs ((file, scale) pairs, applied together) from the next call on; () for none.

        No re-export or engine rebuild: the torch backend merges them into its modules, ONNX Runtime opens new
        sessions with the changed weights overridden, TensorRT refits engines built with ``--refittable``. Going
        back to none (or scale 0) restores the base model bit for bit. A LoRA that does not fit this model is
        refused before anything changes.
        """
        from sdtrt.runtime.lora import LoraState, apply, read_loras

        if self._lora is None:
            self._lora = LoraState()
        files = read_loras(self._lora, loras)
        apply(self._lora, files, self.manifest, self.folder, self.engines, self.backend)
        self._denoisers.clear()  # new sessions or refitted engines: capture the step again

    @property
    def loras(self) -> list[tuple[Any, float]]:
        """The LoRAs in use: ``runtime.lora.ActiveLora`` (file, scale) pairs."""
        return list(self._lora.active) if self._lora is not None else []

    def lora_settings(self) -> list[LoraSetting]:
        """The LoRAs in use as a generation's settings report them (name, scale, short hash)."""
        return [LoraSetting(f.name, scale, f.short_hash) for f, scale in self.loras]

    # -- stages --------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text vectors [len(prompts), 77 * windows, D], and SDXL's pooled embeddings [len(prompts), P] (else None).

        Long prompts are split into 75-token windows, each encoded on its own and concatenated along the sequence
        (A1111's convention); SDXL's pooled embedding is that of a prompt's first window, as A1111 does.
        """
        tokenizers = (self.tokenizer, self.tokenizer_2)
        return encode_prompts(self.engines, tokenizers, self.manifest, prompts, clip_skip, self.device)

    def encode_text(self, req: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's text rows for ``req``: uncond rows first when guided (zeros where SDXL asks for them)."""
        if not req.guided:
            return self.encode_prompts(req.prompts, req.clip_skip)
        if not req.zero_negatives:  # clip skip holds for the negatives too, as in A1111
            return self.encode_prompts(req.negatives + req.prompts, req.clip_skip)
        text, pooled = self.encode_prompts(req.prompts, req.clip_skip)
        assert pooled is not None
        return torch.cat([torch.zeros_like(text), text]), torch.cat([torch.zeros_like(pooled), pooled])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (scaled, as the UNet sees them) -> images [B, 3, H, W] in [-1, 1]."""
        engine = self.engines["vae_decoder"]
        dtype = input_dtype(engine, "latent")
        image = engine.infer({"latent": (latents / self.manifest.model.scaling_factor).to(dtype)})["image"]
        return image.clone()

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
        init_latents: torch.Tensor | None = None,
        callback: Callback | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        controls: Sequence[ControlInput] = (),
        cache_interval: int = 1,
        cache_schedule: str = "uniform",
        clip_skip: int = 1,
        cancel: Cancel | None = None,
        inpaint: Inpaint | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images per prompt, at the artifact's tuned size (profile opt) by default.

        Image ``k`` uses seed ``seed + k`` (or ``seed[k]`` for a list of one seed per image: requests batched
        together keep their own seeds); seeds are 0..2**32-1, None or -1 draws a random one (see ``result.seeds``).
        Starting noise is drawn on the CPU, so a seed gives the same image on every backend and device. ``image`` +
        ``strength`` run img2img, or ``init_latents`` + ``strength`` from scaled latents [1 or B, C, h, w] (their size
        by default). ``callback(step, total, latents)`` runs between steps (clone ``latents`` to keep them; see
        ``latents_to_rgb`` for previews). SDXL only: ``original_size``, ``crops_coords_top_left``,
        ``target_size`` ((height, width) pairs, as in diffusers; sizes default to the image size) are the
        micro-conditioning; ``negative_prompt=None`` gives zero negative conditioning when the model says so
        (``force_zeros_for_empty_prompt``), as diffusers does; an explicit ``""`` is encoded like any prompt.
        ``controls`` run ControlNets of the artifact (one ``ControlInput`` each; see ``runtime.control``).
        ``cache_interval`` > 1 runs the full UNet on one step in N (``cache_schedule``: "uniform" or "quadratic")
        and the shallow one in between (step caching; see ``runtime.cache_plan``). ``clip_skip`` N: the text
        encoder's hidden state N layers from the end conditions the images (``runtime.clip_skip``; 1: the last).
        ``cancel`` (e.g. ``threading.Event``) is read before each step: once set, the latents as they are are
        decoded and ``result.interrupted`` is True (as A1111 ends an interrupted job). ``inpaint`` (with ``image``
        and ``strength``) repaints only the white part of its mask (``runtime.inpaint``).
        """
        start_time = time.perf_counter()
        req = make_request(
            self.manifest,
            self.default_scheduler,
            self.engines,
            prompt,
            negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            height=height,
            width=width,
            scheduler=scheduler,
            num_images=num_images,
            image=image,
            strength=strength,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            cache_interval=cache_interval,
            cache_schedule=cache_schedule,
            clip_skip=clip_skip,
            init_latents=init_latents,
        )
        self.check_controls(controls)
        hints = [control.hint(req.width, req.height) for control in controls]  # bad images fail before work
        factor = self.manifest.model.vae_scale_factor
        plan = plan_inpaint(inpaint, image, req.width, req.height, factor) if inpaint is not None else None
        times, clock = StageTimes(), StageClock(self.device)
        t0 = clock.mark()  # text: uncond rows first, encoded once before the loop
        text, pooled = self.encode_text(req)
        times.text_encode = clock.seconds(t0, clock.mark())
        hinted = list(zip(controls, hints, strict=True))
        work = plan.image if plan is not None else image
        denoiser = self.prepare_latents(req, text, pooled, work, times, hinted, init_latents, plan)
        latents = self.denoise(denoiser, req, callback, times, cancel)
        interrupted = len(times.steps) < req.steps - req.first
        d0 = clock.mark()
        pixels = self.decode_latents(latents)
        times.vae_decode = clock.seconds(d0, clock.mark())
        unit = unit_pixels(pixels) if plan is None else composite(plan, unit_pixels(pixels))
        images = to_pil(unit * 2 - 1)
        times.total = time.perf_counter() - start_time
        settings = Settings.of(req, self.backend, self.lora_settings(), control_settings(controls))
        return GenerationResult(images, req.seeds, req.prompts, req.negatives, times, settings, unit, interrupted)

    def prepare_latents(
        self,
        req: Request,
        text: torch.Tensor,
        pooled: torch.Tensor | None,
        image: Image.Image | None = None,
        times: StageTimes | None = None,
        controls: Sequence[tuple[ControlInput, torch.Tensor]] = (),
        init_latents: torch.Tensor | None = None,
        plan: MaskPlan | None = None,
    ) -> Denoiser:
        """A denoiser whose static buffers hold this call's text, guidance, starting latents and ControlNet
        hints and scales (``controls``: each ``ControlInput`` with its hint [1, 3, H, W] at the image size), and
        its inpainting (``plan``, over ``image``: the masks and the init image's latents).

        Draw order per image generator matches diffusers: starting noise (or VAE sample, then noise; inpainting:
        then the masked image's VAE sample), then the sampler's per-step noise (``init_latents``: given, then
        noise). The VAE encoder's time goes to ``times``.
        """
        generators = [torch.Generator().manual_seed(s) for s in req.seeds]
        sampler = get_scheduler(req.scheduler)
        shape, scaling = req.shape, self.manifest.model.scaling_factor
        if init_latents is not None:
            clean = init_latents.float().cpu().expand(shape[0], -1, -1, -1)
            init: Any = (clean, torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]))
        elif image is None:
            init = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
        else:
            pixels = from_pil(image, req.height, req.width)
            init, seconds = encode_image(self.engines["vae_encoder"], pixels, generators, scaling, self.device)
            if times is not None:
                times.vae_encode = seconds
        inpainting = self.manifest.model.inpainting  # drawn before the sampler's noise, as diffusers draws it
        kind, condition = inpaint_condition(self.engines, inpainting, plan, req, generators, scaling, self.device)
        noise = sampler.draw_noise(req.steps, shape, generators, start=req.first)
        denoiser = self._denoiser(sampler, req, text, noise, [c for c, _ in controls], kind)
        fill_slots(denoiser.controls, [c for c, _ in controls], [h for _, h in controls], req)
        buffers, schedule = denoiser.buffers, denoiser.schedule
        buffers.text.copy_(text.to(buffers.text.dtype))
        if pooled is not None:
            buffers.extra["text_embeds"].copy_(pooled.to(buffers.text.dtype))
            time_ids = torch.tensor(req.time_ids, dtype=torch.float32).expand(pooled.shape[0], -1)
            buffers.extra["time_ids"].copy_(time_ids.to(buffers.text.dtype))
        buffers.guidance.fill_(float(req.guidance_scale))
        if image is None and init_latents is None:
            buffers.latents.copy_(init.to(self.device) * schedule.init_noise_sigma)
        else:
            clean, noised = init
            if plan is not None:
                clean = start_inpaint(buffers, plan, clean, noised, condition, generators)
            buffers.latents.copy_(add_noise(schedule, req.first, clean.to(self.device), noised.to(self.device)))
        if plan is None and condition is not None:  # an inpainting model without a mask: the full mask
            fill_condition(buffers, condition)
        buffers.state.zero_()
        return denoiser

    def denoise(
        self,
        denoiser: Denoiser,
        req: Request,
        callback: Callback | None = None,
        times: StageTimes | None = None,
        cancel: Cancel | None = None,
    ) -> torch.Tensor:
        """Run ``req``'s steps from ``req.first``; returns the latents buffer (reused by the next call: clone it
        to keep it). Per-step times go to ``times`` when given. ``cancel`` is read between steps (never inside
        a step or its CUDA-graph replay): once set, no further step runs."""
        clock = StageClock(self.device)
        marks = [clock.mark()]
        for i in range(req.first, req.steps):
            if cancel is not None and cancel.is_set():
                break
            denoiser.step(i)
            marks.append(clock.mark())
            if callback is not None:
                callback(i, req.steps, denoiser.buffers.latents)
        if times is not None:
            times.steps = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
            times.denoise = clock.seconds(marks[0], marks[-1])
        return denoiser.buffers.latents

    def _denoiser(
        self,
        sampler: Any,
        req: Request,
        text: torch.Tensor,
        noise: torch.Tensor | None,
        controls: list[ControlInput],
        inpaint: str | None = None,
    ) -> Denoiser:
        """The denoiser for this shape, set of ControlNets and kind of inpainting ("blend", "condition" or None),
        reused between calls so a captured CUDA graph is replayed."""
        plan = req.cache_plan if req.cache_interval > 1 else None
        shape = (req.steps, req.first, req.shape, tuple(text.shape))
        key = (sampler.name, *shape, req.guided, control_key(controls), plan, inpaint)
        cached = self._denoisers.get(key, noise)
        if cached is not None:
            return cached
        schedule = sampler.make_schedule(self.scheduler_config, req.steps, self.device, noise=noise, start=req.first)
        unet = self.engines["unet"]
        model = self.manifest.model
        # static too, so a captured graph reads this call's values
        extra = {"text_embeds": model.add_text_embeds_width, "time_ids": model.add_time_ids}
        widths = extra if model.family == "sdxl" else None
        dtype = input_dtype(unet, "encoder_hidden_states")
        buffers = StepBuffers.allocate(req.shape, tuple(text.shape), dtype, self.device, widths)
        if inpaint == "blend":
            buffers.blend = InpaintBlend.allocate(req.shape, schedule)
        elif inpaint == "condition":
            rows, (_, c, h, w) = text.shape[0], req.shape
            buffers.condition = torch.zeros((rows, c + 1, h, w), device=self.device)
        slots = make_slots(controls, self.engines, req, self.device)
        if not slots:
            buffers.residuals = zero_residuals(unet, text.shape[0], req.shape[2], req.shape[3], self.device)
        cache = step_cache(self.engines, plan, buffers, slots) if plan is not None else None
        engines = [slot.engine for slot in slots] + ([cache.shallow] if cache else [])
        use_graph = self.cuda_graph and all(engine.graph_capturable for engine in engines)
        denoiser = Denoiser(unet, sampler, schedule, buffers, req.guided, use_graph, slots, cache)
        self._denoisers.put(key, denoiser)
        return denoiser


__all__ = ["GenerationResult", "Pipeline", "StageTimes", "latents_to_rgb"]
