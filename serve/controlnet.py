"""The A1111 ControlNet extension's request schema: ``alwayson_scripts.controlnet.args`` -> ``ControlUnit`` values.

Field names, defaults and aliases follow the extension's ``ControlNetUnit`` (API version 3), so a payload that
works there works here or is refused with a 422 that names the unit and the field:

- the script key is matched without case (``controlnet``, ``ControlNet``, ``controlNet``), as A1111 matches
  script titles; other ``alwayson_scripts`` are refused (A1111 answers "always on script ... not found");
- ``enabled`` defaults to false, as in the extension: a unit without ``"enabled": true`` is skipped;
- ``model`` is one of the served artifact's ControlNets, matched as given, without A1111's " [hash]" suffix, or
  without case (``resolve_units``); ``module`` is ``none`` or ``canny`` (any case);
- ``image``: base64 or a ``data:`` URL, or ``{"image": ..., "mask": null}``; img2img units without one take the
  init image with the payload's ``resize_mode``, as the extension does; ``pixel_perfect`` sets the canny
  resolution from the hint and image sizes (``pixel_perfect_resolution``);
- legacy aliases ``input_image`` (image), ``guidance`` (guidance_end), ``lowvram`` (low_vram), ``mask_image``
  (mask) are read as their fields;
- ``weight`` 0..2, ``guidance_start``/``guidance_end`` 0..1 as the extension bounds them, but ``start < end``
  (the extension allows start == end, a unit that never acts);
- ``processor_res``, ``threshold_a``/``threshold_b`` of -1 (or absent) take the preprocessor's defaults; the
  extension silently replaces other out-of-range values by the defaults, sdtrt refuses them; canny thresholds
  are truncated to integers and swapped when low > high, as the extension's ``cv2.Canny`` call does;
- ``control_mode`` 2 ("ControlNet is more important") is the pipeline's guess mode (diffusers'): residuals on
  the conditional half only, scaled 0.1 -> 1.0 on a log scale. The extension scales residual k by
  0.825 ** (12 - k): within 0.6 % of that for SD 1.x/2.x's 13 residuals, but for SDXL it keeps the first 10 of
  those 13 weights (0.56 on the middle block, where guess mode has 1.0);
  1 ("My prompt is more important") scales residual k of the unit by 0.825 ** (12 - k) on both halves, as the
  extension does (``ControlInput.soft_weights``);
- ``low_vram`` is a memory hint with no effect on the image: accepted and ignored; so are fields of features
  this server lacks (hires fix, inpainting crop, PuLID, union models, saving detected maps: detected maps are
  never appended to the images; ``/controlnet/detect`` returns them) at any value, and batch/IP-Adapter fields
  at their defaults only. Any other field is refused, naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sdtrt.runtime.control.hint import (
    PROCESSOR_RES_RANGE,
    ResizeMode,
    hint_pixels,
    load_hint_image,
    pixel_perfect_resolution,
)
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.errors import ConfigError, ControlError

from .errors import RequestError
from .images import decode_image

SCRIPT_NAME = "controlnet"
MODULES = ("none", "canny")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESOLUTION = (64, 2048, 512)  # the extension's processor_res slider: min, max, default
THRESHOLDS = (1, 255, 100, 200)  # the extension's canny sliders: min, max, low default, high default
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
FIELDS = (
    "enabled", "module", "model", "weight", "image", "mask", "resize_mode", "low_vram", "processor_res",
    "threshold_a", "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode",
)  # fmt: skip
# Fields whose every value leaves the image as it is on this server (the feature they steer is absent here).
NO_OP_FIELDS = (
    "hr_option", "inpaint_crop_input_image", "save_detected_map", "pulid_mode", "union_control_type", "is_ui",
)  # fmt: skip
# Fields accepted only at the extension's defaults: any other value asks for a feature this server lacks.
DEFAULT_ONLY = {
    "input_mode": ("simple",),
    "batch_images": (None, "", []),
    "output_dir": ("",),
    "loopback": (False,),
    "advanced_weighting": (None,),
    "effective_region_mask": (None,),
    "ipadapter_input": (None,),
    "batch_mask_dir": (None,),
    "animatediff_batch": (False,),
    "batch_modifiers": ([],),
    "batch_image_files": ([],),
    "batch_keyframe_idx": (None,),
}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit, checked; ``model`` as sent until ``resolve_units`` names the served ControlNet."""

    index: int  # the unit's place in ``args`` (the extension's "ControlNet Unit N")
    model: str
    image: bytes = field(repr=False)
    module: str = "none"
    weight: float = 1.0
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0  # index into CONTROL_MODES
    processor_res: int = RESOLUTION[2]
    threshold_a: int = THRESHOLDS[2]
    threshold_b: int = THRESHOLDS[3]
    pixel_perfect: bool = False

    @property
    def settings(self) -> tuple[Any, ...]:
        """Everything that shapes the unit's effect (not its place in the request): equal means same control."""
        return (self.model, self.image, self.module, self.weight, self.resize_mode, self.guidance_start,
                self.guidance_end, self.control_mode, self.processor_res, self.threshold_a, self.threshold_b,
                self.pixel_perfect)  # fmt: skip

    def control_input(self, width: int, height: int) -> ControlInput:
        """The pipeline's control for an image of width x height (the hint is fitted to that size)."""
        image = load_hint_image(self.image)
        res = self.processor_res
        if self.pixel_perfect:
            res = pixel_perfect_resolution(image.width, image.height, width, height, self.resize_mode)
            res = min(max(res, PROCESSOR_RES_RANGE[0]), PROCESSOR_RES_RANGE[1])
        low, high = sorted((self.threshold_a, self.threshold_b))  # cv2.Canny swaps them too
        return ControlInput(
            self.model, image, float(self.weight), float(self.guidance_start), float(self.guidance_end),
            guess_mode=self.control_mode == 2, soft_weights=self.control_mode == 1,
            resize_mode=self.resize_mode, preprocess=self.module,
            low_threshold=low, high_threshold=high, processor_res=res,
        )  # fmt: skip


