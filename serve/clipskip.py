"""Clip skip on the server: A1111's ``CLIP_stop_at_last_layers`` setting per request, and the server's default.

A request chooses it in ``override_settings``, as A1111 clients (``webuiapi`` among them) send it:

    {"prompt": "...", "override_settings": {"CLIP_stop_at_last_layers": 2}}

Left out, the server's default applies (``sdtrt serve --clip-skip N``, 1 unless given). The value is checked
against the artifact before the request is queued: a clip skip it cannot run (SDXL, an artifact exported before
the text encoder took ``clip_skip``, more layers than the encoder has) is a 422 saying why, never ignored.
"""

from __future__ import annotations

import json
from typing import Any

from sdtrt.runtime.clip_skip import check_clip_skip
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.specs import ModelInfo
from sdtrt.serve.errors import RequestError

CLIP_SKIP_KEY = "CLIP_stop_at_last_layers"


def parse_clip_skip(payload: dict[str, Any]) -> int | None:
    """The clip skip ``override_settings`` asks for (None: the server's default); ``RequestError`` naming the key."""
    overrides = payload.get("override_settings")
    if not isinstance(overrides, dict) or overrides.get(CLIP_SKIP_KEY) is None:
        return None  # a non-object override_settings is refused where the step-caching keys are read
    value = overrides[CLIP_SKIP_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            f"override_settings.{CLIP_SKIP_KEY} must be an integer >= 1 (1: the last layer, 2: the one before), "
            f"got {json.dumps(value)[:60]}"
        )
    return value


def check_clip_skip_request(model: ModelInfo, clip_skip: int) -> None:
    """``RequestError`` (the runtime's message, naming the key) unless ``model``'s artifact can run ``clip_skip``."""
    try:
        check_clip_skip(model, clip_skip)
    except ConfigError as exc:
        raise RequestError(f"override_settings.{CLIP_SKIP_KEY}: {exc}") from None


__all__ = ["CLIP_SKIP_KEY", "check_clip_skip_request", "parse_clip_skip"]


def check_clip_skip_default(clip_skip: Any) -> None:
    """``ConfigError`` unless the server's default (``--clip-skip``) is an integer >= 1."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ConfigError(f"--clip-skip must be an integer >= 1, got {clip_skip!r}")
