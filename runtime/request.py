"""One generation request, validated against a model, and the settings a generation reports it ran with.

``make_request`` checks a call's arguments (the same checks, with the same messages, for the pipeline and for any
front end that wants to refuse a request before queueing it) and expands them to one prompt, negative prompt
and seed per image; ``check_request`` runs those checks against an artifact's manifest before any engine is open.
``resolve_seed`` is the one seed rule (A1111's): -1 or None draws a random seed, others are 0..``SEED_MAX``.
For SDXL it adds the micro-conditioning: six time ids (original size, crop top-left, target
size; by default the image size, (0, 0) and the image size), and zero negative conditioning when no negative
prompt is given and the model asks for it (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sdtrt.runtime.cache_plan import check_cache_args, check_cache_supported, full_steps
from sdtrt.runtime.clip_skip import check_clip_skip
from sdtrt.runtime.errors import ArtifactError, ConfigError, ShapeError
from sdtrt.runtime.manifest import Manifest
from sdtrt.runtime.schedulers import SCHEDULER_NAMES, start_index
from sdtrt.runtime.specs import ModelInfo, check_size

Pair = tuple[int, int]  # (height, width), as diffusers orders SDXL's size conditioning

# Seeds are 32-bit, as in A1111 and ComfyUI, so a seed in a PNG's parameters means the same there. torch's
# generator would take any 64-bit value, but folds negatives onto it (-1 and 2**64 - 1 give the same noise).
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Request:
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
    strength: float | None = None  # img2img only
    zero_negatives: bool = False  # SDXL: the negative conditioning is zeros, not an encoded prompt
    time_ids: tuple[int, ...] = ()  # SDXL: original size, crop top-left, target size (each height, width)
    cache_interval: int = 1  # step caching: a full UNet step every N (1: every step full)
    cache_schedule: str = "uniform"
    clip_skip: int = 1  # the text encoder's hidden state N layers from the end (1: the last), as A1111 counts

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def cache_plan(self) -> tuple[bool, ...]:
        """Per step index, whether it runs the full UNet (see ``runtime.cache_plan``)."""
        return full_steps(self.steps, self.first, self.cache_interval, self.cache_schedule)


@dataclass(frozen=True)
class LoraSetting:
    """A LoRA a call ran with: its name, scale and short hash (as A1111 writes them)."""

    name: str
    scale: float
    hash: str


@dataclass(frozen=True)
class ControlSetting:
    """A ControlNet a call ran with, as a generation's settings report it."""

    name: str
    scale: float
    start: float
    end: float
    guess_mode: bool
    preprocess: str
    resize_mode: str
    soft_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scale": self.scale,
            "start": self.start,
            "end": self.end,
            "guess_mode": self.guess_mode,
            "preprocess": self.preprocess,
            "resize_mode": self.resize_mode,
            "soft_weights": self.soft_weights,
        }


@dataclass(frozen=True)
class HiresSetting:
    """The second pass of a hires fix a call ran (``runtime.hires``), as A1111's infotext reports it: the
    options as given (``steps`` 0: as many as the first pass) and the second pass's size; ``sampler``, ``prompt``,
    ``negative_prompt`` and ``guidance_scale`` only where they differ from the first pass's."""

    upscaler: str
    scale: float
    resize: tuple[int, int] | None  # (height, width) as asked
    steps: int
    denoising_strength: float
    height: int
    width: int
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"resize": list(self.resize) if self.resize else None}


@dataclass(frozen=True)
class Settings:
    """What a generation ran with (``GenerationResult.settings``); ``to_dict()`` is its JSON form."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str
    strength: float | None  # None for text-to-image
    backend: str
    loras: tuple[LoraSetting, ...] = ()
    time_ids: tuple[int, ...] = ()  # SDXL only
    zero_negative: bool = False  # SDXL only
    controls: tuple[ControlSetting, ...] = ()
    cache_interval: int = 1
    cache_schedule: str = "uniform"
    clip_skip: int = 1
    hires: HiresSetting | None = None  # a hires fix's second pass (height and width above: the first pass's)

    @classmethod
    def of(
        cls, req: Request, backend: str, loras: Sequence[LoraSetting] = (), controls: Sequence[ControlSetting] = ()
    ) -> Settings:
        """The settings of ``req`` run on ``backend`` with ``loras`` and ``controls``."""
        return cls(
            req.steps,
            req.guidance_scale,
            req.height,
            req.width,
            req.scheduler,
            req.strength,
            backend,
            tuple(loras),
            req.time_ids,
            req.zero_negatives,
            tuple(controls),
            req.cache_interval,
            req.cache_schedule,
            req.clip_skip,
        )

    def __getitem__(self, key: str) -> Any:
        """``settings["width"]``: the dict form earlier versions returned still reads the same."""
        return self.to_dict()[key]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; the LoRA and SDXL keys only where they apply."""
        data: dict[str, Any] = {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "scheduler": self.scheduler,
            "strength": self.strength,
            "backend": self.backend,
        }
        if self.loras:
            data["loras"] = [{"name": x.name, "scale": x.scale, "hash": x.hash} for x in self.loras]
        if self.time_ids:
            data["time_ids"] = list(self.time_ids)
            data["zero_negative"] = self.zero_negative
        if self.controls:
            data["controls"] = [c.to_dict() for c in self.controls]
        if self.cache_interval > 1:
            data["cache_interval"] = self.cache_interval
            data["cache_schedule"] = self.cache_schedule
        if self.clip_skip > 1:
            data["clip_skip"] = self.clip_skip
        if self.hires is not None:
            data["hires"] = self.hires.to_dict()
        return data


