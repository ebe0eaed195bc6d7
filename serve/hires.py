"""Hires fix on the server: A1111's txt2img fields (``enable_hr``, ``hr_*``, ``denoising_strength``) as a
``runtime.hires.HiresFix``, and the ``/sdapi/v1/upscalers`` and ``/sdapi/v1/latent-upscale-modes`` lists.

As A1111: ``hr_upscaler`` left out is ``Latent``; ``hr_resize_x``/``hr_resize_y`` (either > 0) win over
``hr_scale``; ``hr_second_pass_steps`` 0 is the first pass's steps; ``hr_sampler_name``, ``hr_prompt``,
``hr_negative_prompt`` and ``hr_cfg`` left out or empty are the first pass's. sdtrt has no other checkpoints or
schedulers to switch to, so ``hr_checkpoint_name`` and ``hr_scheduler`` are accepted only where they mean "the
same" (absent, empty, ``Use same checkpoint``, ``Automatic``, ``Use same scheduler``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.hires import LATENT_UPSCALE_MODES, UPSCALERS, HiresFix, check_hires
from sdtrt.serve.errors import RequestError

SAME_CHECKPOINT = ("", "use same checkpoint")
SAME_SCHEDULER = ("", "automatic", "use same scheduler")
SAME_SAMPLER = ("", "Use same sampler")


def upscalers_body() -> list[dict[str, Any]]:
    """``/sdapi/v1/upscalers``: the pixel upscalers sdtrt has, in A1111's shape (its built-in ones: no model)."""
    names = [name for name in UPSCALERS if name not in LATENT_UPSCALE_MODES]
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in names]


def latent_modes_body() -> list[dict[str, str]]:
    """``/sdapi/v1/latent-upscale-modes``: A1111's latent upscale modes (all of them)."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def _field(payload: dict[str, Any], name: str, types: tuple[type, ...], default: Any, what: str) -> Any:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)[:60]} ({type(value).__name__})")
    return value


def _check_same(payload: dict[str, Any], name: str, same: tuple[str, ...], why: str) -> None:
    value = _field(payload, name, (str,), "", "a string")
    if value.lower() not in same:
        allowed = ", ".join(repr(s) for s in same if s)
        raise RequestError(f"{name} {value!r} is not supported: {why}; send {allowed}, or leave it out")


def parse_hires(payload: dict[str, Any], strength: float, resolve_sampler: Callable[[str], Any]) -> HiresFix | None:
    """The hires fix a txt2img payload asks for (None without ``enable_hr``); ``RequestError`` naming the field.
    ``strength`` is the payload's ``denoising_strength``; ``resolve_sampler`` maps an A1111 label to sdtrt's."""
    enabled = payload.get("enable_hr")
    if enabled is None or enabled is False:
        return None
    if enabled is not True:
        raise RequestError(f"enable_hr must be true or false, got {json.dumps(enabled)[:60]}")
    _check_same(payload, "hr_checkpoint_name", SAME_CHECKPOINT, "this server runs the second pass on its one model")
    _check_same(payload, "hr_scheduler", SAME_SCHEDULER, "the sampler name carries its schedule here (e.g. "
                "hr_sampler_name 'DPM++ 2M Karras')")  # fmt: skip
    resize = tuple(_field(payload, f"hr_resize_{axis}", (int,), 0, "an integer >= 0") for axis in "yx")
    sampler = _field(payload, "hr_sampler_name", (str,), "", "a string")
    cfg = _field(payload, "hr_cfg", (int, float), None, "a number")
    try:
        return HiresFix(
            scale=float(_field(payload, "hr_scale", (int, float), 2.0, "a number")),
            resize=resize if any(resize) else None,  # type: ignore[arg-type]
            upscaler=_field(payload, "hr_upscaler", (str,), "Latent", "a string"),
            steps=_field(payload, "hr_second_pass_steps", (int,), 0, "an integer >= 0"),
            denoising_strength=strength,
            sampler=None if sampler in SAME_SAMPLER else resolve_sampler(sampler),
            prompt=_field(payload, "hr_prompt", (str,), "", "a string") or None,
            negative_prompt=_field(payload, "hr_negative_prompt", (str,), "", "a string") or None,
            guidance_scale=None if cfg is None else float(cfg),
        )
    except ConfigError as exc:
        raise RequestError(f"{exc} (enable_hr fields)") from None


def check_hires_request(manifest: Any, hires: HiresFix, height: int | None, width: int | None, batch: int) -> None:
    """``RequestError`` (422) with the runtime's message unless both passes fit ``manifest``'s profile."""
    try:
        check_hires(manifest, hires, height, width, batch)
    except (ShapeError, ConfigError) as exc:
        raise RequestError(str(exc)) from None


__all__ = ["check_hires_request", "latent_modes_body", "parse_hires", "upscalers_body"]
