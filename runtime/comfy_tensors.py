"""ComfyUI's tensor helpers, written from their definitions for the ComfyUI stages (``runtime.sampling``): resizing
with a center crop to the target aspect and fitting a batch to another size (comfy/utils.py), the starting latents,
noise masks and an inpainting UNet's concat channels (comfy/samplers.py, comfy/model_base.py)."""

from __future__ import annotations

import math

import torch

from sdtrt.runtime.errors import ShapeError

# ComfyUI's latents of a blank (0) image for an inpainting UNet given no mask (model_base set_inpaint), scaled
BLANK_LATENTS = (0.8223, -0.6876, 0.6364, 0.1380)


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


def prepare_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A noise mask ([h, w], [B, h, w] or [B, 1, h, w], any size) as ComfyUI reshapes it for latents of
    ``shape``: bilinearly resized to the latent size, repeated over the channels and the batch."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ShapeError(f"a noise mask must be [h, w], [B, h, w] or [B, 1, h, w], got {found}")
    flat = mask.float().cpu().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    resized = torch.nn.functional.interpolate(flat, size=tuple(shape[2:]), mode="bilinear")
    return repeat_to_batch_size(resized.repeat(1, shape[1], 1, 1), shape[0])


def concat_condition(
    concat: tuple[torch.Tensor | None, torch.Tensor | None],
    clean: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """An inpainting UNet's extra channels [B, 1 + C, h, w] for a conditioning's ``concat`` (concat_latent_image,
    concat_mask), as ComfyUI's concat_cond makes them: its mask (else the noise ``mask``) rounded, and its latents
    (unscaled; else the scaled input latents ``clean``), each resized (bilinear, center crop) and spread over the
    batch; with no mask at all, the full mask and the latents of a blank image."""
    concat_latent_image, concat_mask = concat
    batch, channels, height, width = clean.shape
    if concat_mask is None and mask is None:
        ones = torch.ones((batch, 1, height, width))
        return torch.cat(
            [
                ones,
                torch.tensor(BLANK_LATENTS[:channels], dtype=torch.float32).reshape(1, -1, 1, 1)
                * torch.ones_like(clean),
            ],
            1,
        )
    image = clean if concat_latent_image is None else concat_latent_image.float().cpu() * scale
    if tuple(image.shape[1:]) != (channels, height, width):
        image = common_upscale(image, height, width, "bilinear")
    chosen = concat_mask if concat_mask is not None else mask
    assert chosen is not None
    chosen = chosen.float().cpu()
    if chosen.dim() == 4:
        chosen = chosen[:, :1]
    chosen = chosen.reshape(-1, 1, chosen.shape[-2], chosen.shape[-1])
    if tuple(chosen.shape[-2:]) != (height, width):
        chosen = common_upscale(chosen, height, width, "bilinear")
    return torch.cat([resize_to_batch_size(chosen.round(), batch), resize_to_batch_size(image, batch)], dim=1)


def noised_start(noise: torch.Tensor, clean: torch.Tensor, first: float, sigma_max: float) -> torch.Tensor:
    """ComfyUI's starting latents: ``noise`` scaled by ``sqrt(1 + sigma0^2)`` when the first sigma is the model's
    largest (rel. 1e-5) or above, else by ``sigma0``, plus the scaled input latents ``clean``."""
    sigma = torch.tensor(first, dtype=torch.float32)
    full = math.isclose(sigma_max, float(sigma), rel_tol=1e-5) or float(sigma) > sigma_max
    return noise * (torch.sqrt(1.0 + sigma**2.0) if full else sigma) + clean


def lcm_length(*texts: torch.Tensor) -> int:
    """The sequence length conditionings of different lengths are repeated to (their least common multiple)."""
    return math.lcm(*(int(t.shape[1]) for t in texts))


def repeat_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """``text`` repeated along the sequence to ``length`` (attention over repeated keys gives the same result)."""
    return text.repeat(1, length // text.shape[1], 1) if text.shape[1] < length else text


__all__ = [
    "BLANK_LATENTS",
    "common_upscale",
    "concat_condition",
    "lcm_length",
    "noised_start",
    "prepare_mask",
    "repeat_text",
    "repeat_to_batch_size",
    "resize_to_batch_size",
]
