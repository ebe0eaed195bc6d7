"""Read a ``shapes`` image back from its pixels and score it against its caption.

The images are synthetic, so what they show can be measured: the background colour is the median of the border
pixels; the shape is the largest connected region that differs from the background; its colour is the median
of that region; its class follows from how much of its bounding box it fills (square 1.0, circle pi/4,
triangle 1/2); its size class from its half-extent. Colours are named by the nearest palette entry.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import COLOURS, PALETTE, SHAPES, SIZE_RANGES

BORDER = 4
# Half the smallest distance between two palette colours (red-purple, 162): a pixel further than this from the
# background colour belongs to the shape.
_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)
_GAPS = np.linalg.norm(_PALETTE_RGB[:, None] - _PALETTE_RGB[None], axis=-1)
SHAPE_THRESHOLD = float(_GAPS[_GAPS > 0].min() / 2)
MIN_AREA = 40  # pixels; a smaller region is noise, not a shape (the smallest drawn shape covers about 300)
# Fill ratio of the bounding box: triangle 0.5, circle 0.785, square 1.0; the cuts sit between them.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.64, 0.89
_SMALL_MAX = (SIZE_RANGES["small"][1] + SIZE_RANGES["medium"][0]) / 2
_LARGE_MIN = (SIZE_RANGES["medium"][1] + SIZE_RANGES["large"][0]) / 2
_CAPTION = re.compile(
    rf"^a (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(COLOURS)}) background$"
)
ASPECTS = ("background", "colour", "shape", "size")


@dataclass(frozen=True)
class Reading:
    """What an image shows, as read from its pixels; ``shape`` is "none" when no region stands out."""

    background: str
    colour: str
    shape: str
    size: str
    area: int
    fill: float


@dataclass(frozen=True)
class Expected:
    """What a caption asks for."""

    background: str
    colour: str
    shape: str
    size: str  # "medium" when the caption names no size


def parse_caption(caption: str) -> Expected:
    """The content a ``shapes`` caption asks for; a caption outside the model's grammar is an error."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"expected a caption like 'a [small|large] <colour> <shape> on a <colour> background' with colours "
            f"{', '.join(COLOURS)} and shapes {', '.join(SHAPES)}; got {caption!r}"
        )
    size, colour, shape, background = match.groups()
    return Expected(background=background, colour=colour, shape=shape, size=size or "medium")


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name closest to ``rgb`` (0-255) in RGB distance."""
    return COLOURS[int(np.argmin(np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float64), axis=1)))]


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected region of ``mask``."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def shape_region(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background RGB, boolean mask of the shape): the largest region that differs from the border's colour."""
    pixels = _pixels(image)
    frame = np.concatenate(
        [
            pixels[:BORDER].reshape(-1, 3),
            pixels[-BORDER:].reshape(-1, 3),
            pixels[:, :BORDER].reshape(-1, 3),
            pixels[:, -BORDER:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(frame, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > SHAPE_THRESHOLD
    return background_rgb, _largest_region(mask)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) <= 4 * BORDER:
        raise ValueError(f"expected an RGB image larger than {4 * BORDER}x{4 * BORDER}, got shape {pixels.shape}")
    return pixels


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """What ``image`` (PIL or uint8 HxWx3) shows."""
    pixels = _pixels(image)
    background_rgb, region = shape_region(pixels)
    area = int(region.sum())
    background = nearest_colour(background_rgb)
    if area < MIN_AREA:
        return Reading(background, "none", "none", "none", area, 0.0)
    ys, xs = np.nonzero(region)
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = area / float(box_h * box_w)
    shape = "triangle" if fill < TRIANGLE_BELOW else "square" if fill > SQUARE_ABOVE else "circle"
    half = max(box_h, box_w) / 2
    size = "small" if half < _SMALL_MAX else "large" if half > _LARGE_MIN else "medium"
    colour = nearest_colour(np.median(pixels[region], axis=0))
    return Reading(background, colour, shape, size, area, round(fill, 4))


def score(image: Image.Image | np.ndarray, caption: str) -> dict[str, bool]:
    """Per aspect (background, colour, shape, size): does the image show what the caption asks for?"""
    want, got = parse_caption(caption), read_image(image)
    return {aspect: getattr(got, aspect) == getattr(want, aspect) for aspect in ASPECTS}


def accuracy(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Fraction of images right per aspect, and ``all`` for background, colour and shape right together."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"expected as many images as captions (at least one), got {len(images)} and {len(captions)}")
    scores = [score(image, caption) for image, caption in zip(images, captions, strict=True)]
    result = {aspect: float(np.mean([s[aspect] for s in scores])) for aspect in ASPECTS}
    result["all"] = float(np.mean([s["background"] and s["colour"] and s["shape"] for s in scores]))
    return result
