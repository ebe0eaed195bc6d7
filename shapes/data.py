"""Synthetic captioned images for the ``shapes`` model: one flat shape on a flat background, drawn from a seed.

Every image is 128x128 RGB: a circle, square or triangle in one colour, on a background of another colour, at a
random position and size, with a plain-English caption ("a small red circle on a blue background"). The same
seed draws the same images on every machine (numpy's PCG64 and PIL's rasteriser are both deterministic).

A fixed set of (shape, colour, background) combinations never appears in training (``HELD_OUT``); every colour
pair and every shape still appears in training with other partners, so the held-out prompts test whether the
model composes what it learned rather than recalls an image it saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle")
# Well separated in RGB, so a colour can be read back from pixels by the nearest palette entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
# Half-extent of the shape in pixels, by size class; the caption names "small" and "large" only.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (14, 21), "medium": (25, 33), "large": (37, 44)}
SIZE_WORDS = {"small": "small ", "medium": "", "large": "large "}
MARGIN = 4


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` is derived from it."""

    shape: str
    colour: str
    background: str
    size: str
    centre: tuple[int, int]
    radius: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        for name in (self.colour, self.background):
            if name not in PALETTE:
                raise ValueError(f"colour must be one of {COLOURS}, got {name!r}")
        if self.colour == self.background:
            raise ValueError(f"shape and background colours must differ, both are {self.colour!r}")
        if self.size not in SIZE_RANGES:
            raise ValueError(f"size must be one of {tuple(SIZE_RANGES)}, got {self.size!r}")

    @property
    def caption(self) -> str:
        return f"a {SIZE_WORDS[self.size]}{self.colour} {self.shape} on a {self.background} background"

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def _held_out() -> frozenset[tuple[str, str, str]]:
    """12 of the 90 combinations: each shape 4 times, each colour twice as shape and twice as background.

    The pairs are the palette shifted by one and by three places, so each colour pair is held out with one
    shape only and is seen in training with the other two.
    """
    n = len(COLOURS)
    pairs = [(COLOURS[i], COLOURS[(i + shift) % n]) for shift in (1, 3) for i in range(n)]
    return frozenset((SHAPES[k % len(SHAPES)], fg, bg) for k, (fg, bg) in enumerate(pairs))


HELD_OUT = _held_out()
ALL_COMBINATIONS = tuple((s, fg, bg) for s in SHAPES for fg in COLOURS for bg in COLOURS if fg != bg)
TRAIN_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c not in HELD_OUT)
HELD_OUT_COMBINATIONS = tuple(c for c in ALL_COMBINATIONS if c in HELD_OUT)


def random_scene(rng: np.random.Generator, combinations: tuple[tuple[str, str, str], ...]) -> Scene:
    """A scene with a combination drawn from ``combinations`` and a random size class, size and position."""
    shape, colour, background = combinations[int(rng.integers(len(combinations)))]
    size = tuple(SIZE_RANGES)[int(rng.integers(len(SIZE_RANGES)))]
    low, high = SIZE_RANGES[size]
    radius = int(rng.integers(low, high + 1))
    lo, hi = radius + MARGIN, IMAGE_SIZE - radius - MARGIN
    centre = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
    return Scene(shape, colour, background, size, centre, radius)


def shape_outline(shape: str, centre: tuple[int, int], radius: int) -> list[tuple[float, float]]:
    """The polygon of a square or an upright triangle inscribed in the box of half-extent ``radius``."""
    x, y, r = centre[0], centre[1], radius
    if shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    raise ValueError(f"{shape!r} has no polygon outline")


def draw(scene: Scene) -> Image.Image:
    """The 128x128 RGB image of ``scene``."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[scene.background])
    pen = ImageDraw.Draw(image)
    x, y, r = scene.centre[0], scene.centre[1], scene.radius
    if scene.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=PALETTE[scene.colour])
    else:
        pen.polygon(shape_outline(scene.shape, scene.centre, r), fill=PALETTE[scene.colour])
    return image


def to_array(image: Image.Image) -> np.ndarray:
    """uint8 HxWx3."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def scenes(seed: int, count: int, held_out: bool = False) -> Iterator[Scene]:
    """``count`` scenes from ``seed``: training combinations, or held-out ones with ``held_out=True``."""
    rng = np.random.default_rng(seed)
    pool = HELD_OUT_COMBINATIONS if held_out else TRAIN_COMBINATIONS
    for _ in range(count):
        yield random_scene(rng, pool)


def batch(seed: int, count: int, held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """``count`` images as uint8 [count, 128, 128, 3] and their scenes."""
    drawn = list(scenes(seed, count, held_out))
    return np.stack([to_array(draw(s)) for s in drawn]), drawn
