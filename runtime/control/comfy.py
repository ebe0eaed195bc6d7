"""ControlNets as ComfyUI applies them (ControlNetApplyAdvanced) in ``sample_latents``.

A ``ControlApply`` is one ControlNet on a conditioning: its hint IMAGE, strength and the part of the schedule it
acts on. As in ComfyUI (comfy/controlnet.py): the hint is cropped around the center to the latents' aspect and
resized to their pixel size with "nearest-exact"; the ControlNet sees the same inputs as the UNet; its residuals
are multiplied by ``strength`` on the steps whose sigma lies between the sigmas of ``start_percent`` and
``end_percent`` (ComfyUI's ``percent_to_sigma``) and left out on the others; several ControlNets add up. When
the negative conditioning carries the same applications (ControlNetApplyAdvanced sets both), the ControlNets run
on every UNet row; when it carries none, on the positive rows only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdtrt.runtime.comfy_tensors import common_upscale
from sdtrt.runtime.denoise import ControlSlot
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.errors import ControlError
from sdtrt.runtime.schedulers.sigmas import ModelSampling
from sdtrt.runtime.specs import controlnet_component


@dataclass(frozen=True, eq=False)
class ControlApply:
    """One ControlNet of the artifact (``name``, see ``Pipeline.controlnets``) applied to a conditioning: the hint
    ``image`` as a ComfyUI IMAGE [1 or B, H, W, 3] in [0, 1], ``strength``, and the fractions of the schedule
    (``start_percent`` < ``end_percent``, in [0, 1]) it acts between."""

    name: str
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        who = f"ControlNet {self.name!r}"
        if not isinstance(self.image, torch.Tensor) or self.image.dim() != 4 or self.image.shape[-1] != 3:
            found = tuple(self.image.shape) if isinstance(self.image, torch.Tensor) else type(self.image).__name__
            raise ControlError(f"{who}: the hint must be an IMAGE tensor [B, H, W, 3] in [0, 1], got {found}")
        for field in ("strength", "start_percent", "end_percent"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ControlError(f"{who}: {field} must be a finite number, got {value!r}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ControlError(
                f"{who}: need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and {self.end_percent}"
            )


def percent_to_sigma(model: ModelSampling, percent: float) -> float:
    """ComfyUI's ``percent_to_sigma``: the sigma a fraction of the way through the model's timesteps."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(model.sigma(torch.tensor((1.0 - percent) * 999.0)))


def step_scales(control: ControlApply, model: ModelSampling, sigmas: np.ndarray, residuals: int) -> torch.Tensor:
    """[steps, residuals]: ``strength`` on the steps whose sigma is inside the control's range, else 0."""
    high, low = percent_to_sigma(model, control.start_percent), percent_to_sigma(model, control.end_percent)
    active = [low <= float(s) <= high for s in sigmas[:-1]]
    scales = torch.tensor([float(control.strength) if on else 0.0 for on in active], dtype=torch.float32)
    return scales[:, None].expand(-1, residuals).contiguous()


def comfy_hint(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's ``common_upscale(image, width, height, "nearest-exact", "center")`` of an IMAGE: [B, 3, H, W]."""
    return common_upscale(image.float().cpu().movedim(-1, 1), height, width, "nearest-exact")


def check_applies(
    positive: Sequence[ControlApply], negative: Sequence[ControlApply], available: Sequence[str], ready: bool
) -> bool:
    """Refuse what cannot run; True when the ControlNets run on every row (the negative carries the same
    applications), False for the positive rows only (the negative carries none)."""
    for apply in (*positive, *negative):
        if not isinstance(apply, ControlApply):
            raise ControlError(f"conditioning controls must be ControlApply values, got {type(apply).__name__}")
        if apply.name not in available:
            names = ", ".join(available) or "none"
            raise ControlError(f"unknown ControlNet {apply.name!r}: this artifact has {names}")
    if (positive or negative) and not ready:
        raise ControlError("this artifact's UNet takes no ControlNet residuals; re-export it with --controlnet")
    if not negative:
        return False
    if len(positive) != len(negative) or any(p is not n for p, n in zip(positive, negative, strict=False)):
        raise ControlError(
            "the negative conditioning must carry the same ControlNet applications as the positive one (as "
            "ControlNetApplyAdvanced gives them) or none"
        )
    return True


def make_comfy_slots(
    applies: Sequence[ControlApply],
    engines: Mapping[str, Engine],
    size: tuple[int, int],
    steps: int,
    rows: tuple[int, bool],
    device: torch.device,
) -> list[ControlSlot]:
    """Zeroed slots for ``applies`` with hints of the pixel ``size`` (H, W) and per-step scales for ``steps``;
    ``rows``: (hint rows, positive rows only). The slot's ``guess`` flag runs it on the conditional rows
    only (and gives the others no residuals), which is what a control on the positive conditioning alone does."""
    count, positive_only = rows
    slots = []
    for apply in applies:
        engine = engines[controlnet_component(apply.name)]
        names = tuple(t.name for t in engine.outputs)
        half = any(t.name == "controlnet_cond" and t.dtype == "float16" for t in engine.inputs)
        hint = torch.zeros((count, 3, *size), dtype=torch.float16 if half else torch.float32, device=device)
        scales = torch.zeros((steps, len(names)), dtype=torch.float32, device=device)
        slots.append(ControlSlot(engine, names, hint, scales, guess=positive_only))
    return slots


def fill_comfy_slots(
    slots: Sequence[ControlSlot],
    applies: Sequence[ControlApply],
    model: ModelSampling,
    sigmas: np.ndarray,
    batch: int,
) -> None:
    """This call's hints (per latent image, repeated over the slot's row groups) and per-step scales."""
    for slot, apply in zip(slots, applies, strict=True):
        hint = comfy_hint(apply.image, slot.hint.shape[2], slot.hint.shape[3])
        if hint.shape[0] not in (1, batch):
            raise ControlError(f"ControlNet {apply.name!r}: the hint has {hint.shape[0]} images for {batch} latents")
        per_image = hint.expand(batch, -1, -1, -1)
        slot.hint.copy_(per_image.repeat(slot.hint.shape[0] // batch, 1, 1, 1).to(slot.hint.dtype))
        slot.scales.copy_(step_scales(apply, model, sigmas, len(slot.names)))


__all__ = ["ControlApply", "check_applies", "comfy_hint", "fill_comfy_slots", "make_comfy_slots", "percent_to_sigma"]
