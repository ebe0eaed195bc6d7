"""ControlNets in a denoiser: which engines run, and the static hint and scale tensors each step reads.

A denoiser (and its captured CUDA graph) is made per combination of active ControlNets (``control_key``);
each call refills the hints and per-step scales of the cached one (``fill_slots``), so a new hint, scale or
start/end never needs a new capture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sdtrt.runtime.control.hint import ResizeMode
from sdtrt.runtime.control.inputs import ControlInput, residual_scales
from sdtrt.runtime.denoise import ControlSlot
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.request import ControlSetting, Request
from sdtrt.runtime.specs import controlnet_component


def control_key(controls: Sequence[ControlInput]) -> tuple[tuple[str, bool], ...]:
    """What a denoiser's step depends on: the ControlNets run, in order, and which run in guess mode."""
    return tuple((c.name, c.guess_mode) for c in controls)


def hint_rows(req: Request, guess: bool) -> int:
    """Rows of a ControlNet's batch: every UNet row, or the conditional ones only in guess mode."""
    images = req.shape[0]
    return 2 * images if req.guided and not guess else images


def make_slots(
    controls: Sequence[ControlInput], engines: Mapping[str, Engine], req: Request, device: torch.device
) -> list[ControlSlot]:
    """Zeroed slots for ``controls`` (their engines open in ``engines``) at ``req``'s size and batch."""
    slots = []
    for control in controls:
        engine = engines[controlnet_component(control.name)]
        names = tuple(t.name for t in engine.outputs)
        hint_dtype = torch.float16 if _input(engine, "controlnet_cond") == "float16" else torch.float32
        hint = torch.zeros(
            (hint_rows(req, control.guess_mode), 3, req.height, req.width), dtype=hint_dtype, device=device
        )
        scales = torch.zeros((req.steps, len(names)), dtype=torch.float32, device=device)
        slots.append(ControlSlot(engine, names, hint, scales, control.guess_mode))
    return slots


def fill_slots(
    slots: Sequence[ControlSlot], controls: Sequence[ControlInput], hints: Sequence[torch.Tensor], req: Request
) -> None:
    """Copy this call's hints (each [1, 3, H, W] in [0, 1]) and per-step scales into the slots."""
    for slot, control, hint in zip(slots, controls, hints, strict=True):
        slot.hint.copy_(hint.to(slot.hint.dtype).expand(slot.hint.shape[0], -1, -1, -1))
        slot.scales.copy_(residual_scales(control, req.steps, req.first, len(slot.names)))


def control_settings(controls: Sequence[ControlInput]) -> tuple[ControlSetting, ...]:
    """How a result reports the controls it ran with."""
    return tuple(
        ControlSetting(
            c.name,
            float(c.scale),
            float(c.start),
            float(c.end),
            c.guess_mode,
            c.preprocess,
            ResizeMode.parse(c.resize_mode).value,
        )
        for c in controls
    )


def _input(engine: Engine, name: str) -> str:
    for tensor in engine.inputs:
        if tensor.name == name:
            return tensor.dtype
    raise KeyError(f"{engine.name} has no input {name!r}")
