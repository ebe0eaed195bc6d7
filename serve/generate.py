"""Running A1111 requests on a pipeline: ``GenerateRequest`` -> pipeline calls -> ``Generation`` (PNGs + info).

Shared by the plain server's ``LocalWorker`` and the Ray replicas. Requests are checked with the runtime's own
request checks (so a refusal reads as the library's message) before they are queued; txt2img requests that agree
on everything but prompt, seed and batch size can run as one pipeline call (``merge_key``, ``run_merged``). A
call's ControlNet controls hold for all its images, so requests with ControlNet units merge only when their
units are the same (models, hints and settings), step caching only with the same interval and schedule, and
clip skip only with the same value.
Requests reach these functions with the server's step-caching and clip-skip defaults applied
(``with_cache_defaults``, ``with_clip_skip``).
"""

from __future__ import annotations

import io
import time
from typing import Any

from sdtrt.runtime.errors import ArtifactError, ConfigError, ControlError, ShapeError
from sdtrt.runtime.images import infotext, png_bytes
from sdtrt.runtime.request import Settings, image_size, require_vae_encoder, seeds_per_image
from sdtrt.serve.a1111 import GenerateRequest, Generation
from sdtrt.serve.caching import check_cache_request
from sdtrt.serve.clipskip import check_clip_skip_request
from sdtrt.serve.controlnet import resolve_units
from sdtrt.serve.errors import RequestError
from sdtrt.serve.service import ModelCard

Row = tuple[Any, int, str, str]  # (PIL image, seed, prompt, negative prompt) of one generated image


def controlnet_names(pipe: Any) -> tuple[str, ...]:
    """The ControlNets ``pipe``'s artifact serves, sorted."""
    return tuple(sorted(pipe.controlnets))


def check_request(pipe: Any, request: GenerateRequest) -> tuple[int, int]:
    """Raise ``RequestError`` (the library's message) unless ``pipe`` can run ``request``; return (height, width)."""
    try:
        size = image_size(pipe.manifest, request.height, request.width, request.batch_size)
        if request.img2img:
            require_vae_encoder(pipe.engines)
        if request.seed is not None:  # every image's seed in range, before the request can join a merged batch
            seeds_per_image(request.seed, request.n_iter * request.batch_size)
    except (ShapeError, ArtifactError, ConfigError) as exc:
        raise RequestError(str(exc)) from None
    check_cache_request(request.cache_interval or 1, pipe.engines)
    check_clip_skip_request(pipe.manifest.model, request.clip_skip or 1)
    if request.controls:
        control_inputs(pipe, request, size)
    return size


def control_inputs(pipe: Any, request: GenerateRequest, size: tuple[int, int] | None = None) -> list[Any]:
    """``request``'s ControlNet units as the pipeline's controls (``ControlInput``) at the call's image size;
    ``RequestError`` naming the unit if the artifact cannot run them."""
    if not request.controls:
        return []
    height, width = size or image_size(pipe.manifest, request.height, request.width, request.batch_size)
    units = resolve_units(request.controls, controlnet_names(pipe))
    inputs = []
    for unit in units:
        try:
            inputs.append(unit.control_input(width, height))
        except (ControlError, ConfigError) as exc:
            raise RequestError(f"controlnet unit {unit.index}: {exc}") from None
    try:
        pipe.check_controls(inputs)
    except ControlError as exc:
        raise RequestError(str(exc)) from None
    return inputs


def model_card(pipe: Any, model_name: str, max_batch: int | None = None) -> ModelCard:
    """How ``/sdapi/v1/sd-models`` and ``/health`` describe ``pipe`` (``max_batch``: the profile's by default)."""
    m = pipe.manifest
    return ModelCard(
        model_name,
        str(m.source.get("sha256", "")),
        str(pipe.folder),
        pipe.default_scheduler,
        m.profile.max_batch if max_batch is None else max_batch,
        pipe.backend,
        str(pipe.device),
        controlnet_names(pipe),
    )


