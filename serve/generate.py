"""Running A1111 requests on a pipeline: ``GenerateRequest`` -> pipeline calls -> ``Generation`` (PNGs + info).

Shared by the plain server's ``LocalWorker`` and the Ray replicas. Requests are checked with the runtime's own
request checks (so a refusal reads as the library's message) before they are queued; txt2img requests that agree
on everything but prompt, seed and batch size can run as one pipeline call (``merge_key``, ``run_merged``); a
``batch_size`` above the profile's batch limit runs as several calls with consecutive seeds, as ``n_iter`` does. A
call's ControlNet controls hold for all its images, so requests with ControlNet units merge only when their
units are the same (models, hints and settings), step caching only with the same interval and schedule, clip
skip only with the same value, LoRA tags only with the same LoRA set (``loras``: applied per call), a hires fix
(``enable_hr``) only with the same hires settings (never with plain requests), and only requests for the same model
(``checkpoint``). Requests reach these functions with the server's step-caching and clip-skip defaults applied
(``with_cache_defaults``, ``with_clip_skip``). An img2img request's mask (``inpaint``) is checked against its init
image at the call's size before it is queued, and runs as the pipeline's ``inpaint``.
"""

from __future__ import annotations

import io
import time
from typing import Any

from sdtrt.runtime.errors import ArtifactError, ConfigError, ControlError, ShapeError
from sdtrt.runtime.hires import run_hires
from sdtrt.runtime.images import infotext, png_bytes
from sdtrt.runtime.request import Settings, image_size, require_vae_encoder, seeds_per_image
from sdtrt.serve.a1111 import GenerateRequest, Generation
from sdtrt.serve.caching import check_cache_request
from sdtrt.serve.clipskip import check_clip_skip_request
from sdtrt.serve.controlnet import resolve_units
from sdtrt.serve.errors import RequestError
from sdtrt.serve.hires import check_hires_request
from sdtrt.serve.inpaint import add_infotext, check_inpaint
from sdtrt.serve.limits import prompt_warnings
from sdtrt.serve.loras import use_loras
from sdtrt.serve.progress import JobState
from sdtrt.serve.service import ModelCard

Row = tuple[Any, int, str, str]  # (PIL image, seed, prompt, negative prompt) of one generated image


def controlnet_names(pipe: Any) -> tuple[str, ...]:
    """The ControlNets ``pipe``'s artifact serves, sorted."""
    return tuple(sorted(pipe.controlnets))


def check_request(pipe: Any, request: GenerateRequest) -> tuple[int, int]:
    """Raise ``RequestError`` (the library's message) unless ``pipe`` can run ``request``; return (height, width)."""
    try:
        size = image_size(pipe.manifest, request.height, request.width, call_batch(pipe, request))
        if request.img2img:
            require_vae_encoder(pipe.engines)
        if request.seed is not None:  # every image's seed in range, before the request can join a merged batch
            seeds_per_image(request.seed, request.n_iter * request.batch_size)
    except (ShapeError, ArtifactError, ConfigError) as exc:
        raise RequestError(str(exc)) from None
    check_cache_request(request.cache_interval or 1, pipe.engines)
    check_clip_skip_request(pipe.manifest.model, request.clip_skip or 1)
    if request.hires is not None:  # the second size too, before the first pass is queued
        check_hires_request(pipe.manifest, request.hires, request.height, request.width, call_batch(pipe, request))
    if request.controls:
        control_inputs(pipe, request, size)
    if request.inpaint is not None and request.init_image is not None:  # nothing to repaint: refused now
        check_inpaint(
            request.inpaint, open_image(request.init_image), size[1], size[0], pipe.manifest.model.vae_scale_factor
        )
    return size


def open_image(data: bytes) -> Any:
    """An init image's bytes as the RGB image the pipeline works on."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def call_batch(pipe: Any, request: GenerateRequest) -> int:
    """Images per pipeline call for ``request``: its ``batch_size``, or the profile's batch limit below it."""
    return min(request.batch_size, pipe.manifest.profile.max_batch)