def parse_controlnet(payload: dict[str, Any], init_image: bytes | None = None) -> tuple[ControlUnit, ...]:
    """The enabled units of an A1111 payload's ``alwayson_scripts``; ``RequestError`` naming the unit and field
    otherwise. img2img: a unit without an image takes ``init_image`` with the payload's own ``resize_mode``
    (A1111's img2img codes, 0 by default), as the extension does."""
    scripts = payload.get("alwayson_scripts")
    if scripts is None:
        return ()
    if not isinstance(scripts, dict):
        raise RequestError(f"alwayson_scripts must be an object, got {type(scripts).__name__}")
    keys = [key for key in scripts if isinstance(key, str) and key.lower() == SCRIPT_NAME]
    others = [key for key in scripts if key not in keys]
    if others:
        raise RequestError(
            f"always on script(s) {', '.join(map(repr, others))} not found: this server runs only 'controlnet' "
            "(the ControlNet extension's API); remove the others"
        )
    if len(keys) > 1:
        raise RequestError(f"alwayson_scripts gives the ControlNet script twice ({', '.join(keys)}); give it once")
    if not keys:
        return ()
    script = scripts[keys[0]]
    if not isinstance(script, dict) or set(script) - {"args"}:
        raise RequestError(f'alwayson_scripts.{keys[0]} must be an object {{"args": [unit, ...]}}, got {script!r:.80}')
    units = script.get("args") or []
    if not isinstance(units, list):
        raise RequestError(f"alwayson_scripts.{keys[0]}.args must be a list of units, got {type(units).__name__}")
    init = None
    if init_image is not None:
        code = payload.get("resize_mode", 0)
        try:  # img2img's code 3 is "Just resize (latent upscale)": the extension takes it as Just Resize
            init = (init_image, ResizeMode.parse(0 if code == 3 else code))
        except ConfigError as exc:
            raise RequestError(f"resize_mode is invalid: {exc}") from None
    parsed = [parse_unit(index, raw, init) for index, raw in enumerate(units)]
    return tuple(unit for unit in parsed if unit is not None)


