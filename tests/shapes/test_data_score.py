"""The shapes data and the scorer that reads images back: known content, wrong captions, damaged images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtrt.shapes import data, score


def test_held_out_combinations_are_never_drawn_for_training():
    assert len(data.HELD_OUT) == 12 and len(data.TRAIN_COMBINATIONS) == 78
    drawn = {s.combination for s in data.scenes(0, 3000)}
    assert drawn == set(data.TRAIN_COMBINATIONS)
    assert {s.combination for s in data.scenes(0, 500, held_out=True)} == set(data.HELD_OUT)


def test_every_colour_and_shape_is_still_seen_in_training():
    train = data.TRAIN_COMBINATIONS
    for shape, fg, bg in data.HELD_OUT:
        assert any(c[0] == shape for c in train)
        assert any(c[1:] == (fg, bg) for c in train), "the colour pair is seen with another shape"


def test_same_seed_draws_the_same_images():
    a, scenes_a = data.batch(3, 6)
    b, scenes_b = data.batch(3, 6)
    c, _ = data.batch(4, 6)
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_scene_rejects_bad_content():
    with pytest.raises(ValueError, match="colours must differ"):
        data.Scene("circle", "red", "red", "small", (64, 64), 20)
    with pytest.raises(ValueError, match="shape must be one of"):
        data.Scene("star", "red", "blue", "small", (64, 64), 20)


@pytest.mark.parametrize("combination", data.ALL_COMBINATIONS)
def test_scorer_reads_every_drawn_combination(combination):
    shape, fg, bg = combination
    for size, (low, high) in data.SIZE_RANGES.items():
        for radius in (low, high):
            scene = data.Scene(shape, fg, bg, size, (radius + 5, data.IMAGE_SIZE - radius - 5), radius)
            assert score.score(data.draw(scene), scene.caption) == dict.fromkeys(score.ASPECTS, True)


def test_scorer_is_right_on_random_scenes_even_blurred_and_noisy():
    images, scenes = data.batch(11, 200)
    rng = np.random.default_rng(0)
    damaged = []
    for image in images:
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        damaged.append(np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8))
    acc = score.accuracy(damaged, [s.caption for s in scenes])
    assert acc["background"] == 1.0 and acc["colour"] == 1.0
    assert acc["shape"] >= 0.97 and acc["size"] >= 0.95


def test_scorer_catches_each_wrong_aspect():
    image = data.draw(data.Scene("circle", "red", "blue", "large", (60, 60), 40))
    assert score.score(image, "a large red circle on a blue background") == dict.fromkeys(score.ASPECTS, True)
    assert not score.score(image, "a large red square on a blue background")["shape"]
    assert not score.score(image, "a large red triangle on a blue background")["shape"]
    assert not score.score(image, "a large green circle on a blue background")["colour"]
    assert not score.score(image, "a large red circle on a white background")["background"]
    assert not score.score(image, "a small red circle on a blue background")["size"]
    swapped = score.score(image, "a large blue circle on a red background")
    assert not swapped["colour"] and not swapped["background"] and swapped["shape"]


def test_an_empty_or_noise_image_shows_no_shape():
    plain = Image.new("RGB", (128, 128), data.PALETTE["green"])
    assert score.read_image(plain).shape == "none"
    assert not score.score(plain, "a red circle on a green background")["shape"]
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    result = score.score(noise, "a red circle on a green background")
    assert not all(result.values())


def test_accuracy_counts_images_and_rejects_mismatched_lists():
    right = data.draw(data.Scene("square", "yellow", "purple", "medium", (64, 64), 30))
    wrong = data.draw(data.Scene("triangle", "yellow", "purple", "medium", (64, 64), 30))
    caption = "a yellow square on a purple background"
    acc = score.accuracy([right, wrong], [caption, caption])
    assert acc["shape"] == 0.5 and acc["background"] == 1.0 and acc["all"] == 0.5
    with pytest.raises(ValueError, match="as many images as captions"):
        score.accuracy([right], [caption, caption])


def test_captions_outside_the_grammar_are_refused():
    assert score.parse_caption("a small red circle on a blue background").size == "small"
    assert score.parse_caption("a red circle on a blue background").size == "medium"
    with pytest.raises(ValueError, match="expected a caption like"):
        score.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="expected a caption like"):
        score.parse_caption("a pink circle on a blue background")


def test_the_quality_report_of_a_shapes_unet_asks_for_distinct_prompts():
    from sdtrt.shapes.evaluate import prompts
    from sdtrt.shapes.report import quality_config

    assert len(set(prompts(4))) < 4  # the evaluation's own draw repeats a caption this early
    config = quality_config(4)
    assert len(set(config.held_out[:4])) == 4
    assert len(config.held_out) == len(set(config.held_out)) == len(data.HELD_OUT) * len(data.SIZE_RANGES)
