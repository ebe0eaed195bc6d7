"""``sdtrt generate --sigma-schedule NAME``: ComfyUI's default workflow as one command.

The run is ComfyUI's ``CheckpointLoaderSimple -> CLIPTextEncode (positive, negative) -> EmptyLatentImage ->
KSampler -> VAEDecode -> SaveImage`` (with ``--init-image``: ``LoadImage -> VAEEncode`` and KSampler's denoise =
``--strength``), through the runtime's ComfyUI stages (``runtime.sampling``): ComfyUI's starting noise for the seed
(one draw for the whole batch, so every image of ``--num-images`` shares the seed, as a ComfyUI batch does), its
sigmas, sampler and CFG, and SaveImage's 8-bit conversion ``clip(255 * x, 0, 255)`` truncated to integers.
"""

from __future__ import annotations

from typing import Any

import click

from sdtrt.cli.output import OutputTarget


def check_comfy_call(call: dict[str, Any], options: dict[str, Any]) -> None:
    """Check (and complete, in place) the run ``call`` before any engine opens: the sigma schedule, ``--scheduler``
    as a ComfyUI sampler_name, the seed, steps and denoise, and ``options`` this mode has no node for (option ->
    whether it was given: those given are refused). Raises ``click.UsageError`` / ``click.BadParameter``."""
    from sdtrt.runtime.cache_plan import check_cache_args
    from sdtrt.runtime.sampling import COMFY_SAMPLERS, SIGMA_SCHEDULES
    from sdtrt.runtime.schedulers.ksampling import require_sampler

    if call["schedule"] not in SIGMA_SCHEDULES:
        raise click.BadParameter(
            f"unknown sigma schedule {call['schedule']!r}; expected one of: {', '.join(SIGMA_SCHEDULES)}",
            param_hint="--sigma-schedule",
        )
    name = call["sampler"] or "euler"
    if name == "dpmpp_2m_karras":
        raise click.UsageError(
            "--scheduler dpmpp_2m_karras has its own sigma schedule; with --sigma-schedule use "
            "--scheduler dpmpp_2m --sigma-schedule karras"
        )
    if name not in COMFY_SAMPLERS:
        raise click.BadParameter(
            f"with --sigma-schedule, --scheduler must be one of: {', '.join(COMFY_SAMPLERS)}; got {name!r}",
            param_hint="--scheduler",
        )
    call["sampler"] = COMFY_SAMPLERS[name]
    require_sampler(call["sampler"])  # its optional module, before any engine opens
    for option, used in options.items():
        if used:
            raise click.UsageError(f"{option} is not available with --sigma-schedule (ComfyUI sampling); leave it out")
    check_cache_args(call["cache_interval"], call["cache_schedule"])
    call["seed"] = comfy_seed(call["seed"])
    if not 1 <= call["steps"] <= 10000:
        raise click.BadParameter(f"steps must be in [1, 10000], got {call['steps']}", param_hint="--steps")
    if call["image"] is None:
        call["denoise"] = 1.0
    else:
        if call["size"] is not None:
            raise click.UsageError("with --sigma-schedule, --init-image is used at its own size; leave out --size")
        if not 0.0 <= call["denoise"] <= 1.0:
            raise click.BadParameter(
                f"must be in [0, 1] (KSampler's denoise), got {call['denoise']}", param_hint="--strength"
            )
        call["image"] = comfy_image(call["image"])


def comfy_seed(seed: int | None) -> int:
    """The seed of the run: ComfyUI's range [0, 2**64 - 1]; -1 or none draws one."""
    from sdtrt.runtime.request import resolve_seed
    from sdtrt.runtime.sampling import MAX_SEED

    if seed is None or seed == -1:
        return resolve_seed(None)
    if not 0 <= seed <= MAX_SEED:
        raise click.BadParameter(f"must be in [0, {MAX_SEED}] (ComfyUI's range) or -1, got {seed}", param_hint="--seed")
    return seed


def comfy_image(image: Any) -> Any:
    """ComfyUI's LoadImage of a PIL image: EXIF-rotated RGB, IMAGE [1, H, W, 3] float32 in [0, 1]."""
    import numpy as np
    import torch
    from PIL import ImageOps

    rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None]


def run_comfy(
    pipe: Any,
    prompt: str,
    negative: str,
    *,
    sampler: str,
    schedule: str,
    steps: int,
    cfg: float,
    seed: int,
    size: tuple[int, int] | None,
    batch: int,
    image: Any = None,
    denoise: float = 1.0,
    clip_skip: int = 1,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
    callback: Any = None,
) -> Any:
    """The default workflow's nodes, in-process: IMAGE [B, H, W, 3] in [0, 1]."""
    import torch

    from sdtrt.runtime.request import image_size

    positive = pipe.encode_conditioning(prompt, clip_skip)
    negative_cond = pipe.encode_conditioning(negative, clip_skip)
    if image is None:
        height, width = image_size(pipe.manifest, size[0] if size else None, size[1] if size else None, batch)
        factor = pipe.manifest.model.vae_scale_factor
        latents = torch.zeros((batch, pipe.manifest.model.latent_channels, height // factor, width // factor))
    else:
        latents = pipe.encode_images(image).repeat(batch, 1, 1, 1)
    sigmas = pipe.ksampler_sigmas(schedule, steps, denoise)
    cache = {"cache_interval": cache_interval, "cache_schedule": cache_schedule}
    out = pipe.sample_latents(
        latents, positive, negative_cond, sampler=sampler, sigmas=sigmas, cfg=cfg, seed=seed, callback=callback, **cache
    )
    return pipe.decode_images(out)


def save_images(images: Any, target: OutputTarget, seed: int, parameters: str) -> None:
    """SaveImage's PNGs: ``clip(255 * x, 0, 255)`` cast to uint8 (truncation, as ComfyUI converts)."""
    import numpy as np
    from PIL import Image

    from sdtrt.runtime.images import save_png

    paths = target.paths([seed] * images.shape[0])
    for pixels, path in zip(images.numpy(), paths, strict=True):
        save_png(Image.fromarray(np.clip(255.0 * pixels, 0, 255).astype(np.uint8)), path, parameters)
        click.echo(f"wrote {path} (seed {seed})")


def parameters_text(prompt: str, negative: str, call: dict[str, Any], size: str) -> str:
    """A1111-style "parameters" text naming ComfyUI's sampler and schedule."""
    fields = [
        f"Steps: {call['steps']}",
        f"Sampler: {call['sampler']}",
        f"Schedule type: {call['schedule']}",
        f"CFG scale: {call['cfg']}",
        f"Seed: {call['seed']}",
        f"Size: {size}",
    ]
    if call.get("image") is not None:
        fields.append(f"Denoising strength: {call['denoise']}")
    return f"{prompt}\nNegative prompt: {negative}\n" + ", ".join(fields)
