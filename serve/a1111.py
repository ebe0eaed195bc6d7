"""The AUTOMATIC1111 web UI API schema: payload -> ``GenerateRequest``, ``Generation`` -> response body.

Field names, defaults and the response shape follow A1111's ``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``;
unknown fields are ignored, as A1111 does. Sizes default to the artifact's tuned size rather than A1111's 512.
The ``scheduler`` field (A1111 >= 1.9 names the sigma schedule apart from the sampler) picks an sdtrt sampler
together with ``sampler_name``; only the pairs sdtrt runs are accepted.
ControlNet units in ``alwayson_scripts`` are read by ``controlnet`` (the ControlNet extension's schema), step
caching's sdtrt-named keys by ``caching``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from typing import Any

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.hires import HiresFix
from sdtrt.runtime.request import check_seed
from sdtrt.runtime.schedulers import A1111_LABELS

from .caching import CacheDefaults, cache_info, parse_cache_fields
from .clipskip import parse_clip_skip
from .controlnet import ControlUnit, parse_controlnet
from .errors import RequestError
from .fields import check_fields
from .hires import parse_hires
from .images import decode_image, encode_png
from .inpaint import InpaintFields, check_mask_size, check_with_controls, parse_inpaint
from .limits import Limits, check_image_count, check_prompts, echoed
from .models import Checkpoint

SAMPLER_BY_LABEL = {label: name for name, label in A1111_LABELS.items()}
SAMPLER_ALIASES: dict[str, list[str]] = {
    "euler": ["k_euler"],
    "euler_a": ["k_euler_a", "k_euler_ancestral"],
    "ddim": [],
    "dpmpp_2m": ["k_dpmpp_2m"],
    "dpmpp_2m_karras": ["k_dpmpp_2m_ka"],
    "lcm": ["k_lcm"],
}


@dataclass(frozen=True)
class ScheduleType:
    """One sigma schedule as A1111 (>= 1.9) names it apart from the sampler (``GET /sdapi/v1/schedulers``)."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False

    def matches(self, text: str) -> bool:
        """Whether ``text`` names this schedule (name, label or alias; case-insensitive, as clients send both)."""
        return text.casefold() in {self.name.casefold(), self.label.casefold(), *(a.casefold() for a in self.aliases)}


# Only the schedules sdtrt runs. "Automatic" is each sampler's own schedule (what ``sampler_name`` alone runs).
SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic"),
    ScheduleType("karras", "Karras", default_rho=7.0),
)
# (sdtrt sampler, schedule name) -> the sdtrt sampler that runs that pair; "automatic" keeps the sampler.
SCHEDULED_SAMPLERS: dict[tuple[str, str], str] = {
    ("dpmpp_2m", "karras"): "dpmpp_2m_karras",
    ("dpmpp_2m_karras", "karras"): "dpmpp_2m_karras",
}


def apply_scheduler(sampler: str | None, scheduler: str | None) -> str | None:
    """The sdtrt sampler for A1111's ``sampler_name`` (already resolved) + ``scheduler``; ``RequestError``
    listing the supported pairs for a schedule or a combination sdtrt does not run."""
    if not scheduler:
        return sampler
    schedule = next((s for s in SCHEDULE_TYPES if s.matches(scheduler)), None)
    labels = {s.name: s.label for s in SCHEDULE_TYPES}
    pairs = ", ".join(
        f"{A1111_LABELS[a]!r} + {labels[b]!r}" for (a, b), combined in SCHEDULED_SAMPLERS.items() if a != combined
    )
    supported = f"'Automatic' with any sampler, or {pairs}"
    if schedule is None:
        raise RequestError(f"unknown scheduler {scheduler!r}; sdtrt runs: {supported}")
    if schedule.name == "automatic":
        return sampler
    if sampler is None or (sampler, schedule.name) not in SCHEDULED_SAMPLERS:
        found = "no sampler_name" if sampler is None else f"sampler {A1111_LABELS[sampler]!r}"
        raise RequestError(f"scheduler {schedule.label!r} with {found} is not implemented; sdtrt runs: {supported}")
    return SCHEDULED_SAMPLERS[(sampler, schedule.name)]


