"""Control hints: a user's image -> the tensor a ControlNet is conditioned on, [1, 3, H, W] RGB in [0, 1].

The steps and their defaults follow A1111's ControlNet extension, so an image and settings that work there give
the same hint here:

1. Pixels: any 8-bit PIL mode or uint8 array becomes RGB. An image with alpha that is neither (almost) fully
   opaque nor (almost) fully transparent is a drawing on a transparent canvas: its alpha channel is the hint
   (A1111's "canvas scribble" rule); otherwise alpha is dropped and the colours are used as they are.
2. Preprocessing at ``processor_res``: ``none`` keeps the image; ``canny`` scales the shorter side to
   ``processor_res``, pads to a multiple of 64 by repeating the edge pixels, runs ``cv2.Canny`` (A1111's canny
   preprocessor calls exactly that) and removes the padding again.
3. The map is fitted to the image size with a resize mode (A1111's default is "Crop and Resize"). Maps of 3 to
   199 colours (segmentation-like) are resized with nearest neighbour, others with area averaging when they
   shrink and bicubic when they grow; a black-and-white map (canny edges) is thresholded back to pure black and
   white with Otsu's method afterwards. Two differences from A1111: it thins upscaled one-pixel edges again and
   sdtrt does not (an upscaled canny map can have edges a pixel wider), and it takes any two-colour map whose
   channels span 0..255 (red on blue) for black and white, where sdtrt asks for two greys.

"Resize and Fill" pads with the median colour of the map's four borders (as A1111 does): a black canny
background stays black and a photo is extended with its own edge colour rather than a fixed grey.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from PIL import Image

from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, ControlError

logger = logging.getLogger(__name__)

PREPROCESSORS = ("none", "canny")
# A1111's processor_res slider runs from 64 to 2048; pixel-perfect sizes for large images go above it.
PROCESSOR_RES_RANGE = (64, 4096)
THRESHOLD_RANGE = (1, 255)
# Alpha at or below / at or above these everywhere counts as fully transparent / opaque (A1111's limits).
_TRANSPARENT_MAX, _OPAQUE_MIN = 5, 250


class ResizeMode(str, Enum):
    """How a hint of another aspect ratio is fitted to the image size (A1111's three modes)."""

    JUST_RESIZE = "just_resize"  # stretch to the size
    CROP_AND_RESIZE = "crop_and_resize"  # scale to cover the size, cut the overflow evenly from both sides
    RESIZE_AND_FILL = "resize_and_fill"  # scale to fit inside the size, pad evenly with the border colour

    @classmethod
    def parse(cls, value: ResizeMode | str | int) -> ResizeMode:
        """A mode from its name, A1111's label ("Crop and Resize", older "Inner Fit ..." labels too) or A1111's
        API code (0, 1, 2); ``ConfigError`` naming the valid values otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_CODES):
            return _CODES[value]
        if isinstance(value, str) and value.strip().lower() in _NAMES:
            return _NAMES[value.strip().lower()]
        raise ConfigError(
            f"unknown resize mode {value!r}: expected one of {', '.join(m.value for m in cls)}, A1111's labels "
            "'Just Resize', 'Crop and Resize', 'Resize and Fill', or A1111's codes 0, 1, 2"
        )


_CODES = (ResizeMode.JUST_RESIZE, ResizeMode.CROP_AND_RESIZE, ResizeMode.RESIZE_AND_FILL)
_NAMES = {
    **{mode.value: mode for mode in ResizeMode},
    "just resize": ResizeMode.JUST_RESIZE,
    "crop and resize": ResizeMode.CROP_AND_RESIZE,
    "resize and fill": ResizeMode.RESIZE_AND_FILL,
    # labels of older A1111 ControlNet versions, still accepted by its API
    "inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE,
    "scale to fit (inner fit)": ResizeMode.CROP_AND_RESIZE,
    "outer fit (shrink to fit)": ResizeMode.RESIZE_AND_FILL,
    "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL,
}


def _check_int(name: str, value: object, low: int, high: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}; {fix}")


@dataclass(frozen=True)
class HintOptions:
    """Everything that shapes a hint: the image size, the resize mode and the preprocessor with its settings."""

    width: int
    height: int
    mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    preprocess: str = "none"
    low_threshold: int = 100
    high_threshold: int = 200
    processor_res: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ResizeMode.parse(self.mode))
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 8:
                raise ConfigError(
                    f"the hint {name} must be a positive multiple of 8 (the image size), got {value!r}; "
                    "use the size of the image being generated"
                )
        if self.preprocess not in PREPROCESSORS:
            raise ConfigError(
                f"unknown preprocessor {self.preprocess!r}: expected one of {', '.join(PREPROCESSORS)} "
                "(other detectors need downloaded weights: run them elsewhere and pass their map with 'none')"
            )
        for name in ("low_threshold", "high_threshold"):
            _check_int(f"the canny {name}", getattr(self, name), *THRESHOLD_RANGE, "A1111's default is 100 / 200")
        if self.low_threshold > self.high_threshold:
            raise ConfigError(
                f"the canny low threshold ({self.low_threshold}) is above the high threshold "
                f"({self.high_threshold}); give low <= high, e.g. 100 and 200"
            )
        _check_int("processor_res", self.processor_res, *PROCESSOR_RES_RANGE, "A1111's default is 512")


def load_hint_image(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Open a hint image from a file path or the file's bytes and decode it now, so a bad file fails before
    any model work; ``ControlError`` saying what was found otherwise."""
    where = "the hint image" if isinstance(source, bytes) else f"the hint image {os.fspath(source)!r}"
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except FileNotFoundError:
        raise ControlError(f"{where} does not exist; give the path of a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ControlError(f"{where} is not an image Pillow can read ({exc}); give a PNG, JPEG or WebP file") from None
    return image


def hint_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image as [H, W, 3] uint8 RGB, with A1111's alpha rule (see the module docstring)."""
    if isinstance(image, Image.Image):
        array = _pil_pixels(image)
    elif isinstance(image, np.ndarray):
        array = _array_pixels(image)
    else:
        raise ControlError(
            f"a hint image must be a PIL image or a uint8 numpy array, got {type(image).__name__}; "
            "open files with load_hint_image"
        )
    if array.shape[2] == 4:
        alpha = array[:, :, 3]
        if (alpha <= _TRANSPARENT_MAX).all() or (alpha >= _OPAQUE_MIN).all():
            array = array[:, :, :3]
        else:
            logger.info("the hint image is partly transparent: its alpha channel is the drawing (as in A1111)")
            array = np.repeat(alpha[:, :, None], 3, axis=2)
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _pil_pixels(image: Image.Image) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ControlError(f"the hint image is empty ({image.width}x{image.height} pixels); give a non-empty image")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ControlError(
            f"the hint image has {image.mode!r} pixels (16- or 32-bit); expected an 8-bit image: "
            "save it as 8-bit RGB or greyscale"
        )
    has_alpha = any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))