def call_pipeline(
    pipe: Any,
    request: GenerateRequest,
    prompt: str | list[str],
    seed: int | list[int],
    num_images: int = 1,
    image: Any = None,
) -> Any:
    """One pipeline call with ``request``'s settings for ``prompt`` and ``seed`` (``image``: img2img's)."""
    extra = {"controls": control_inputs(pipe, request)} if request.controls else {}
    return pipe(
        prompt,
        negative_prompt=request.negative_prompt or None,  # as `sdtrt generate` without --negative
        steps=request.steps,
        guidance_scale=request.cfg_scale,
        seed=seed,
        height=request.height,
        width=request.width,
        scheduler=request.sampler,
        num_images=num_images,
        image=image,
        strength=request.denoising_strength,
        cache_interval=request.cache_interval or 1,
        cache_schedule=request.cache_schedule or "uniform",
        clip_skip=request.clip_skip or 1,
        **extra,
    )


def run_request(pipe: Any, request: GenerateRequest, model_name: str) -> Generation:
    """Run ``request`` (seed resolved) on ``pipe``: ``n_iter`` calls of ``batch_size`` images, seeds consecutive."""
    from PIL import Image

    assert request.seed is not None
    image = Image.open(io.BytesIO(request.init_image)).convert("RGB") if request.init_image else None
    start = time.perf_counter()
    rows: list[Row] = []
    settings: Settings | None = None
    for i in range(request.n_iter):
        seed = request.seed + i * request.batch_size
        result = call_pipeline(pipe, request, request.prompt, seed, request.batch_size, image)
        settings = result.settings
        rows += zip(result.images, result.seeds, result.prompts, result.negative_prompts, strict=True)
    assert settings is not None  # n_iter >= 1
    return make_generation(pipe, request, rows, settings, model_name, time.perf_counter() - start)


def merge_key(request: GenerateRequest) -> tuple[Any, ...] | None:
    """Requests with equal keys can run as one pipeline call (their own prompts and seeds); None: never merged."""
    if request.img2img or request.n_iter != 1:
        return None
    units = tuple(unit.settings for unit in request.controls)
    return (request.negative_prompt, request.steps, request.cfg_scale, request.width, request.height, request.sampler,
            units, request.cache_interval, request.cache_schedule, request.clip_skip)  # fmt: skip


def run_merged(pipe: Any, requests: list[GenerateRequest], model_name: str) -> list[Generation]:
    """Run txt2img requests with one ``merge_key`` as one pipeline call: each keeps its prompt and seeds."""
    prompts = [r.prompt for r in requests for _ in range(r.batch_size)]
    seeds = [int(r.seed or 0) + k for r in requests for k in range(r.batch_size)]
    start = time.perf_counter()
    result = call_pipeline(pipe, requests[0], prompts, seeds)
    seconds = time.perf_counter() - start
    rows = list(zip(result.images, result.seeds, result.prompts, result.negative_prompts, strict=True))
    out, offset = [], 0
    for r in requests:
        out.append(make_generation(pipe, r, rows[offset : offset + r.batch_size], result.settings, model_name, seconds))
        offset += r.batch_size
    return out


def make_generation(
    pipe: Any,
    request: GenerateRequest,
    rows: list[Row],
    settings: Settings,
    model_name: str,
    seconds: float,
) -> Generation:
    """A ``Generation`` of (image, seed, prompt, negative) rows: PNGs with A1111's ``parameters`` text."""
    model_hash = str(pipe.manifest.source.get("sha256", ""))
    texts = [
        infotext(prompt, request.negative_prompt, seed, settings, model_hash, model_name) for _, seed, prompt, _ in rows
    ]
    return Generation(
        [png_bytes(image, text) for (image, *_), text in zip(rows, texts, strict=True)],
        [seed for _, seed, _, _ in rows],
        [prompt for _, _, prompt, _ in rows],
        [negative for *_, negative in rows],
        texts,
        settings.scheduler,
        request.steps,
        request.cfg_scale,
        settings.width,
        settings.height,
        model_name,
        model_hash,
        seconds,
        cache_interval=settings.cache_interval,
        cache_schedule=settings.cache_schedule,
        clip_skip=settings.clip_skip,
    )


__all__ = [
    "call_pipeline",
    "check_request",
    "controlnet_names",
    "control_inputs",
    "make_generation",
    "merge_key",
    "model_card",
    "run_merged",
    "run_request",
]