def schedule_label(sampler: str) -> str:
    """The A1111 scheduler label of what an sdtrt sampler runs ("Karras" for a Karras variant, else "Automatic")."""
    names = {schedule for (_, schedule), combined in SCHEDULED_SAMPLERS.items() if combined == sampler}
    return next((s.label for s in SCHEDULE_TYPES if s.name in names), SCHEDULE_TYPES[0].label)


@dataclass(frozen=True)
class GenerateRequest:
    """One validated txt2img/img2img request. ``seed`` None means random; ``sampler`` None the model's own."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    sampler: str | None = None  # an sdtrt scheduler name
    batch_size: int = 1
    n_iter: int = 1
    init_image: bytes | None = None  # the decoded bytes of init_images[0] (img2img)
    denoising_strength: float = 0.75
    controls: tuple[ControlUnit, ...] = ()  # the enabled ControlNet units (alwayson_scripts.controlnet)
    echo: dict[str, Any] = field(default_factory=dict, compare=False)  # the request as A1111 echoes it
    cache_interval: int | None = None  # step caching; None: the server's default (``with_cache_defaults``)
    cache_schedule: str | None = None
    clip_skip: int | None = None  # override_settings.CLIP_stop_at_last_layers; None: the server's default
    hires: HiresFix | None = None  # txt2img's enable_hr: a second, larger pass (see ``hires``)
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) from the prompt's <lora:...> tags (``loras``)
    checkpoint: Checkpoint | None = None  # the model it runs on (``models``); None: the server's current one
    inpaint: InpaintFields | None = None  # img2img's mask and its settings (``inpaint``)

    @property
    def img2img(self) -> bool:
        return self.init_image is not None

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    def with_seed(self, seed: int) -> GenerateRequest:
        return replace(self, seed=seed)

    def with_cache_defaults(self, defaults: CacheDefaults) -> GenerateRequest:
        """This request with the step caching it left out set to the server's ``defaults``."""
        interval, schedule = defaults.resolve(self.cache_interval, self.cache_schedule)
        return replace(self, cache_interval=interval, cache_schedule=schedule)

    def with_checkpoint(self, checkpoint: Checkpoint) -> GenerateRequest:
        return replace(self, checkpoint=checkpoint)

    def with_clip_skip(self, default: int) -> GenerateRequest:
        """This request with the server's clip skip ``default`` where it set none."""
        return self if self.clip_skip is not None else replace(self, clip_skip=default)


@dataclass(frozen=True)
class Generation:
    """What a ``Service`` returns: PNG bytes (with the ``parameters`` text) and the settings that ran."""

    images: list[bytes]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    infotexts: list[str]
    sampler: str  # sdtrt name
    steps: int
    cfg_scale: float
    width: int
    height: int
    model_name: str = ""
    model_hash: str = ""
    seconds: float = 0.0
    served_by: str = ""  # the Ray replica that ran it ("" on the plain server)
    cache_interval: int = 1  # the step caching it ran with (1: every step full)
    cache_schedule: str = "uniform"
    clip_skip: int = 1
    warnings: tuple[str, ...] = ()  # e.g. the part of a prompt past the model's prompt windows, dropped


def _typed(payload: dict[str, Any], name: str, types: tuple[type, ...], default: Any, what: str) -> Any:
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)[:60]} ({type(value).__name__})")
    return value


def resolve_sampler(name: str | None) -> str | None:
    """An A1111 label ("Euler a"), alias ("k_euler_a") or sdtrt name ("euler_a") -> sdtrt name."""
    if name is None or name == "":
        return None
    if name in SAMPLER_BY_LABEL:
        return SAMPLER_BY_LABEL[name]
    if name in A1111_LABELS:
        return name
    for sdtrt_name, aliases in SAMPLER_ALIASES.items():
        if name in aliases:
            return sdtrt_name
    labels = ", ".join(repr(label) for label in A1111_LABELS.values())
    raise RequestError(
        f"unknown sampler {name!r}; expected one of: {labels} (or the sdtrt names {', '.join(A1111_LABELS)})"
    )


