"""The A1111 request fields sdtrt does not run, and what it does with them: never ignore one that asks for work.

A1111's txt2img/img2img schema has ~70 fields. Clients such as ``webuiapi`` send all of them on every request,
most at the value that means "off" (``restore_faces: false``, ``subseed_strength: 0``). A field sdtrt does not
implement is accepted at that value (or when it cannot change the result, as ``s_tmin`` without ``s_churn``); any
other value is a 422 naming the field, since running the request without it would return something other than
what was asked. A field that is not A1111's at all is a 422 too (a misspelt ``cfg_scal`` would otherwise run
at the default). ``override_settings`` keys go through the server's options (``a1111_info.ServerOptions``): a fixed
setting at its value; sdtrt's own keys, clip skip and the model (``models.request_checkpoint``) are read elsewhere.
The inpainting fields (``mask`` and its settings) are read by ``inpaint``; ``image_cfg_scale`` is for instruct-pix2pix
models only (A1111 ignores it for the others, as sdtrt does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import RequestError
from .limits import A1111_FIELDS

# field -> (the values that leave it off, what to do instead): None is always accepted (A1111's "not set")
OFF_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "styles": (([],), "prompt styles are not stored on this server; put the style's text in the prompt"),
    "subseed_strength": ((0, 0.0), "variation seeds are not implemented"),
    "seed_resize_from_h": ((-1, 0), "seed resizing is not implemented"),
    "seed_resize_from_w": ((-1, 0), "seed resizing is not implemented"),
    "restore_faces": ((False,), "face restoration is not implemented"),
    "tiling": ((False,), "tiling is not implemented"),
    "s_churn": ((0, 0.0), "sampler churn is not implemented"),
    "s_noise": ((1, 1.0), "the ancestral noise scale is fixed at 1"),
    "s_min_uncond": ((0, 0.0), "negative-guidance skipping is not implemented"),
    "firstphase_width": ((0,), "use hr_scale or hr_resize_x/y (firstphase_* is A1111's old hires fix)"),
    "firstphase_height": ((0,), "use hr_scale or hr_resize_x/y (firstphase_* is A1111's old hires fix)"),
    "refiner_checkpoint": (("",), "refiner models are not implemented"),
    "script_name": (("",), "scripts are not implemented; alwayson_scripts takes ControlNet units"),
    "script_args": (([],), "scripts are not implemented"),
    "send_images": ((True,), "the answer always carries the images"),
    "save_images": ((False,), "the server saves nothing; store the returned images"),
    "firstpass_image": (((),), "hires fix from a given first-pass image is not implemented"),
    "latent_mask": (((),), "a separate latent mask is not implemented; mask sets what repaints"),
    "initial_noise_multiplier": ((1, 1.0), "the initial noise is not scaled"),
    "include_init_images": ((False,), "the answer carries the generated images only"),
}
# A1111 fields that cannot change what sdtrt generates, whatever their value (logging, saving, UI state, fields of
# features that are off, other model families' settings)
NO_EFFECT = frozenset(
    "subseed s_tmin s_tmax do_not_save_samples do_not_save_grid comments infotext force_task_id "
    "disable_extra_networks distilled_cfg_scale hr_distilled_cfg "
    "hr_additional_modules refiner_switch_at image_cfg_scale".split()
)
# eta by sampler: the one value each runs with (the others do not read eta, as in A1111)
SAMPLER_ETA = {"euler_a": 1.0, "ddim": 0.0}
# override_settings keys the request parser reads itself (besides sdtrt's own ``sdtrt_*``)
OWN_OVERRIDES = ("CLIP_stop_at_last_layers", "sd_model_checkpoint")
# own override_settings keys that override_settings_restore_afterwards false keeps for later requests, as A1111
PERSISTED_OVERRIDES = ("sd_model_checkpoint",)
LORA_TAG = re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
# prompt and hr_prompt may hold <lora:...> tags (applied by name, see ``loras``); no other extra network is applied
OTHER_NETWORK_TAG = re.compile(r"<(lyco|hypernet):[^>]*>", re.IGNORECASE)


def check_fields(payload: dict[str, Any], img2img: bool, sampler: str | None) -> None:
    """``RequestError`` for a field that is not A1111's, or one sdtrt does not run set to a value that asks for it.

    ``sampler`` is the request's sdtrt sampler; an ``eta`` needs one (the samplers that read eta run with one
    value each, ``SAMPLER_ETA``; the others ignore it, as in A1111).
    """
    unknown = [key for key in payload if key not in A1111_FIELDS and not key.startswith("sdtrt_")]
    if unknown:
        raise RequestError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: not an A1111 txt2img/"
            "img2img field (check the spelling; sdtrt refuses what it would otherwise ignore)"
        )
    if img2img and payload.get("enable_hr"):
        raise RequestError("enable_hr is txt2img's: img2img has no hires fix (run txt2img with enable_hr)")
    for key, (off, why) in OFF_VALUES.items():
        value = payload.get(key)
        if value is None or any(_same(value, o) for o in off):
            continue
        raise RequestError(f"{key} {_show(value)} asks for what this server does not do: {why}; leave it out")
    _check_eta(payload.get("eta"), sampler)
    for key in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        text = payload.get(key)
        rule = OTHER_NETWORK_TAG if key in ("prompt", "hr_prompt") else LORA_TAG
        if isinstance(text, str) and (tag := rule.search(text)):
            if tag.group(1).lower() == "lora":
                raise RequestError(
                    f"{key} holds {tag.group(0)!r}: LoRA tags go in prompt (and hr_prompt), where they are applied "
                    "by name; encoding it as text would change the image, so remove it from " + key
                )
            raise RequestError(
                f"{key} holds the extra-network tag {tag.group(0)!r}: this server applies only <lora:...> tags, and "
                "encoding it as text would change the image; remove the tag"
            )


def check_overrides(payload: dict[str, Any], refusal: Callable[[str, Any], str | None], own: tuple[str, ...]) -> None:
    """``RequestError`` for an ``override_settings`` key the server cannot honour for this request.

    ``refusal(key, value)`` is the server options' (None: the value is the one in force); ``own`` are the keys read
    by the request's parser (sdtrt's and clip skip), which are not options of the server.
    """
    overrides = payload.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError(f"override_settings must be a JSON object, got {type(overrides).__name__}")
    problems = [
        f"override_settings.{problem}"
        for key, value in overrides.items()
        if not (key.startswith("sdtrt_") or key in own) and (problem := refusal(key, value))
    ]
    if problems:
        raise RequestError("; ".join(problems))
    kept = [key for key in overrides if (key.startswith("sdtrt_") or key in own) and key not in PERSISTED_OVERRIDES]
    if kept and payload.get("override_settings_restore_afterwards") is False:
        raise RequestError(
            f"override_settings_restore_afterwards false would keep {', '.join(kept)} for later requests, as A1111 "
            "does; this server applies override_settings to their request only: leave it out (or true) and send "
            "the setting with each request, or start the server with it (sdtrt serve --clip-skip, --cache-interval)"
        )


def _check_eta(eta: Any, sampler: str | None) -> None:
    if eta is None:
        return
    if isinstance(eta, bool) or not isinstance(eta, int | float):
        raise RequestError(f"eta must be a number, got {_show(eta)}")
    if sampler is None:
        raise RequestError(f"eta {eta} needs a sampler_name: the samplers that read eta run with {_etas()}")
    fixed = SAMPLER_ETA.get(sampler)
    if fixed is not None and float(eta) != fixed:
        raise RequestError(f"eta {eta} with this sampler: it runs with eta {fixed} only ({_etas()}); leave eta out")


def _etas() -> str:
    return ", ".join(f"{name} {eta}" for name, eta in SAMPLER_ETA.items())


def _same(value: Any, off: Any) -> bool:
    if off == ():  # "absent": only None (handled by the caller) or an empty value
        return value in ("", [], {})
    return (
        type(value) is type(off)
        and value == off
        or (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and isinstance(off, int | float)
            and value == off
        )
    )


def _show(value: Any) -> str:
    return json.dumps(value)[:60]