def parse_unit(index: int, raw: Any, init: tuple[bytes, ResizeMode] | None = None) -> ControlUnit | None:
    """One unit of ``args`` -> a ``ControlUnit``, or None for a disabled unit (whose values are not read);
    ``init``: img2img's image and resize mode, for a unit without an image."""
    where = f"controlnet unit {index}"
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object of unit fields, got {type(raw).__name__}")
    values = _unalias(where, raw)
    read = _FieldReader(where, values)
    if not read.boolean("enabled", False):
        return None
    read.boolean("low_vram", False)  # a memory hint: the image is the same either way
    for name, allowed in DEFAULT_ONLY.items():
        if name in values and values[name] not in allowed:
            raise RequestError(
                f"{where}: {name} is not supported by this server (got {values[name]!r:.60}); leave it out or give "
                f"{allowed[0]!r}"
            )
    module = read.module()
    image = read.image(init is not None)
    hint, resize = (image, read.resize_mode()) if image or init is None else init
    return ControlUnit(
        index,
        read.model(),
        hint,
        module,
        read.number("weight", 1.0, 0.0, 2.0),
        resize,
        *read.guidance(),
        read.control_mode(),
        *read.preprocessor_settings(module),
        read.boolean("pixel_perfect", False),
    )


def _unalias(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    values = dict(raw)
    for alias, name in ALIASES.items():
        if alias in values:
            if name in values:
                raise RequestError(f"{where}: give {name!r} or its old name {alias!r}, not both")
            values[name] = values.pop(alias)
    unknown = sorted(set(values) - set(FIELDS) - set(NO_OP_FIELDS) - set(DEFAULT_ONLY))
    if unknown:
        raise RequestError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a unit takes {', '.join(FIELDS)} "
            "(the ControlNet extension's names)"
        )
    return values


class _FieldReader:
    """Reads a unit's fields with the extension's defaults; every refusal names the unit and the field."""

    def __init__(self, where: str, values: dict[str, Any]) -> None:
        self.where, self.values = where, values

    def fail(self, name: str, message: str) -> RequestError:
        return RequestError(f"{self.where}: {name} {message}")

    def boolean(self, name: str, default: bool) -> bool:
        value = self.values.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r:.60}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.values.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(name, f"must be a number, got {value!r:.60}")
        if value < low:
            raise self.fail(name, f"must be >= {low:g}, got {value:g}")
        if value > high:
            raise self.fail(name, f"must be <= {high:g}, got {value:g}")
        return float(value)

    def module(self) -> str:
        value = self.values.get("module", "none")
        if not isinstance(value, str) or value.strip().lower() not in MODULES:
            raise self.fail(
                "module",
                f"{value!r:.60} is not available: this server preprocesses with {', '.join(MODULES)} (other "
                "detectors need downloaded weights: run them elsewhere and send their map with module 'none')",
            )
        return value.strip().lower()

    def model(self) -> str:
        value = self.values.get("model", "None")
        if not isinstance(value, str) or not value.strip() or value.strip().lower() == "none":
            raise self.fail(
                "model", f"must name one of the server's ControlNets (see /controlnet/model_list), got {value!r:.60}"
            )
        return value.strip()

    def image(self, img2img: bool) -> bytes:
        """The hint's bytes; empty for an img2img unit without an image (it takes the init image)."""
        value, mask = self.values.get("image"), self.values.get("mask")
        if isinstance(value, dict):
            if set(value) - {"image", "mask"}:
                raise self.fail("image", 'as an object must be {"image": base64, "mask": base64 or null}')
            value, mask = value.get("image"), value.get("mask", mask)
        if mask not in (None, ""):
            raise self.fail("mask", "is not supported: ControlNet inpainting masks need the inpaint preprocessors")
        if value in (None, ""):
            if img2img:
                return b""
            raise self.fail("image", "is missing: an enabled unit needs a hint image (base64 PNG, JPEG or WebP)")
        if isinstance(value, list):
            raise self.fail("image", "must be one base64 image; lists of images (batch inputs) are not supported")
        data = decode_image(value, f"{self.where}: image")
        try:
            hint_pixels(load_hint_image(data))  # 16-bit or empty images are refused now, not after queueing
        except ControlError as exc:
            raise self.fail("image", f"cannot be used: {exc}") from None
        return data

    def resize_mode(self) -> ResizeMode:
        value = self.values.get("resize_mode")
        if value is None:
            return ResizeMode.CROP_AND_RESIZE
        try:
            return ResizeMode.parse(value)
        except ConfigError as exc:
            raise self.fail("resize_mode", f"is invalid: {exc}") from None

    def guidance(self) -> tuple[float, float]:
        start = self.number("guidance_start", 0.0, 0.0, 1.0)
        end = self.number("guidance_end", 1.0, 0.0, 1.0)
        if start >= end:
            raise self.fail(
                "guidance_start", f"must be below guidance_end, got start {start:g} and end {end:g} (e.g. 0 and 1)"
            )
        return start, end

    def control_mode(self) -> int:
        value = self.values.get("control_mode", 0)
        labels = [label.lower() for label in CONTROL_MODES]
        if isinstance(value, str) and value.strip().lower() in labels:
            value = labels.index(value.strip().lower())
        if isinstance(value, bool) or value not in (0, 1, 2):
            raise self.fail("control_mode", f"must be 0, 1, 2 or one of {', '.join(CONTROL_MODES)}, got {value!r:.60}")
        return int(value)

    def preprocessor_settings(self, module: str) -> tuple[int, int, int]:
        """(processor_res, threshold_a, threshold_b): read for canny; for ``none`` they change nothing and only
        their type is checked (clients send their own defaults there)."""
        res_low, res_high, res_default = RESOLUTION
        low, high, low_default, high_default = THRESHOLDS
        if module != "canny":
            for name in ("processor_res", "threshold_a", "threshold_b"):
                self.number(name, 0.0, -math.inf, math.inf)
            return res_default, low_default, high_default
        return (
            int(self.slider("processor_res", res_default, res_low, res_high)),
            int(self.slider("threshold_a", low_default, low, high)),
            int(self.slider("threshold_b", high_default, low, high)),
        )

    def slider(self, name: str, default: float, low: float, high: float) -> float:
        value = self.number(name, -1, -math.inf, math.inf)
        if value == -1:
            return default
        if not low <= value <= high:
            raise self.fail(name, f"must be from {low:g} to {high:g} (or -1 for {default:g}), got {value:g}")
        return value


