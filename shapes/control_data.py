"""(prompt, hint, image) triples for the ``shapes`` outline ControlNet, drawn from a seed.

The hint is the shape's outline as a user gets it: canny edges (``--control-preprocess canny``'s detector, at
A1111's default thresholds) of the shape drawn in white on black, 128x128 RGB, white edges on black. The image is
the ``shapes`` image of that outline in the caption's colours. In a share of the training examples the caption
names another shape than the outline (the outline wins: the image follows the hint), and in another share the
caption is empty (for classifier-free guidance).

Positions and sizes are split: training never draws a half-extent in ``HELD_OUT_RADII`` (between "small" and
"medium") nor a centre in a held-out cell (``held_out_centre``: a quarter of the 16x16-pixel cells, spread over the
image), and the evaluation pairs (``eval_examples``) use only those, so they test hints at positions and sizes the
training never used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import data

HINT_LOW, HINT_HIGH = 100, 200  # A1111's default canny thresholds
HELD_OUT_RADII = (22, 23, 24)
CELL = 16  # pixels per side of a position cell
# Captions whose shape word contradicts the outline, and empty captions, in training.
CONTRADICTING = 0.25
CAPTION_DROPOUT = 0.1
EVAL_SEED = 4242  # draws the evaluation pairs


@dataclass(frozen=True)
class ControlExample:
    """One (prompt, hint, image) example: ``scene`` is what the image shows (the hint's shape, position and size,
    the caption's colours); ``caption`` may name another shape, or be empty."""

    scene: data.Scene
    caption: str

    @property
    def contradicts(self) -> bool:
        """Whether the caption names a shape other than the outline's."""
        words = self.caption.split()
        return any(w in data.SHAPES and w != self.scene.shape for w in words)


def held_out_centre(centre: tuple[int, int]) -> bool:
    """Whether a centre lies in a cell the training never uses: a quarter of the cells, in a diagonal pattern."""
    cx, cy = centre[0] // CELL, centre[1] // CELL
    return (cx + 2 * cy) % 4 == 0


def filled_mask(shape: str, centre: tuple[int, int], radius: int) -> np.ndarray:
    """Boolean [128, 128] mask of the filled shape, rasterised as ``data.draw`` does."""
    canvas = Image.new("L", (data.IMAGE_SIZE, data.IMAGE_SIZE), 0)
    pen = ImageDraw.Draw(canvas)
    x, y, r = centre[0], centre[1], radius
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        pen.polygon(data.shape_outline(shape, centre, r), fill=255)
    return np.asarray(canvas) > 127


def outline_hint(shape: str, centre: tuple[int, int], radius: int) -> np.ndarray:
    """The hint of a shape: canny edges of it drawn white on black, uint8 [128, 128, 3], white on black."""
    from sdtrt.runtime.control.hint import canny_edges

    drawn = np.repeat(filled_mask(shape, centre, radius)[:, :, None].astype(np.uint8) * 255, 3, axis=2)
    return canny_edges(drawn, HINT_LOW, HINT_HIGH, data.IMAGE_SIZE)


def hint_of(scene: data.Scene) -> np.ndarray:
    """The outline hint of ``scene``'s shape."""
    return outline_hint(scene.shape, scene.centre, scene.radius)


def _centre(rng: np.random.Generator, radius: int, held_out: bool) -> tuple[int, int]:
    lo, hi = radius + data.MARGIN, data.IMAGE_SIZE - radius - data.MARGIN
    while True:
        centre = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
        if held_out_centre(centre) == held_out:
            return centre


def _caption(scene: data.Scene, shape_word: str, size_word: str) -> str:
    return f"a {size_word}{scene.colour} {shape_word} on a {scene.background} background"


def _other_shape(rng: np.random.Generator, shape: str) -> str:
    others = [s for s in data.SHAPES if s != shape]
    return others[int(rng.integers(len(others)))]


def training_examples(seed: int, count: int) -> Iterator[ControlExample]:
    """``count`` training examples from ``seed``: training colour combinations, sizes and positions only."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        base = data.random_scene(rng, data.TRAIN_COMBINATIONS)
        scene = data.Scene(
            base.shape, base.colour, base.background, base.size, _centre(rng, base.radius, False), base.radius
        )
        draw = rng.random()
        if draw < CAPTION_DROPOUT:
            caption = ""
        elif draw < CAPTION_DROPOUT + CONTRADICTING:
            caption = _caption(scene, _other_shape(rng, scene.shape), data.SIZE_WORDS[scene.size])
        else:
            caption = scene.caption
        yield ControlExample(scene, caption)


def eval_examples(count: int, seed: int = EVAL_SEED) -> list[ControlExample]:
    """``count`` evaluation pairs: every colour combination, a held-out size and a held-out centre each; a third
    of the captions name another shape than the outline. The caption names no size (the hint gives it)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        shape, colour, background = data.ALL_COMBINATIONS[int(rng.integers(len(data.ALL_COMBINATIONS)))]
        radius = HELD_OUT_RADII[int(rng.integers(len(HELD_OUT_RADII)))]
        scene = data.Scene(shape, colour, background, "medium", _centre(rng, radius, True), radius)
        word = _other_shape(rng, shape) if i % 3 == 2 else shape
        out.append(ControlExample(scene, _caption(scene, word, "")))
    return out


def training_arrays(seed: int, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, 128, 128, 3], hints uint8 [N, 128, 128] (one channel), captions) of the training set."""
    examples = list(training_examples(seed, count))
    images = np.stack([data.to_array(data.draw(e.scene)) for e in examples])
    hints = np.stack([hint_of(e.scene)[:, :, 0] for e in examples])
    return images, hints, [e.caption for e in examples]