def _array_pixels(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ControlError(
            f"a hint array must be uint8 (0..255), got {array.dtype}; convert with (array * 255).round()"
            ".astype(np.uint8) for values in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ControlError(
            f"a hint array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {list(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ControlError(f"the hint image is empty (shape {list(array.shape)}); give a non-empty image")
    return array


def canny_edges(rgb: np.ndarray, low_threshold: int, high_threshold: int, processor_res: int) -> np.ndarray:
    """A1111's canny preprocessor: [H, W, 3] uint8 -> white-on-black edges [h, w, 3] uint8 whose shorter side
    is ``processor_res``."""
    cv2 = require("cv2", "canny preprocessing of ControlNet hints", "control")
    height, width = rgb.shape[:2]
    scale = processor_res / min(height, width)
    size = (int(np.round(width * scale)), int(np.round(height * scale)))
    resized = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    # Padding to a multiple of 64 with repeated edges, as A1111 does, keeps its edges along the borders.
    pad_h, pad_w = -size[1] % 64, -size[0] % 64
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")
    edges = cv2.Canny(padded, low_threshold, high_threshold)[: size[1], : size[0]]
    return np.repeat(edges[:, :, None], 3, axis=2)


def preprocess_hint(image: Image.Image | np.ndarray, options: HintOptions) -> np.ndarray:
    """The detected map before fitting to the image size, [h, w, 3] uint8 (what A1111's ``/controlnet/detect``
    returns)."""
    rgb = hint_pixels(image)
    if options.preprocess == "canny":
        return canny_edges(rgb, options.low_threshold, options.high_threshold, options.processor_res)
    return rgb


def fit_hint(hint: np.ndarray, width: int, height: int, mode: ResizeMode) -> np.ndarray:
    """A [h, w, 3] uint8 map fitted to width x height with a resize mode (centred crop or centred padding)."""
    if mode is ResizeMode.JUST_RESIZE:
        return resize_map(hint, width, height)
    old_h, old_w = hint.shape[:2]
    pick = min if mode is ResizeMode.RESIZE_AND_FILL else max
    scale = pick(height / old_h, width / old_w)
    scaled = resize_map(hint, int(np.round(old_w * scale)), int(np.round(old_h * scale)))
    new_h, new_w = scaled.shape[:2]
    if mode is ResizeMode.CROP_AND_RESIZE:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])
    borders = np.concatenate([hint[0], hint[-1], hint[:, 0], hint[:, -1]], axis=0)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = np.median(borders, axis=0).astype(np.uint8)
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas[top : top + new_h, left : left + new_w] = scaled[:height, :width]
    return canvas


