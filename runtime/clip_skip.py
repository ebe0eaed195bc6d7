"""Clip skip: which hidden state of the text encoder conditions a generation, counted from the last layer.

N = 1 is the last layer's output, N = 2 the one before, each through the final layer norm (A1111's "Clip skip",
``CLIP_stop_at_last_layers``; diffusers' ``clip_skip`` k is N = k + 1). The exported text encoder of an SD 1.x/2.x
artifact takes N as its ``clip_skip`` input (``ModelInfo.clip_skip_ready``, see ``models.wrappers.TextEncoder``),
so any N up to its layer count runs without re-export. ``check_clip_skip`` is the one rule; ``text_feeds`` builds
the encoder's inputs.
"""

from __future__ import annotations

import torch

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.specs import CLIP_SKIP, ModelInfo


def check_clip_skip(model: ModelInfo, clip_skip: int) -> None:
    """``ConfigError`` unless ``model``'s artifact can run ``clip_skip``: 1 (the last layer) on every artifact,
    2..``text_layers`` on SD 1.x/2.x text encoders exported with the ``clip_skip`` input."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ConfigError(f"clip skip must be an integer >= 1 (1: the last layer, no skip), got {clip_skip!r}")
    if clip_skip == 1:
        return
    if model.family == "sdxl":
        raise ConfigError(
            f"clip skip {clip_skip} is not supported for SDXL models (they are conditioned on the penultimate "
            "layer of both text encoders by design); use clip skip 1"
        )
    if not model.clip_skip_ready:
        raise ConfigError(
            f"clip skip {clip_skip} needs a text encoder exported with the clip_skip input, and this artifact's "
            "predates it (clip skip 1 only); re-export the model with `sdtrt export` (then any clip skip runs)"
        )
    if clip_skip > model.text_layers:
        raise ConfigError(
            f"clip skip {clip_skip} is past this text encoder's {model.text_layers} layers; give 1..{model.text_layers}"
        )


def text_feeds(ids: torch.Tensor, model: ModelInfo, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """The first text encoder's feeds: token ``ids`` and, when it takes one (``model.clip_skip_ready``), the
    ``clip_skip`` input on ``ids``' device; ``ConfigError`` for a clip skip the model cannot run."""
    check_clip_skip(model, clip_skip)
    if not model.clip_skip_ready:
        return {"input_ids": ids}
    return {"input_ids": ids, CLIP_SKIP: torch.tensor([clip_skip], dtype=torch.int32, device=ids.device)}


__all__ = ["check_clip_skip", "text_feeds"]
