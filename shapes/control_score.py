"""Score images made with the outline ControlNet against their hints: is the shape where and as the hint says?

Per image: the generated shape's centroid against the hint shape's (within ``CENTROID_PX``), the IoU of the
generated shape's mask with the hint shape's filled mask, and the colours the caption asks for (shape colour and
background, read by ``score``). The shape word of the caption is not scored: where it contradicts the outline,
the outline is meant to win, and the IoU says whether it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import score
from .control_data import ControlExample, filled_mask

CENTROID_PX = 8.0
# What the shipped ControlNet must reach at scale 1, at fp32 and fp16.
TARGETS = {"centroid_within_8px": 0.9, "mean_iou": 0.7, "colours": 0.95}


@dataclass(frozen=True)
class ControlScore:
    """How one image follows its hint and caption."""

    centroid_distance: float  # pixels; inf when no shape was found
    iou: float
    colours: bool

    @property
    def centroid_ok(self) -> bool:
        return self.centroid_distance <= CENTROID_PX


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def score_control(image: Image.Image | np.ndarray, example: ControlExample) -> ControlScore:
    """Score one generated image against the example's hint shape and caption colours."""
    want_mask = filled_mask(example.scene.shape, example.scene.centre, example.scene.radius)
    _, got_mask = score.shape_region(image)
    if got_mask.sum() < score.MIN_AREA:
        got_mask = np.zeros_like(got_mask)
    got, want = _centroid(got_mask), _centroid(want_mask)
    distance = float("inf") if got is None or want is None else float(np.linalg.norm(got - want))
    union = np.logical_or(got_mask, want_mask).sum()
    iou = float(np.logical_and(got_mask, want_mask).sum() / union) if union else 0.0
    reading = score.read_image(image)
    colours = reading.colour == example.scene.colour and reading.background == example.scene.background
    return ControlScore(distance, iou, colours)


def control_accuracy(images: Sequence[Image.Image | np.ndarray], examples: Sequence[ControlExample]) -> dict:
    """Fractions and means over the images: ``centroid_within_8px``, ``mean_iou``, ``colours``, and the same three
    over the examples whose caption contradicts the outline (``contradicting``)."""
    if len(images) != len(examples) or not images:
        raise ValueError(f"expected as many images as examples (at least one), got {len(images)} and {len(examples)}")
    scores = [score_control(image, example) for image, example in zip(images, examples, strict=True)]
    result = _summary(scores)
    contradicting = [s for s, e in zip(scores, examples, strict=True) if e.contradicts]
    if contradicting:
        result["contradicting"] = {"count": len(contradicting), **_summary(contradicting)}
    return result


def _summary(scores: Sequence[ControlScore]) -> dict[str, float]:
    finite = [s.centroid_distance for s in scores if np.isfinite(s.centroid_distance)]
    return {
        "centroid_within_8px": float(np.mean([s.centroid_ok for s in scores])),
        "mean_iou": float(np.mean([s.iou for s in scores])),
        "colours": float(np.mean([s.colours for s in scores])),
        "median_centroid_px": float(np.median(finite)) if finite else float("inf"),
    }


def meets_targets(accuracy: dict) -> dict[str, bool]:
    """Per target in ``TARGETS``: is it reached?"""
    return {name: accuracy[name] >= goal for name, goal in TARGETS.items()}
