"""ComfyUI's tensor helpers (comfy/utils.py), written from their definitions for the ComfyUI stages: resizing with
a center crop to the target aspect, and fitting a batch to another size."""

from __future__ import annotations

import math

import torch


def common_upscale(samples: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """[B, C, H, W] cropped around the center to the aspect of ``width`` x ``height`` (whole pixels, rounded),
    then resized to it with ``torch.nn.functional.interpolate`` in ``mode`` (ComfyUI's crop "center")."""
    old_height, old_width = samples.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    cropped = samples.narrow(-2, y, old_height - 2 * y).narrow(-1, x, old_width - 2 * x)
    return torch.nn.functional.interpolate(cropped, size=(height, width), mode=mode)


def repeat_to_batch_size(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` items, repeating the whole batch as often as needed."""
    if tensor.shape[0] < batch:
        tensor = tensor.repeat(math.ceil(batch / tensor.shape[0]), *([1] * (tensor.dim() - 1)))
    return tensor[:batch]


def resize_to_batch_size(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` items picked evenly from ``tensor``'s (nearest item, as ComfyUI spreads a batch)."""
    size = tensor.shape[0]
    if size == batch or batch <= 1:
        return tensor[:batch]
    if batch < size:
        scale = (size - 1) / (batch - 1)
        picks = [min(round(i * scale), size - 1) for i in range(batch)]
    else:
        scale = size / batch
        picks = [min(math.floor((i + 0.5) * scale), size - 1) for i in range(batch)]
    return tensor[picks]


__all__ = ["common_upscale", "repeat_to_batch_size", "resize_to_batch_size"]