def _init_image(
    payload: dict[str, Any], strength: float, size: tuple[int | None, int | None], limits: Limits | None = None
) -> bytes:
    """img2img's init image (the decoded bytes of ``init_images[0]``), with its denoising strength checked.

    The image is resized to ``size`` (width, height) as A1111's ``resize_mode`` 0 ("Just resize") does; another
    mode (crop, fill) is refused unless the image already has that aspect ratio, where every mode gives the same.
    """
    images = payload.get("init_images")
    if not isinstance(images, list) or not images:
        raise RequestError("img2img needs init_images: a list with one base64-encoded image")
    init = decode_image(images[0], "init_images[0]", limits)
    if not 0 < strength <= 1:
        raise RequestError(f"denoising_strength must be in (0, 1], got {strength}")
    mode = payload.get("resize_mode")
    if mode not in (None, 0):
        from PIL import Image

        found = Image.open(io.BytesIO(init)).size  # the header only
        width, height = size
        if width is None or height is None or found[0] * height != found[1] * width:
            wanted = "x".join("?" if side is None else str(side) for side in size)
            raise RequestError(
                f"resize_mode {json.dumps(mode)[:20]} (crop or fill) is not implemented for the init image, which is "
                f"{found[0]}x{found[1]} and would be resized to {wanted}; send it with the aspect ratio of width x "
                "height (both given), or use resize_mode 0 (Just resize)"
            )
    return init


def _img2img_inputs(
    payload: dict[str, Any], img2img: bool, strength: float, size: tuple[int | None, int | None], limits: Limits
) -> tuple[bytes | None, InpaintFields | None]:
    """img2img's init image and mask (``inpaint``: None without one); (None, None) for txt2img."""
    inpaint = parse_inpaint(payload, img2img, limits)  # first: a mask without init_images is named as such
    if not img2img:
        return None, None
    init = _init_image(payload, strength, size, limits)
    if inpaint is not None:
        check_mask_size(inpaint, init)
    return init, inpaint


def _steps_and_cfg(payload: dict[str, Any]) -> tuple[int, float]:
    steps = _typed(payload, "steps", (int,), 50, "an integer")
    if steps < 1:
        raise RequestError(f"steps must be an integer >= 1, got {steps!r}")
    cfg = float(_typed(payload, "cfg_scale", (int, float), 7.0, "a number"))
    if not cfg >= 0:
        raise RequestError(f"cfg_scale must be >= 0 (1 or less turns guidance off), got {cfg}")
    return steps, cfg


def _seed(payload: dict[str, Any]) -> int:
    """The request's seed; -1: draw one."""
    seed = _typed(payload, "seed", (int,), -1, "an integer")
    if seed != -1:
        try:
            check_seed(seed)  # the runtime's rule, so the server and the CLI accept the same seeds
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
    return seed


def _sampler(payload: dict[str, Any]) -> str | None:
    """The sdtrt sampler ``sampler_name`` (else ``sampler_index``) and ``scheduler`` name; None: the model's."""
    sampler = resolve_sampler(_typed(payload, "sampler_name", (str,), None, "a string"))
    if sampler is None:
        sampler = resolve_sampler(_typed(payload, "sampler_index", (str,), None, "a string"))
    return apply_scheduler(sampler, _typed(payload, "scheduler", (str,), None, "a string"))


def _counts(payload: dict[str, Any], limits: Limits) -> tuple[int, int]:
    """(batch_size, n_iter), each >= 1, their product within ``limits``."""
    batch = _typed(payload, "batch_size", (int,), 1, "an integer")
    n_iter = _typed(payload, "n_iter", (int,), 1, "an integer")
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if value < 1:
            raise RequestError(f"{name} must be an integer >= 1, got {value}")
    check_image_count(batch, n_iter, limits)
    return batch, n_iter


