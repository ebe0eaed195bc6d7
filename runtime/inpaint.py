"""Inpainting: repaint the white part of a mask over an init image, with any model or an inpainting model.

pipe(prompt, image=photo, inpaint=Inpaint(mask, blur=4), strength=0.75)

The mask is prepared as A1111's img2img inpainting prepares it: ``invert`` swaps what repaints, ``blur`` (pixels)
softens its edge, and the latent mask is the blurred mask resized to the latent grid and rounded (a latent pixel
repaints when at least half of its neighbourhood does). Then, by model:

- a regular model (4-channel UNet): after every step, the latents outside the latent mask are put back to the
  init image's latents noised to the next step's level (what diffusers' ``StableDiffusionInpaintPipeline`` does for
  a 4-channel UNet), so only the masked region is generated;
- an inpainting model (UNet input: latents, mask, masked-image latents): the UNet sees the mask and the image with
  the masked region blanked (as diffusers feeds it), and the latents are not blended. Without a mask (txt2img, or
  img2img without ``inpaint``) such a model gets the full mask and a blank image, as A1111 feeds it (diffusers'
  inpainting pipelines always take a mask).

In both, the decoded images are composited over the init image with the blurred mask as alpha, so pixels outside
it are the init image's own. ``fill`` is A1111's ``inpainting_fill``: what the masked region starts from ("original":
the image; "fill": the colours around it, blurred in; "latent noise": random latents; "latent nothing": zero
latents). ``only_masked`` (A1111's "inpaint at full resolution"): the region around the mask (``padding`` pixels
more, widened to the output's aspect ratio) is cut out, generated at the requested size, and pasted back, so the
images have the init image's size.

Inside the step everything is static buffers and per-step coefficient tables (``denoise.InpaintBlend``,
``StepBuffers.condition``): a captured CUDA graph replays it as it replays the plain step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sdtrt.runtime.denoise import StepBuffers
from sdtrt.runtime.errors import ConfigError

FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
FILL_RADII = (256, 64, 16, 4, 2)  # "fill": colours from ever nearer surroundings, coarse to fine


@dataclass(frozen=True)
class Inpaint:
    """What to repaint (``mask``: white repaints, the init image's size) and how (A1111's options)."""

    mask: Image.Image
    blur: int = 4  # A1111's mask_blur (pixels)
    invert: bool = False  # A1111's inpainting_mask_invert: black repaints
    fill: str = "original"  # A1111's inpainting_fill, by name (FILLS)
    only_masked: bool = False  # A1111's inpaint_full_res
    padding: int = 32  # A1111's inpaint_full_res_padding (pixels around the mask, only_masked)

    def __post_init__(self) -> None:
        if not isinstance(self.mask, Image.Image):
            raise ConfigError(f"the inpainting mask must be an image, got {type(self.mask).__name__}")
        for name in ("blur", "padding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
                raise ConfigError(f"mask {name} must be an integer number of pixels in 0..256, got {value!r}")
        if self.fill not in FILLS:
            raise ConfigError(f"inpainting fill must be one of {', '.join(map(repr, FILLS))}, got {self.fill!r}")


@dataclass(frozen=True)
class MaskPlan:
    """One inpainting call prepared: the image the pipeline works on and its masks at the working size.

    ``alpha`` is the blurred mask ([1, 1, H, W] in [0, 1], 1 repaints) the result is composited with; ``latent`` the
    0/1 latent mask [1, 1, H/f, W/f]; ``binary`` the blurred mask >= 0.5 at pixel size (what an inpainting model's
    masked image blanks). ``original`` and ``box`` (only masked: the crop in it) say where the result goes.
    """

    image: Image.Image
    alpha: torch.Tensor
    latent: torch.Tensor
    binary: torch.Tensor
    original: Image.Image
    fill: str
    base: Image.Image  # the working image before "fill": what the result is composited over
    box: tuple[int, int, int, int] | None = None
    full_alpha: torch.Tensor | None = None  # only masked: the blurred mask at the original's size


def plan_inpaint(inpaint: Inpaint, image: Image.Image | None, width: int, height: int, factor: int) -> MaskPlan:
    """Check ``inpaint`` against the init ``image`` and prepare its masks for a ``width`` x ``height`` generation
    on latents ``factor`` times smaller; ``ConfigError`` (before any work) for a mask that cannot be used."""
    if image is None:
        raise ConfigError("an inpainting mask needs the init image it applies to; give the image too (--init-image)")
    if inpaint.mask.size != image.size:
        raise ConfigError(
            f"the mask is {inpaint.mask.width}x{inpaint.mask.height} but the init image is "
            f"{image.width}x{image.height}; give a mask of the image's size (white repaints)"
        )
    mask = inpaint.mask.convert("L")
    if inpaint.invert:
        mask = ImageOps.invert(mask)
    if mask.getextrema()[1] < 128:
        raise ConfigError(
            "the mask repaints nothing: it has no white (>= 128) pixel"
            + (" once inverted (inpainting_mask_invert)" if inpaint.invert else "")
            + "; paint white where the image should change"
        )
    if inpaint.blur:
        mask = mask.filter(ImageFilter.GaussianBlur(inpaint.blur))
    original, box, full_alpha = image.convert("RGB"), None, None
    work = original
    if inpaint.only_masked:
        box = crop_box(mask, inpaint.padding, width, height)
        full_alpha = _unit(mask)
        mask, work = mask.crop(box), original.crop(box)
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        work = work.resize((width, height), Image.Resampling.LANCZOS)
    latent = _unit(mask.resize((width // factor, height // factor), Image.Resampling.BICUBIC)).round()
    if not latent.any():
        raise ConfigError(
            f"the mask's white area is smaller than one latent pixel ({factor}x{factor} image pixels) at "
            f"{width}x{height}; paint a larger area (or lower mask_blur)"
        )
    alpha = _unit(mask)
    binary = (alpha >= 0.5).float()
    filled = fill_masked(work, alpha) if inpaint.fill == "fill" else work
    return MaskPlan(filled, alpha, latent, binary, original, inpaint.fill, work, box, full_alpha)


def crop_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The region "only masked" generates: the mask's bounding box, ``padding`` wider on each side, then widened
    to the ``width``:``height`` aspect ratio, all within the image."""
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    assert bbox is not None  # the mask has white: checked by plan_inpaint
    x1, y1 = max(bbox[0] - padding, 0), max(bbox[1] - padding, 0)
    x2, y2 = min(bbox[2] + padding, mask.width), min(bbox[3] + padding, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) < ratio:  # too narrow: widen
        x1, x2 = _widen(x1, x2, round((y2 - y1) * ratio), mask.width)
    else:  # too flat: heighten
        y1, y2 = _widen(y1, y2, round((x2 - x1) / ratio), mask.height)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown to ``size`` around its centre, shifted (and cut at most to ``limit``) to stay inside."""
    size = min(size, limit)
    lo = min(max((lo + hi - size) // 2, 0), limit - size)
    return lo, lo + size


def fill_masked(image: Image.Image, alpha: torch.Tensor) -> Image.Image:
    """A1111's "fill": the masked region painted with the colours around it, blurred in from coarse to fine."""
    keep = 1.0 - alpha[0, 0].numpy()[..., None]
    pixels = np.asarray(image, dtype=np.float32)
    filled = np.broadcast_to(pixels.reshape(-1, 3).mean(0), pixels.shape).copy()
    for radius in FILL_RADII:
        weight = _blur(keep, radius)
        colour = _blur(pixels * keep, radius)
        known = weight[..., 0] > 1e-3
        filled[known] = colour[known] / weight[known]
    out = pixels * keep + filled * (1.0 - keep)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur (std ``sigma`` pixels, zeros outside) of an [H, W, C] float array; a wide blur runs on a
    downscaled copy (at most 4 px std there), which changes nothing a blur that wide would keep."""
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    height, width = x.shape[2:]
    factor = max(1, int(sigma // 4))
    small = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True) if factor > 1 else x
    std = sigma / factor
    radius = max(1, int(3 * std + 0.5))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / std) ** 2)
    taps = (taps / taps.sum()).repeat(small.shape[1], 1, 1, 1)
    conv = torch.nn.functional.conv2d
    out = conv(small, taps.reshape(-1, 1, 1, 2 * radius + 1), padding=(0, radius), groups=small.shape[1])
    out = conv(out, taps.reshape(-1, 1, 2 * radius + 1, 1), padding=(radius, 0), groups=small.shape[1])
    if factor > 1:
        out = torch.nn.functional.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _unit(mask: Image.Image) -> torch.Tensor:
    """An L image -> [1, 1, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def composite(plan: MaskPlan, pixels: torch.Tensor) -> torch.Tensor:
    """Generated ``pixels`` [B, 3, H, W] in [0, 1] -> over the init image, the blurred mask as alpha (only masked:
    pasted back into the init image at its own size)."""
    if plan.box is None:
        return plan.alpha * pixels + (1.0 - plan.alpha) * _pixels(plan.base)
    x1, y1, x2, y2 = plan.box
    crop = torch.nn.functional.interpolate(pixels, size=(y2 - y1, x2 - x1), mode="bicubic", antialias=True)
    canvas = _pixels(plan.original).expand(pixels.shape[0], -1, -1, -1).clone()
    canvas[:, :, y1:y2, x1:x2] = crop.clamp(0, 1)
    assert plan.full_alpha is not None
    return plan.full_alpha * canvas + (1.0 - plan.full_alpha) * _pixels(plan.original)


def fill_latents(plan: MaskPlan, clean: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """The init latents [B, C, h, w] with the masked region as ``plan.fill`` says ("latent noise": a Gaussian
    draw from each image's generator, after the sampler's; "latent nothing": zeros; else unchanged)."""
    if plan.fill not in ("latent noise", "latent nothing"):
        return clean
    masked = plan.latent.to(clean.device)
    if plan.fill == "latent nothing":
        return clean * (1.0 - masked)
    noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in generators]).to(clean.device)
    return clean * (1.0 - masked) + noise * masked


