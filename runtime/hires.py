"""Hires fix: a text-to-image pass at the asked size, then an image-to-image pass at a larger one (A1111's "Hires.
fix").

run = run_hires(pipe, "a castle", HiresFix(scale=2, upscaler="Latent", denoising_strength=0.6), height=512,
                width=512, seed=1)  # run.images are 1024 x 1024

The first pass runs as any call. Its result is enlarged in latent space (A1111's ``Latent*`` upscalers:
``torch.nn.functional.interpolate`` with the mode and antialiasing A1111 maps each name to) or as pixels
(``Lanczos``, ``Nearest``, ``None``: the decoded 8-bit image resized, then VAE-encoded again), by ``scale`` or to
``resize``; the second pass denoises it from part-way with the hires sampler, prompts and guidance where given.

As A1111: the second pass runs exactly ``steps`` (0: as many as the first) denoising steps, out of a schedule of
``int(steps / min(denoising_strength, 0.999))``; ``resize`` with both sides given covers that size keeping the
aspect and crops the latents to it, centred; the second pass's noise is drawn from each image's own seed again
(a fresh generator per image, at the new size). Both sizes must fit the artifact's profile: ``check_hires`` says
which command builds one that does, before any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.manifest import Manifest
from sdtrt.runtime.request import HiresSetting, expand_prompts, image_size
from sdtrt.runtime.schedulers import SCHEDULER_NAMES
from sdtrt.runtime.specs import check_size
from sdtrt.runtime.timing import StageTimes

if TYPE_CHECKING:
    from sdtrt.runtime.pipeline import Callback, GenerationResult, Pipeline

# A1111's latent upscale modes (modules/shared_items.py): name -> (interpolate mode, antialias)
LATENT_UPSCALE_MODES: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }
)
# The pixel upscalers sdtrt has (A1111's built-in ones; "None" resizes with Lanczos, as A1111's does)
IMAGE_UPSCALERS: Mapping[str, Image.Resampling] = MappingProxyType(
    {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
)
UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS)


@dataclass(frozen=True)
class HiresFix:
    """The second pass of a hires fix. ``resize`` (height, width) wins over ``scale``; a 0 side keeps the aspect.
    ``steps`` 0, and ``sampler``/``prompt``/``negative_prompt``/``guidance_scale`` None, mean the first pass's."""

    scale: float = 2.0
    resize: tuple[int, int] | None = None
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not self.scale > 0:
            raise ConfigError(f"hires scale must be a number > 0 (e.g. 2), got {self.scale!r}")
        if self.resize is not None:
            ok = len(self.resize) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in self.resize)
            if not ok or min(self.resize) < 0 or max(self.resize) == 0:
                raise ConfigError(
                    f"hires resize must be (height, width) in pixels, >= 0 with at least one > 0, got {self.resize!r}"
                )
        if self.upscaler not in UPSCALERS:
            raise ConfigError(f"unknown hires upscaler {self.upscaler!r}; expected one of: {', '.join(UPSCALERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"hires steps must be an integer >= 0 (0: as many as the first pass), got {self.steps!r}")
        strength = self.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise ConfigError(f"hires denoising strength must be in (0, 1], got {strength!r}")
        if self.sampler is not None and self.sampler not in SCHEDULER_NAMES:
            raise ConfigError(f"unknown hires sampler {self.sampler!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ConfigError(f"hires guidance scale must be >= 0, got {self.guidance_scale}")

    @property
    def latent(self) -> bool:
        """Whether the upscale is in latent space (else on the decoded image)."""
        return self.upscaler in LATENT_UPSCALE_MODES


@dataclass(frozen=True)
class SecondPass:
    """Where the second pass runs: the size the first is enlarged to (``cover``), and the centred crop of it
    (``size``, at ``offset``), all (height, width) in pixels, multiples of the VAE's factor."""

    cover: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[int, int]


def second_pass(hires: HiresFix, height: int, width: int, factor: int = 8) -> SecondPass:
    """The second pass's sizes for a first pass of ``height`` x ``width`` (A1111's ``calculate_target_resolution``;
    sides are cut down to multiples of ``factor``, as A1111's latents are)."""
    crop = (0, 0)
    if hires.resize is None:
        cover = int(height * hires.scale), int(width * hires.scale)
    else:
        to_h, to_w = hires.resize
        if to_h == 0:
            cover = to_w * height // width, to_w
        elif to_w == 0:
            cover = to_h, to_h * width // height
        else:
            wider = width / height < to_w / to_h
            cover = (to_w * height // width, to_w) if wider else (to_h, to_h * width // height)
            crop = (cover[0] - to_h) // factor, (cover[1] - to_w) // factor
    latents = cover[0] // factor, cover[1] // factor
    size = (latents[0] - crop[0]) * factor, (latents[1] - crop[1]) * factor
    return SecondPass((latents[0] * factor, latents[1] * factor), size, (crop[0] // 2 * factor, crop[1] // 2 * factor))


def second_pass_steps(hires: HiresFix, steps: int) -> tuple[int, float, int]:
    """(schedule steps, img2img strength, steps run) of the second pass: it runs ``hires.steps`` (or ``steps``)
    steps, the last of a schedule of ``int(n / min(denoising_strength, 0.999))``, as A1111 does."""
    run = hires.steps or steps
    total = max(run, int(run / min(hires.denoising_strength, 0.999)))
    # the pipeline runs the last int(total * strength) steps: half a step above `run` keeps float error out
    return total, min(1.0, (run + 0.5) / total), run


def check_hires(manifest: Manifest, hires: HiresFix, height: int | None, width: int | None, batch: int = 1) -> None:
    """Raise ``ShapeError`` unless both passes fit the model and ``manifest``'s profile; the message names the
    profile's range and the command that makes engines (or an artifact) covering both sizes."""
    first_h, first_w = image_size(manifest, height, width, batch)
    sizes = second_pass(hires, first_h, first_w, manifest.model.vae_scale_factor)
    for h, w in (sizes.cover, sizes.size):
        try:
            check_size(h, w, manifest.model)
        except ShapeError as exc:
            raise ShapeError(f"hires fix second pass at {w}x{h}: {exc}") from None
    second_h, second_w = sizes.cover
    p = manifest.profile
    if p.contains(second_h, second_w, batch):
        return
    low = f"{min(p.min_width, first_w)}x{min(p.min_height, first_h)}"
    high = f"{max(p.max_width, second_w)}x{max(p.max_height, second_h)}"
    where = "these engines" if manifest.kind == "tensorrt" else "this artifact"
    if manifest.kind == "tensorrt":
        fix = f"sdtrt build ARTIFACTS --out ENGINES --dynamic --min-size {low} --max-size {high}"
    else:
        fix = f"sdtrt export {_source_name(manifest)} --out ARTIFACTS --min-size {low} --max-size {high}"
    raise ShapeError(
        f"hires fix second pass at {second_w}x{second_h} is outside the profile of {where} "
        f"(width {p.min_width}..{p.max_width}, height {p.min_height}..{p.max_height}); lower the hires "
        f"scale/size, or make one that covers {first_w}x{first_h} to {second_w}x{second_h}: {fix}"
    )


def _source_name(manifest: Manifest) -> str:
    source = manifest.source
    return str(source.get("path") or source.get("name") or "MODEL")


def upscale_latents(latents: torch.Tensor, upscaler: str, height: int, width: int) -> torch.Tensor:
    """Latents [B, C, h, w] enlarged to [B, C, height, width] (latent units) as A1111's ``upscaler`` does."""
    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    return torch.nn.functional.interpolate(latents.float(), size=(height, width), mode=mode, antialias=antialias)


def upscale_image(image: Image.Image, upscaler: str, height: int, width: int) -> Image.Image:
    """A decoded first-pass image resized to ``width`` x ``height`` with A1111's pixel ``upscaler``."""
    return image.resize((width, height), resample=IMAGE_UPSCALERS[upscaler])


def run_hires(
    pipe: Pipeline,
    prompt: str | list[str],
    hires: HiresFix,
    negative_prompt: str | list[str] | None = None,
    *,
    steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int | Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    num_images: int = 1,
    callback: Callback | None = None,
    **call: Any,
) -> GenerationResult:
    """Both passes of a hires fix on ``pipe`` (a ``Pipeline``): its arguments are ``Pipeline.__call__``'s (the
    rest, ``call``, goes to both passes); returns the second pass's ``GenerationResult``, whose ``settings`` are
    the first pass's with ``hires`` set (as A1111's infotext reports them). ``callback`` sees both passes' steps.
    """
    if call.get("image") is not None or call.get("init_latents") is not None:
        raise ConfigError("hires fix runs on text-to-image; leave out image/init_latents (or run img2img alone)")
    call = {k: v for k, v in call.items() if k not in ("image", "init_latents", "strength")}  # the second pass's
    prompts, _ = expand_prompts(prompt, negative_prompt, num_images)
    check_hires(pipe.manifest, hires, height, width, len(prompts))
    kept: list[torch.Tensor] = []

    def first_steps(i: int, total: int, latents: torch.Tensor) -> None:
        if i == total - 1 and hires.latent:
            kept.append(latents.detach().clone())
        if callback is not None:
            callback(i, total, latents)

    common = {"height": height, "width": width, "scheduler": scheduler, "num_images": num_images}
    first = pipe(prompt, negative_prompt, steps, guidance_scale, seed, callback=first_steps, **common, **call)
    if first.interrupted:  # cancelled during the first pass: no second pass, as A1111 returns the first
        return first
    return _second_pass(pipe, hires, first, kept, negative_prompt, steps, guidance_scale, scheduler, callback, call)


def _second_pass(
    pipe: Pipeline,
    hires: HiresFix,
    first: GenerationResult,
    kept: list[torch.Tensor],
    negative_prompt: str | list[str] | None,
    steps: int,
    guidance_scale: float,
    scheduler: str | None,
    callback: Callback | None,
    call: dict[str, Any],
) -> GenerationResult:
    """The img2img pass over ``first``'s result (``kept``: its final latents on the latent path)."""
    settings = first.settings
    factor = pipe.manifest.model.vae_scale_factor
    sizes = second_pass(hires, settings.height, settings.width, factor)
    total, strength, _ = second_pass_steps(hires, steps)
    prompts = [hires.prompt] * len(first.prompts) if hires.prompt else first.prompts
    # None keeps SDXL's zero negative conditioning; a list had one entry per prompt, the second pass per image
    per_image = first.negative_prompts if isinstance(negative_prompt, list) else negative_prompt
    negatives = hires.negative_prompt or per_image
    second = {
        **call,
        "steps": total,
        "guidance_scale": guidance_scale if hires.guidance_scale is None else hires.guidance_scale,
        "height": sizes.size[0],
        "width": sizes.size[1],
        "scheduler": hires.sampler or scheduler,
        "strength": strength,
        "callback": callback,
    }
    top, left = sizes.offset
    if hires.latent:
        (latents,) = kept
        big = upscale_latents(latents, hires.upscaler, sizes.cover[0] // factor, sizes.cover[1] // factor)
        big = big[:, :, top // factor : top // factor + sizes.size[0] // factor]
        big = big[:, :, :, left // factor : left // factor + sizes.size[1] // factor]
        result = pipe(prompts, negatives, seed=first.seeds, init_latents=big, **second)
    else:
        result = _per_image(pipe, hires, first, prompts, negatives, sizes, second)
    record = HiresSetting(
        hires.upscaler,
        hires.scale,
        hires.resize,
        hires.steps,
        hires.denoising_strength,
        result.settings.height,
        result.settings.width,
        sampler=hires.sampler if hires.sampler not in (None, settings.scheduler) else None,
        prompt=hires.prompt if hires.prompt and hires.prompt not in first.prompts else None,
        negative_prompt=hires.negative_prompt if hires.negative_prompt not in ("", *first.negative_prompts) else None,
        guidance_scale=hires.guidance_scale if hires.guidance_scale not in (None, guidance_scale) else None,
    )
    times = _add_times(first.times, result.times)
    return dataclasses.replace(result, settings=dataclasses.replace(settings, hires=record), times=times)


def _per_image(
    pipe: Pipeline,
    hires: HiresFix,
    first: GenerationResult,
    prompts: list[str],
    negatives: str | list[str] | None,
    sizes: SecondPass,
    second: dict[str, Any],
) -> GenerationResult:
    """The pixel path: each first-pass image resized and cropped, then img2img on its own (one init image per
    call), the results joined as one ``GenerationResult``."""
    top, left = sizes.offset
    results = []
    for k, image in enumerate(first.images):
        big = upscale_image(image, hires.upscaler, *sizes.cover)
        big = big.crop((left, top, left + sizes.size[1], top + sizes.size[0]))
        negative = negatives[k] if isinstance(negatives, list) else negatives
        results.append(pipe(prompts[k], negative, seed=first.seeds[k], image=big, **second))
    if len(results) == 1:
        return results[0]
    times = results[0].times
    for other in results[1:]:
        times = _add_times(times, other.times)
    return dataclasses.replace(
        results[0],
        images=[img for r in results for img in r.images],
        seeds=[s for r in results for s in r.seeds],
        prompts=[p for r in results for p in r.prompts],
        negative_prompts=[n for r in results for n in r.negative_prompts],
        pixels=torch.cat([r.pixels for r in results]),
        times=times,
    )


def _add_times(a: StageTimes, b: StageTimes) -> StageTimes:
    """Stage times of two calls run one after the other."""
    return StageTimes(
        a.text_encode + b.text_encode,
        a.denoise + b.denoise,
        a.steps + b.steps,
        a.vae_encode + b.vae_encode,
        a.vae_decode + b.vae_decode,
        a.total + b.total,
    )


def hires_runs(hires: HiresFix, steps: int) -> int:
    """Denoising steps of the second pass (for progress bars: add the first pass's)."""
    return second_pass_steps(hires, steps)[2]


__all__ = [
    "IMAGE_UPSCALERS",
    "LATENT_UPSCALE_MODES",
    "UPSCALERS",
    "HiresFix",
    "SecondPass",
    "check_hires",
    "hires_runs",
    "run_hires",
    "second_pass",
    "second_pass_steps",
    "upscale_image",
    "upscale_latents",
]