def parse_request(payload: Any, img2img: bool = False, limits: Limits | None = None) -> GenerateRequest:
    """Validate an A1111 txt2img (or img2img) JSON payload within ``limits``; raise ``RequestError`` with the
    reason."""
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(payload).__name__}")
    limits = limits or Limits()
    check_prompts(payload, limits)
    prompt = _typed(payload, "prompt", (str,), "", "a string")
    negative = _typed(payload, "negative_prompt", (str,), "", "a string")
    steps, cfg = _steps_and_cfg(payload)
    width = _typed(payload, "width", (int,), None, "an integer")
    height = _typed(payload, "height", (int,), None, "an integer")
    seed = _seed(payload)
    sampler = _sampler(payload)
    check_fields(payload, img2img, sampler)
    batch, n_iter = _counts(payload, limits)
    strength = float(_typed(payload, "denoising_strength", (int, float), 0.75, "a number"))
    init, inpaint = _img2img_inputs(payload, img2img, strength, (width, height), limits)
    controls = parse_controlnet(payload, init)
    check_with_controls(inpaint, len(controls))
    interval, schedule = parse_cache_fields(payload)
    hires = None if img2img else parse_hires(payload, strength, resolve_sampler)
    echo = echoed(payload)
    echo.update(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed, batch_size=batch)
    echo.update(n_iter=n_iter, width=width, height=height, sampler_name=A1111_LABELS.get(sampler or "", None))
    if img2img:
        echo.update(init_images=None, denoising_strength=strength, **(inpaint.echo() if inpaint else {}))
    return GenerateRequest(
        prompt,
        negative,
        steps,
        cfg,
        width,
        height,
        None if seed == -1 else seed,
        sampler,
        batch,
        n_iter,
        init,
        strength,
        controls,
        echo,
        interval,
        schedule,
        parse_clip_skip(payload),
        hires,
        inpaint=inpaint,
    )


def response_body(request: GenerateRequest, gen: Generation) -> dict[str, Any]:
    """A1111's response: base64 PNGs, the request echoed back, and ``info`` as a JSON string."""
    info = {
        "prompt": request.prompt,
        "all_prompts": gen.prompts,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": gen.negative_prompts,
        "seed": gen.seeds[0],
        "all_seeds": gen.seeds,
        "sampler_name": A1111_LABELS[gen.sampler],
        "steps": gen.steps,
        "cfg_scale": gen.cfg_scale,
        "width": gen.width,
        "height": gen.height,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "denoising_strength": request.denoising_strength if request.img2img or request.hires else None,
        "sd_model_name": gen.model_name,
        "sd_model_hash": gen.model_hash[:10],
        "infotexts": gen.infotexts,
    }
    if request.inpaint is not None:  # A1111's info carries the img2img settings it wrote in the infotext
        info["extra_generation_params"] = {"Denoising strength": request.denoising_strength,
                                           **request.inpaint.generation_params()}  # fmt: skip
    info.update(cache_info(gen.cache_interval, gen.cache_schedule))
    info["clip_skip"] = gen.clip_skip  # as A1111's info reports it
    if gen.served_by:
        info["served_by"] = gen.served_by
    if gen.warnings:
        info["warnings"] = list(gen.warnings)
    parameters = dict(request.echo)
    parameters.update(cache_info(gen.cache_interval, gen.cache_schedule))
    parameters["width"] = parameters.get("width") or gen.width
    parameters["height"] = parameters.get("height") or gen.height
    parameters["sampler_name"] = parameters.get("sampler_name") or A1111_LABELS[gen.sampler]
    parameters["scheduler"] = schedule_label(gen.sampler)  # what ran, not what was asked
    return {
        "images": [encode_png(png) for png in gen.images],
        "parameters": parameters,
        "info": json.dumps(info),
    }