def resize_map(hint: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a [h, w, 3] uint8 map with the filter that suits its content (see the module docstring)."""
    old_h, old_w = hint.shape[:2]
    if (old_w, old_h) == (width, height):
        return hint
    packed = (hint[:, :, 0].astype(np.uint32) << 16) | (hint[:, :, 1].astype(np.uint32) << 8) | hint[:, :, 2]
    unique = np.unique(packed)
    colours = len(unique)
    binary = colours == 2 and _is_black_and_white(unique)
    if 2 < colours < 200:
        resample = Image.Resampling.NEAREST
    elif width * height < old_w * old_h:
        resample = Image.Resampling.BOX  # area averaging, A1111's INTER_AREA for shrinking
    else:
        resample = Image.Resampling.BICUBIC
    resized = np.asarray(Image.fromarray(hint, mode="RGB").resize((width, height), resample))
    if binary:
        grey = resized.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        resized = np.repeat(otsu_binarize(grey)[:, :, None], 3, axis=2)
    return np.ascontiguousarray(resized)


def _is_black_and_white(packed_pair: np.ndarray) -> bool:
    # A1111 tests min < 16 and max > 240 over all channels, which also takes red on blue for black and white.
    colours = [[(int(packed) >> shift) & 255 for shift in (16, 8, 0)] for packed in packed_pair]
    if any(len(set(colour)) != 1 for colour in colours):
        return False
    levels = [colour[0] for colour in colours]
    return min(levels) < 16 and max(levels) > 240


def otsu_binarize(grey: np.ndarray) -> np.ndarray:
    """[H, W] uint8 -> 0 / 255 at the threshold that maximises the between-class variance (Otsu's method, the
    rule ``cv2.THRESH_OTSU`` applies)."""
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = counts.sum()
    below = np.cumsum(counts)  # pixels at or below each threshold
    below_sum = np.cumsum(counts * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        # between-class variance times total^2, per threshold
        spread = (below_sum * total - below_sum[-1] * below) ** 2 / (below * (total - below))
    threshold = int(np.argmax(np.nan_to_num(spread, nan=0.0, posinf=0.0)))
    return np.where(grey > threshold, 255, 0).astype(np.uint8)


def pixel_perfect_resolution(image_width: int, image_height: int, width: int, height: int, mode: ResizeMode) -> int:
    """A1111's "Pixel Perfect" processor_res: the shorter side of the input once scaled as the resize mode
    scales it, so preprocessing runs at the size the hint ends up."""
    pick = min if ResizeMode.parse(mode) is ResizeMode.RESIZE_AND_FILL else max
    return int(np.round(pick(height / image_height, width / image_width) * min(image_width, image_height)))


def build_hint(image: Image.Image | np.ndarray, options: HintOptions) -> torch.Tensor:
    """The ControlNet conditioning for ``image``: [1, 3, height, width] float32 RGB in [0, 1]."""
    fitted = fit_hint(preprocess_hint(image, options), options.width, options.height, options.mode)
    return torch.from_numpy(fitted.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def prepare_hint(
    image: Image.Image | np.ndarray,
    width: int,
    height: int,
    mode: ResizeMode | str | int = ResizeMode.CROP_AND_RESIZE,
    *,
    preprocess: str = "none",
    low_threshold: int = 100,
    high_threshold: int = 200,
    processor_res: int = 512,
) -> torch.Tensor:
    """The ControlNet conditioning for ``image`` at width x height: [1, 3, H, W] float32 RGB in [0, 1], what
    diffusers' ControlNet pipelines feed (no normalisation to [-1, 1]). Options are checked before any work."""
    options = HintOptions(
        width, height, ResizeMode.parse(mode), preprocess, low_threshold, high_threshold, processor_res
    )
    return build_hint(image, options)
