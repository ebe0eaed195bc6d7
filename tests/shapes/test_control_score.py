"""The outline scorer on images drawn by hand: a perfect image scores 1, a shifted or missing shape fails."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtrt.shapes import control_data, control_score, data


def _examples() -> list[control_data.ControlExample]:
    return control_data.eval_examples(6)


def test_the_drawn_scene_scores_perfectly():
    examples = _examples()
    images = [data.draw(e.scene) for e in examples]
    result = control_score.control_accuracy(images, examples)
    assert result["centroid_within_8px"] == 1.0 and result["colours"] == 1.0
    assert result["mean_iou"] == pytest.approx(1.0)
    assert result["contradicting"]["count"] == 2 and result["contradicting"]["mean_iou"] == pytest.approx(1.0)
    assert all(control_score.meets_targets(result).values())


def test_a_shifted_shape_fails_the_centroid_and_loses_iou():
    for example in _examples():
        scene = example.scene
        # Towards the middle, so the moved shape stays whole.
        dx, dy = (10 if scene.centre[0] < 64 else -10), (3 if scene.centre[1] < 64 else -3)
        moved = data.Scene(
            scene.shape,
            scene.colour,
            scene.background,
            scene.size,
            (scene.centre[0] + dx, scene.centre[1] + dy),
            scene.radius,
        )
        got = control_score.score_control(data.draw(moved), example)
        assert not got.centroid_ok and got.centroid_distance == pytest.approx(np.hypot(10, 3), abs=0.5)
        assert got.iou < 0.75 and got.colours


def test_the_caption_shape_instead_of_the_outline_loses_iou():
    example = next(e for e in _examples() if e.contradicts)
    word = next(w for w in example.caption.split() if w in data.SHAPES)
    s = example.scene
    obeyed_caption = data.Scene(word, s.colour, s.background, s.size, s.centre, s.radius)
    assert control_score.score_control(data.draw(obeyed_caption), example).iou < 0.8


def test_wrong_colours_and_no_shape():
    example = _examples()[0]
    s = example.scene
    other = next(c for c in data.COLOURS if c not in (s.colour, s.background))
    recoloured = data.Scene(s.shape, other, s.background, s.size, s.centre, s.radius)
    assert not control_score.score_control(data.draw(recoloured), example).colours
    blank = Image.new("RGB", (128, 128), data.PALETTE[s.background])
    got = control_score.score_control(blank, example)
    assert got.iou == 0.0 and not got.centroid_ok
    result = control_score.control_accuracy([blank], [example])
    assert result["centroid_within_8px"] == 0.0 and not control_score.meets_targets(result)["mean_iou"]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="expected as many images as examples"):
        control_score.control_accuracy([], _examples())