def match_model(name: str, served: Sequence[str]) -> str | None:
    """The served ControlNet that ``name`` means: equal, or equal once A1111's " [hash]" suffix is dropped,
    case-insensitive if that is unique; None if none matches."""
    for candidate in (name, _HASH_SUFFIX.sub("", name)):
        if candidate in served:
            return candidate
        folded = [s for s in served if s.lower() == candidate.lower()]
        if len(folded) == 1:
            return folded[0]
    return None


def resolve_units(units: Sequence[ControlUnit], served: Sequence[str]) -> tuple[ControlUnit, ...]:
    """``units`` with ``model`` set to the served ControlNet's name; ``RequestError`` naming the unit if a model
    is not served, a ControlNet is used twice, or more units are enabled than the artifact has ControlNets."""
    names = ", ".join(served) or "none"
    if len(units) > len(served):
        raise RequestError(
            f"controlnet unit {units[len(served)].index}: {len(units)} unit(s) are enabled but this model serves "
            f"{len(served)} ControlNet(s) ({names}); enable at most {len(served)}"
            + ("" if served else "; add one with `sdtrt export CONTROLNET --into FOLDER`")
        )
    resolved, used = [], {}
    for unit in units:
        name = match_model(unit.model, served)
        if name is None:
            raise RequestError(
                f"controlnet unit {unit.index}: model {unit.model!r} is not served; this model has {names} "
                "(see /controlnet/model_list; a ' [hash]' suffix is ignored)"
            )
        if name in used:
            raise RequestError(
                f"controlnet unit {unit.index}: model {name!r} is already used by unit {used[name]}; each "
                "ControlNet can be used once per request"
            )
        used[name] = unit.index
        resolved.append(replace(unit, model=name))
    return tuple(resolved)
