"""The values that flow along a ComfyUI graph's links on sdtrt, one per ComfyUI type name.

``MODEL``, ``CLIP`` and ``VAE`` are small handles on a served checkpoint (``ModelHandle``, ``ClipHandle``,
``VaeHandle``): they name the model, the LoRAs and the clip skip to run with, and open nothing; a node that uses
one asks the execution context for the pipeline at that moment (so a cached handle never keeps a closed model
alive). ``CONDITIONING`` is a list of ``runtime.sampling.Conditioning`` (ComfyUI's list of [tensor, dict]),
``LATENT`` a dict with ``"samples"`` (unscaled latents [B, 4, H/8, W/8], ComfyUI's VAE space) and optionally
``"noise_mask"``, ``IMAGE`` a float32 tensor [B, H, W, 3] in [0, 1] and ``MASK`` a float32 tensor [B, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# A LoRA in a handle: (absolute path of the file, strength)
LoraUse = tuple[str, float]


@dataclass(frozen=True)
class ModelHandle:
    """ComfyUI's MODEL: the UNet of ``checkpoint`` with ``loras`` (and sdtrt's step caching interval)."""

    checkpoint: Any  # serve.models.Checkpoint
    loras: tuple[LoraUse, ...] = ()
    cache_interval: int = 1

    def with_lora(self, path: str, strength: float) -> ModelHandle:
        return replace(self, loras=(*self.loras, (path, strength)))


@dataclass(frozen=True)
class ClipHandle:
    """ComfyUI's CLIP: the text encoder(s) of ``checkpoint`` with ``loras``, read at ``clip_skip`` (1: last
    layer; ComfyUI's stop_at_clip_layer -n is clip skip n)."""

    checkpoint: Any
    loras: tuple[LoraUse, ...] = ()
    clip_skip: int = 1

    def with_lora(self, path: str, strength: float) -> ClipHandle:
        return replace(self, loras=(*self.loras, (path, strength)))


@dataclass(frozen=True)
class VaeHandle:
    """ComfyUI's VAE: the VAE encoder/decoder of ``checkpoint``."""

    checkpoint: Any


def describe(value: Any) -> Any:
    """A value as an error report shows it (ComfyUI's format_value: plain values as they are, others as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"tensor{list(shape)}"
    if isinstance(value, dict) and "samples" in value:
        return f"LATENT{list(value['samples'].shape)}"
    if isinstance(value, ModelHandle | ClipHandle | VaeHandle):
        return f"{type(value).__name__}({value.checkpoint.name})"
    return type(value).__name__