def require_vae_encoder(components: Collection[str]) -> None:
    """Raise ``ArtifactError`` unless ``components`` (the open engines) can encode an init image."""
    if "vae_encoder" not in components:
        raise ArtifactError("img2img needs the vae_encoder component; export it with --components ...,vae_encoder")


def image_size(manifest: Manifest, height: int | None, width: int | None, batch: int) -> tuple[int, int]:
    """(height, width) a call runs at: the artifact's tuned size where not given; ``ShapeError`` unless the
    model's networks and the artifact's profile accept ``batch`` images of that size."""
    profile = manifest.profile
    height = profile.opt_height if height is None else height
    width = profile.opt_width if width is None else width
    _check_integers(height, width)
    check_size(height, width, manifest.model)
    profile.check(height, width, batch)
    return height, width


def make_request(
    manifest: Manifest,
    default_scheduler: str,
    components: Collection[str],
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    steps: int,
    guidance_scale: float,
    seed: int | Sequence[int] | None,
    height: int | None,
    width: int | None,
    scheduler: str | None,
    num_images: int,
    image: Any,
    strength: float,
    original_size: Pair | None = None,
    crops_coords_top_left: Pair = (0, 0),
    target_size: Pair | None = None,
    cache_interval: int = 1,
    cache_schedule: str = "uniform",
    clip_skip: int = 1,
    init_latents: Any = None,
) -> Request:
    """Validate a ``Pipeline.__call__``'s arguments (its names) for ``manifest``'s model and expand them to one
    entry per image.

    ``components`` are the engines open (img2img needs a VAE encoder); ``strength`` counts for img2img only (an
    ``image`` given); the micro-conditioning (``original_size``, ``crops_coords_top_left``, ``target_size``) is
    SDXL's, refused for other families; ``clip_skip`` is checked by ``check_clip_skip``. ``init_latents`` (scaled
    latents, one row per image or one for all) start img2img instead of an ``image``, at their own size unless one
    is given.
    """
    prompts, negatives = expand_prompts(prompt, negative_prompt, num_images)
    if init_latents is not None:
        height, width = _latents_size(manifest.model, init_latents, image, height, width, len(prompts))
    name = scheduler or default_scheduler
    _check_arguments(steps, guidance_scale, name)
    check_cache_args(cache_interval, cache_schedule)
    check_cache_supported(cache_interval, components)
    check_clip_skip(manifest.model, clip_skip)
    height, width = image_size(manifest, height, width, len(prompts))
    img2img = strength if image is not None or init_latents is not None else None
    first = start_index(steps, strength) if img2img is not None else 0
    if image is not None:
        require_vae_encoder(components)
    model = manifest.model
    shape = (len(prompts), model.latent_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    seeds = seeds_per_image(seed, len(prompts))
    zero, time_ids = micro_conditioning(
        model, height, width, negative_prompt is None, original_size, crops_coords_top_left, target_size
    )
    request = Request(
        prompts, negatives, height, width, name, steps, first, seeds, guidance_scale, shape, img2img, zero, time_ids
    )
    return dataclasses.replace(
        request, cache_interval=cache_interval, cache_schedule=cache_schedule, clip_skip=clip_skip
    )


def check_request(manifest: Manifest, prompt: str | list[str], *args: Any, **call: Any) -> None:
    """Raise what ``Pipeline.__call__`` would for these arguments (its names) on ``manifest``'s artifact, with no
    engine open, so a front end refuses a bad call before loading anything. The components are the artifact's."""
    # A scheduler left out is the model's own sampler, valid by construction: any valid name stands in for it.
    make_request(manifest, SCHEDULER_NAMES[0], manifest.components, prompt, *args, **call)


def expand_prompts(
    prompt: str | list[str], negative: str | list[str] | None, num_images: int
) -> tuple[list[str], list[str]]:
    """(prompts, negatives) with one entry per image: ``num_images`` per prompt."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ConfigError("prompt list is empty; give at least one prompt")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ConfigError(f"num_images must be an integer >= 1, got {num_images!r}")
    negatives = _negatives(negative, len(prompts))
    return [p for p in prompts for _ in range(num_images)], [n for n in negatives for _ in range(num_images)]


def _check_arguments(steps: int, guidance_scale: float, scheduler: str) -> None:
    """Raise unless steps, guidance and the scheduler name are usable."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ShapeError(f"steps must be an integer >= 1, got {steps!r}")
    if not guidance_scale >= 0:
        raise ConfigError(f"guidance_scale must be >= 0 (1 or less turns guidance off), got {guidance_scale}")
    if scheduler not in SCHEDULER_NAMES:
        raise ConfigError(f"unknown scheduler {scheduler!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")


def seeds_per_image(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """One seed per image: ``seed + k`` (``resolve_seed``: None or -1 is random), or the list given (one per
    image); each in 0..``SEED_MAX``."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        seed = resolve_seed(seed)
        if seed + count - 1 > SEED_MAX:
            raise ConfigError(
                f"seeds {seed}..{seed + count - 1} of {count} images go past {SEED_MAX}; "
                f"give a seed of at most {SEED_MAX - count + 1}"
            )
        return [seed + k for k in range(count)]
    if isinstance(seed, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        if len(seed) != count:
            raise ConfigError(f"got {len(seed)} seeds for {count} images; give one seed, or one per image")
        for one in seed:
            check_seed(one)
        return list(seed)
    raise ConfigError(f"seed must be an integer or a list of integers, got {seed!r}")


def check_seed(seed: int) -> None:
    """Raise ``ConfigError`` unless ``seed`` is a seed the noise is drawn with: 0..``SEED_MAX``."""
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be -1 (random) or 0..{SEED_MAX}, got {seed}")


def random_seed() -> int:
    """A fresh random seed (31 bits, so it is also a valid seed where seeds are signed 32-bit integers)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def resolve_seed(seed: int | None) -> int:
    """The seed a call runs with: a random one for None or -1 (A1111's "random"), else ``seed`` if in range."""
    if seed is None or seed == -1:
        return random_seed()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    check_seed(seed)
    return seed


def micro_conditioning(
    model: ModelInfo,
    height: int,
    width: int,
    no_negative: bool,
    original_size: Pair | None = None,
    crop: Pair = (0, 0),
    target_size: Pair | None = None,
) -> tuple[bool, tuple[int, ...]]:
    """SDXL's (zero negatives, time ids) for an image of ``height`` x ``width``; (False, ()) for other families."""
    given = original_size is not None or target_size is not None or tuple(crop) != (0, 0)
    if model.family != "sdxl":
        if given:
            raise ConfigError(
                f"original_size, crops_coords_top_left and target_size are SDXL conditioning; this is a "
                f"{model.family} model. Leave them out"
            )
        return False, ()
    pairs = {"original_size": original_size, "crops_coords_top_left": crop, "target_size": target_size}
    for key, pair in pairs.items():
        if pair is None:
            continue
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise ConfigError(f"{key} must be two integers >= 0 (height, width), got {pair!r}")
    size = (height, width)
    time_ids = (*(original_size or size), *crop, *(target_size or size))
    return no_negative and model.force_zeros_for_empty_prompt, tuple(int(v) for v in time_ids)


def _latents_size(
    model: ModelInfo, latents: Any, image: Any, height: int | None, width: int | None, count: int
) -> tuple[int, int]:
    """(height, width) in pixels of img2img from ``latents``; ``ShapeError`` unless they are finite float
    [1 or count, C, h, w] latents of the model, matching ``height`` x ``width`` where given."""
    import torch

    if image is not None:
        raise ConfigError("give img2img either an image or init_latents, not both")
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 4:
        raise ShapeError(f"init_latents must be a float tensor [B, C, h, w], got {type(latents).__name__}")
    factor = model.vae_scale_factor
    h, w = height or latents.shape[2] * factor, width or latents.shape[3] * factor
    expected = (count, model.latent_channels, h // factor, w // factor)
    if latents.shape[0] not in (1, count) or tuple(latents.shape[1:]) != expected[1:]:
        raise ShapeError(
            f"init_latents must be [{count} or 1, {expected[1]}, {expected[2]}, {expected[3]}] for {count} image(s) "
            f"at {w}x{h}, got {list(latents.shape)}; give latents of that size (pixels / {factor})"
        )
    if not bool(torch.isfinite(latents).all()):
        raise ShapeError("init_latents hold NaN/Inf values; give finite latents")
    return h, w


def _check_integers(height: Any, width: Any) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width)):
        raise ShapeError(f"image height and width must be integers, got {height!r} x {width!r}")


def _negatives(negative: str | list[str] | None, count: int) -> list[str]:
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [negative] * count
    if len(negative) != count:
        raise ConfigError(f"got {len(negative)} negative prompts for {count} prompts; give one per prompt or one")
    return list(negative)


__all__ = [
    "SEED_MAX",
    "HiresSetting",
    "LoraSetting",
    "Request",
    "Settings",
    "check_request",
    "check_seed",
    "expand_prompts",
    "image_size",
    "make_request",
    "micro_conditioning",
    "random_seed",
    "require_vae_encoder",
    "resolve_seed",
    "seeds_per_image",
]