def pipeline_calls(pipe: Any, request: GenerateRequest) -> list[tuple[int, int]]:
    """The pipeline calls ``request`` runs as: (seed offset, images) each; ``n_iter`` batches of ``batch_size``,
    each batch split into calls of at most the profile's batch limit."""
    per_call = call_batch(pipe, request)
    return [
        (first + offset, min(per_call, request.batch_size - offset))
        for first in range(0, request.total_images, request.batch_size)
        for offset in range(0, request.batch_size, per_call)
    ]


def control_inputs(pipe: Any, request: GenerateRequest, size: tuple[int, int] | None = None) -> list[Any]:
    """``request``'s ControlNet units as the pipeline's controls (``ControlInput``) at the call's image size;
    ``RequestError`` naming the unit if the artifact cannot run them."""
    if not request.controls:
        return []
    height, width = size or image_size(pipe.manifest, request.height, request.width, call_batch(pipe, request))
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
    job: JobState | None = None,
) -> Any:
    """One pipeline call with ``request``'s settings for ``prompt`` and ``seed`` (``image``: img2img's), or the
    two of its hires fix; ``job`` follows its steps and can stop it between two."""
    extra: dict[str, Any] = {"controls": control_inputs(pipe, request)} if request.controls else {}
    if job is not None:
        extra.update(callback=job.on_step, cancel=job)
    if image is not None:
        extra.update(image=image, strength=request.denoising_strength)
    if request.inpaint is not None:
        extra["inpaint"] = request.inpaint.inpaint()
    call = {
        "negative_prompt": request.negative_prompt or None,  # as `sdtrt generate` without --negative
        "steps": request.steps,
        "guidance_scale": request.cfg_scale,
        "seed": seed,
        "height": request.height,
        "width": request.width,
        "scheduler": request.sampler,
        "num_images": num_images,
        "cache_interval": request.cache_interval or 1,
        "cache_schedule": request.cache_schedule or "uniform",
        "clip_skip": request.clip_skip or 1,
        **extra,
    }
    use_loras(pipe, request.loras)  # the request's own set: none when it has no <lora:...> tag
    if request.hires is not None:
        return run_hires(pipe, prompt, request.hires, **call)
    return pipe(prompt, **call)


def run_request(pipe: Any, request: GenerateRequest, model_name: str, job: JobState | None = None) -> Generation:
    """Run ``request`` (seed resolved) on ``pipe``: ``n_iter`` batches of ``batch_size`` images, seeds consecutive;
    a batch larger than the profile allows runs as several calls (``pipeline_calls``: the same images).

    With ``job``: its progress is reported there, and an interrupt or skip ends a call between two steps (see
    ``progress``); an interrupted request returns the images of the calls that ran."""
    assert request.seed is not None
    image = open_image(request.init_image) if request.init_image else None
    start = time.perf_counter()
    rows: list[Row] = []
    settings: Settings | None = None
    for index, (offset, count) in enumerate(pipeline_calls(pipe, request)):
        if job is not None and not job.next_call(index):
            break
        result = call_pipeline(pipe, request, request.prompt, request.seed + offset, count, image, job)
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
            units, request.cache_interval, request.cache_schedule, request.hires, request.clip_skip,
            request.loras, request.checkpoint)  # fmt: skip


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
    prompts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    warnings = prompt_warnings(pipe.tokenizer, pipe.manifest.profile.max_prompt_windows, prompts)
    texts = [
        infotext(prompt, request.negative_prompt, seed, settings, model_hash, model_name) for _, seed, prompt, _ in rows
    ]
    if request.inpaint is not None:
        texts = [add_infotext(text, request.inpaint) for text in texts]
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
        warnings=tuple(warnings),
    )


__all__ = [
    "call_batch",
    "call_pipeline",
    "pipeline_calls",
    "check_request",
    "controlnet_names",
    "control_inputs",
    "make_generation",
    "merge_key",
    "model_card",
    "run_merged",
    "run_request",
]
