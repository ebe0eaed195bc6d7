"""A1111's img2img inpainting fields over HTTP: ``mask`` and its settings -> the runtime's ``Inpaint``.

With a ``mask`` (base64 PNG/JPEG/WebP or a ``data:`` URL, the init image's size, white repaints) an img2img request
repaints the mask's white part of ``init_images[0]`` and keeps the rest (``runtime.inpaint``). The fields and
their A1111 defaults (those of A1111's ``StableDiffusionProcessingImg2Img``, which its API fills in):

- ``mask_blur`` 4 (pixels; ``mask_blur_x``/``mask_blur_y`` when ``mask_blur`` is not given: sdtrt blurs both
  directions alike, so they must be equal);
- ``inpainting_mask_invert`` 0 (1: the black part repaints);
- ``inpainting_fill`` 0 ("fill"; 1 "original", 2 "latent noise", 3 "latent nothing");
- ``inpaint_full_res`` true ("only masked": the region around the mask is generated at width x height and pasted
  back, so the images have the init image's size), ``inpaint_full_res_padding`` 0;
- ``mask_round`` true: the latent mask is rounded to 0/1, the only way sdtrt runs (false, A1111's soft latent
  mask, is refused).

A mask with an alpha channel that is not fully opaque is read from its alpha (as A1111 reads the masks its UI
sends). Without a mask these fields cannot change the image (as in A1111) and are only type-checked.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.inpaint import FILLS, Inpaint, plan_inpaint

from .errors import RequestError
from .images import decode_image
from .limits import Limits

MAX_PIXELS = 256  # mask blur and padding (the runtime's bound)
A1111_DEFAULTS = {"mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
                  "inpainting_mask_invert": 0, "mask_round": True}  # fmt: skip


@dataclass(frozen=True)
class InpaintFields:
    """One request's inpainting: the decoded ``mask`` bytes and A1111's settings (``fill`` by name, ``FILLS``)."""

    mask: bytes
    blur: int = 4
    invert: bool = False
    fill: str = "fill"
    only_masked: bool = True
    padding: int = 0

    def inpaint(self) -> Inpaint:
        """The runtime's ``Inpaint`` for these fields (the mask image opened and read as A1111 reads it)."""
        return Inpaint(mask_image(self.mask), self.blur, self.invert, self.fill, self.only_masked, self.padding)

    def generation_params(self) -> dict[str, Any]:
        """The fields A1111 writes after ``Denoising strength`` for an inpainting run, in its order (its
        ``extra_generation_params``)."""
        params: dict[str, Any] = {"Mask mode": "Inpaint not masked"} if self.invert else {}
        if self.blur > 0:
            params["Mask blur"] = self.blur
        if self.only_masked:
            params.update({"Inpaint area": "Only masked", "Masked area padding": self.padding})
        if self.fill != "original":  # A1111 names the masked content when it is not the image's own
            params["Masked content"] = self.fill
        return params

    def echo(self) -> dict[str, Any]:
        """The request's inpainting fields as A1111's ``parameters`` echo them (defaults filled in)."""
        return {
            "mask_blur": self.blur,
            "inpainting_fill": FILLS.index(self.fill),
            "inpaint_full_res": self.only_masked,
            "inpaint_full_res_padding": self.padding,
            "inpainting_mask_invert": int(self.invert),
            "mask_round": True,
        }