def fill_inpaint_buffers(
    buffers: StepBuffers, plan: MaskPlan, clean: torch.Tensor, noise: torch.Tensor, condition: torch.Tensor | None
) -> None:
    """Write this call's inpainting into a denoiser's static buffers: a regular UNet's blend (kept region, init
    latents, their noise), or an inpainting UNet's ``condition`` (one copy per text row: uncond rows too)."""
    if buffers.blend is not None:
        blend, device = buffers.blend, buffers.latents.device
        blend.keep.copy_((1.0 - plan.latent).to(device).expand_as(blend.keep))
        blend.clean.copy_(clean.to(device))
        blend.noise.copy_(noise.to(device))
    if buffers.condition is not None:
        assert condition is not None
        fill_condition(buffers, condition)


def fill_condition(buffers: StepBuffers, condition: torch.Tensor) -> None:
    """An inpainting UNet's ``condition`` [B, 1 + C, h, w] into its buffer, once per text row (uncond rows too)."""
    assert buffers.condition is not None
    rows = buffers.condition.shape[0] // condition.shape[0]
    buffers.condition.copy_(torch.cat([condition] * rows).to(buffers.condition.device))


def start_inpaint(
    buffers: StepBuffers,
    plan: MaskPlan,
    clean: torch.Tensor,
    noise: torch.Tensor,
    condition: torch.Tensor | None,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The init latents the call starts from (``fill_latents``), with its inpainting written into ``buffers``."""
    clean = fill_latents(plan, clean, generators)
    fill_inpaint_buffers(buffers, plan, clean, noise, condition)
    return clean


def _pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image -> [1, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


__all__ = [
    "FILLS",
    "Inpaint",
    "MaskPlan",
    "composite",
    "crop_box",
    "fill_condition",
    "fill_inpaint_buffers",
    "fill_latents",
    "fill_masked",
    "plan_inpaint",
    "start_inpaint",
]
