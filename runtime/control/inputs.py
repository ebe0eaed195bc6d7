"""What one ControlNet contributes to a generation, checked before any work, and its per-step residual scales.

``ControlInput`` is the typed control a caller passes to the pipeline (one per ControlNet):

    pipe("a house", controls=[ControlInput("canny", Image.open("edges.png"), scale=0.8, end=0.6)])

Semantics are diffusers' ControlNet pipelines': the residuals of all ControlNets are summed, each scaled by
``scale x keep(step)``, where ``keep`` is 1 while the step lies inside [start, end] of the steps run and 0
outside; guess mode ("ControlNet is more important" in A1111) runs the ControlNet on the conditional rows only and
scales its residuals from 0.1 (first) to 1.0 (middle block) on a log scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtrt.runtime.control.hint import PREPROCESSORS, HintOptions, ResizeMode, build_hint
from sdtrt.runtime.errors import ControlError

HintImage = Image.Image | np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class ControlInput:
    """One ControlNet's part in a call.

    ``name``: a ControlNet of the artifact (``Pipeline.controlnets``). ``image``: the hint as an image (any PIL
    image or uint8 array; preprocessed with ``preprocess`` and fitted to the image size with ``resize_mode``) or
    a ready tensor [1, 3, H, W] float RGB in [0, 1] at the image size, taken as it is. ``scale`` multiplies the
    residuals; ``start``/``end`` are the fractions of the steps run between which the ControlNet acts.
    """

    name: str
    image: HintImage
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    resize_mode: ResizeMode | str | int = ResizeMode.CROP_AND_RESIZE
    preprocess: str = "none"
    low_threshold: int = 100
    high_threshold: int = 200
    processor_res: int = 512

    def __post_init__(self) -> None:
        who = f"control {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ControlError(f"a control needs the name of one of the artifact's ControlNets, got {self.name!r}")
        for field_name in ("scale", "start", "end"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ControlError(f"{who}: {field_name} must be a finite number, got {value!r}")
        if self.scale < 0:
            raise ControlError(f"{who}: scale must be >= 0 (0 turns the ControlNet off), got {self.scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ControlError(
                f"{who}: start and end must satisfy 0 <= start < end <= 1 (fractions of the steps run), got "
                f"start {self.start} and end {self.end}; e.g. start 0 and end 1 for every step"
            )
        if not isinstance(self.guess_mode, bool):
            raise ControlError(f"{who}: guess_mode must be true or false, got {self.guess_mode!r}")
        try:
            object.__setattr__(self, "resize_mode", ResizeMode.parse(self.resize_mode))
        except Exception as exc:
            raise ControlError(f"{who}: {exc}") from None
        if self.preprocess not in PREPROCESSORS:
            raise ControlError(
                f"{who}: unknown preprocessor {self.preprocess!r}; expected one of {', '.join(PREPROCESSORS)} "
                "(other detectors need downloaded weights: run them elsewhere and pass their map with 'none')"
            )
        try:  # the preprocessor's own settings, checked now rather than when the hint is built
            HintOptions(
                8,
                8,
                ResizeMode.parse(self.resize_mode),
                self.preprocess,
                self.low_threshold,
                self.high_threshold,
                self.processor_res,
            )
        except Exception as exc:
            raise ControlError(f"{who}: {exc}") from None
        self._check_image(who)

    def _check_image(self, who: str) -> None:
        image = self.image
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3 or not image.is_floating_point():
                raise ControlError(
                    f"{who}: a hint tensor must be float [1, 3, H, W] RGB in [0, 1], got {image.dtype} "
                    f"{list(image.shape)}; or pass a PIL image"
                )
            if image.numel() and (float(image.min()) < 0 or float(image.max()) > 1):
                raise ControlError(f"{who}: a hint tensor must hold values in [0, 1]; scale it, or pass a PIL image")
        elif not isinstance(image, Image.Image | np.ndarray):
            raise ControlError(
                f"{who}: the hint must be a PIL image, a uint8 array or a [1, 3, H, W] tensor, got "
                f"{type(image).__name__}"
            )
        if isinstance(image, Image.Image) and (image.width == 0 or image.height == 0):
            raise ControlError(f"{who}: the hint image is empty ({image.width}x{image.height} pixels)")

    def hint(self, width: int, height: int) -> torch.Tensor:
        """The conditioning for an image of width x height: [1, 3, height, width] float32 in [0, 1]."""
        if isinstance(self.image, torch.Tensor):
            if tuple(self.image.shape[2:]) != (height, width):
                raise ControlError(
                    f"control {self.name!r}: the hint tensor is {self.image.shape[3]}x{self.image.shape[2]} but the "
                    f"image is {width}x{height}; give a tensor of the image size, or a PIL image to be fitted"
                )
            return self.image.float()
        options = HintOptions(
            width,
            height,
            ResizeMode.parse(self.resize_mode),
            self.preprocess,
            self.low_threshold,
            self.high_threshold,
            self.processor_res,
        )
        return build_hint(self.image, options)


def check_controls(controls: Sequence[ControlInput], available: Mapping[str, Any], unet_takes_residuals: bool) -> None:
    """Refuse controls this artifact cannot run, before any work: ``available`` maps its ControlNet names to
    their entries; ``ControlError`` naming the fix otherwise."""
    if not controls:
        return
    names = ", ".join(sorted(available)) or "none"
    for control in controls:
        if not isinstance(control, ControlInput):
            raise ControlError(f"controls must be ControlInput values, got {type(control).__name__}")
    if not unet_takes_residuals:
        raise ControlError(
            "this artifact's UNet takes no ControlNet residuals (it was exported without them); re-export the "
            "model with `sdtrt export MODEL --out FOLDER --controlnet CONTROLNET`"
        )
    if len(controls) > len(available):
        raise ControlError(
            f"{len(controls)} controls were given but the artifact has {len(available)} ControlNet(s) ({names}); "
            "give each ControlNet at most once, or add more with `sdtrt export CONTROLNET --into FOLDER`"
        )
    seen: set[str] = set()
    for control in controls:
        if control.name not in available:
            raise ControlError(
                f"unknown ControlNet {control.name!r}: this artifact has {names}; add it with "
                f"`sdtrt export CONTROLNET --into FOLDER`"
            )
        if control.name in seen:
            raise ControlError(f"ControlNet {control.name!r} is given twice; give each ControlNet once per call")
        seen.add(control.name)


def control_keep(start: float, end: float, steps_run: int) -> list[float]:
    """1.0 for each step run inside [start, end] of the steps, else 0.0: diffusers' ``controlnet_keep``."""
    return [1.0 - float(i / steps_run < start or (i + 1) / steps_run > end) for i in range(steps_run)]


def residual_scales(control: ControlInput, steps: int, first: int, residuals: int) -> torch.Tensor:
    """[steps, residuals] float32: the factor each residual of ``control`` is multiplied by at each step.

    Rows before ``first`` (steps img2img skips) are zero. In guess mode the residuals are also scaled from 0.1
    to 1.0 on a log scale, the middle block's last, as diffusers' ControlNet does.
    """
    keep = torch.tensor([0.0] * first + control_keep(control.start, control.end, steps - first))
    per_residual = torch.logspace(-1, 0, residuals) if control.guess_mode else torch.ones(residuals)
    return (keep[:, None] * control.scale) * per_residual[None, :]