def mask_image(data: bytes) -> Any:
    """A mask's bytes -> an L image: its alpha if it has a non-opaque one (A1111's UI masks), else its grey."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def parse_inpaint(payload: dict[str, Any], img2img: bool, limits: Limits | None = None) -> InpaintFields | None:
    """The request's ``InpaintFields`` (None without a mask); ``RequestError`` naming the field for a bad value, a
    mask on txt2img or without ``init_images``, or a mask of another size than the init image."""
    blur = _pixels(payload, "mask_blur")
    blur_x, blur_y = _pixels(payload, "mask_blur_x"), _pixels(payload, "mask_blur_y")
    invert = _flag(payload, "inpainting_mask_invert")
    only_masked = _flag(payload, "inpaint_full_res")
    padding = _pixels(payload, "inpaint_full_res_padding")
    fill = payload.get("inpainting_fill")
    if fill is not None and (isinstance(fill, bool) or fill not in range(len(FILLS))):
        names = ", ".join(f"{k} {name}" for k, name in enumerate(FILLS))
        raise RequestError(f"inpainting_fill must be one of 0..3 ({names}), got {_show(fill)}")
    mask_round = payload.get("mask_round")
    if mask_round is not None and not isinstance(mask_round, bool):
        raise RequestError(f"mask_round must be true or false, got {_show(mask_round)}")
    text = payload.get("mask")
    if text in (None, ""):
        return None
    if not img2img:
        raise RequestError("mask is img2img's: send it to /sdapi/v1/img2img with init_images (the image it repaints)")
    if not isinstance(payload.get("init_images"), list) or not payload["init_images"]:
        raise RequestError("mask needs the image it applies to: add init_images (a list with one base64 image)")
    if mask_round is False:
        raise RequestError(
            "mask_round false (a soft latent mask) is not implemented: sdtrt rounds the latent mask to 0/1 (a latent "
            "pixel repaints when at least half of it is white); leave mask_round out or true, and soften the edge "
            "with mask_blur"
        )
    if blur is None and blur_x is not None and blur_y is not None and blur_x != blur_y:
        raise RequestError(
            f"mask_blur_x {blur_x} and mask_blur_y {blur_y} differ: sdtrt blurs the mask alike in both "
            "directions; send mask_blur (or equal mask_blur_x and mask_blur_y)"
        )
    if blur is None:  # A1111: mask_blur sets both; alone, x and y default to 4 each
        blur = blur_x if blur_x is not None else blur_y
    return InpaintFields(
        decode_image(text, "mask", limits),
        A1111_DEFAULTS["mask_blur"] if blur is None else blur,
        bool(A1111_DEFAULTS["inpainting_mask_invert"] if invert is None else invert),
        FILLS[A1111_DEFAULTS["inpainting_fill"] if fill is None else fill],
        bool(A1111_DEFAULTS["inpaint_full_res"] if only_masked is None else only_masked),
        A1111_DEFAULTS["inpaint_full_res_padding"] if padding is None else padding,
    )


def check_mask_size(fields: InpaintFields, init: bytes) -> None:
    """``RequestError`` unless the mask has the init image's size (both read from their headers)."""
    from PIL import Image

    mask = Image.open(io.BytesIO(fields.mask)).size
    image = Image.open(io.BytesIO(init)).size
    if mask != image:
        raise RequestError(
            f"mask is {mask[0]}x{mask[1]} but init_images[0] is {image[0]}x{image[1]}; send a mask of the init "
            "image's size (white repaints)"
        )


def check_with_controls(fields: InpaintFields | None, units: int) -> None:
    """``RequestError`` for ControlNet units with "only masked": their hints would cover the whole image while
    the generation covers the crop around the mask."""
    if fields is not None and fields.only_masked and units:
        raise RequestError(
            "inpaint_full_res true (only masked) with ControlNet units is not implemented: the hints cover the "
            "whole image, the generation only the crop around the mask; send inpaint_full_res false (whole picture)"
        )


def check_inpaint(fields: InpaintFields, image: Any, width: int, height: int, factor: int) -> None:
    """``RequestError`` (naming ``mask``) if the runtime would refuse this inpainting at ``width`` x ``height``:
    nothing to repaint, or a white area below one latent pixel. Cheap: the "fill" colours are not computed."""
    try:
        plan_inpaint(replace(fields, fill="original").inpaint(), image, width, height, factor)
    except ConfigError as exc:
        raise RequestError(f"mask: {exc}") from None


def add_infotext(text: str, fields: InpaintFields) -> str:
    """A1111's ``parameters`` text with the inpainting fields after ``Denoising strength`` (its last line holds
    the settings: the prompt's own text is never touched)."""
    head, sep, settings = text.rpartition("\n")
    parts = settings.split(", ")
    at = next((k + 1 for k, part in enumerate(parts) if part.startswith("Denoising strength: ")), len(parts))
    parts[at:at] = [f"{key}: {value}" for key, value in fields.generation_params().items()]
    return head + sep + ", ".join(parts)


def _pixels(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PIXELS:
        raise RequestError(f"{name} must be an integer number of pixels in 0..{MAX_PIXELS}, got {_show(value)}")
    return value


def _flag(payload: dict[str, Any], name: str) -> bool | None:
    value = payload.get(name)
    if value is None:
        return None
    if value not in (0, 1) or isinstance(value, float):  # True/False and 0/1 (A1111's UI sends an index)
        raise RequestError(f"{name} must be 0/1 or true/false, got {_show(value)}")
    return bool(value)


def _show(value: Any) -> str:
    return json.dumps(value)[:60]


__all__ = ["A1111_DEFAULTS", "InpaintFields", "add_infotext", "check_inpaint", "check_mask_size", "check_with_controls",
           "mask_image",
           "parse_inpaint"]  # fmt: skip
