"""The outline ControlNet's data: drawn from a seed, hints like canny gives, held-out sizes and positions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image, ImageFilter

from sdtrt.runtime.control.hint import prepare_hint
from sdtrt.shapes import control_data, data


def _uint8(hint) -> np.ndarray:
    return (hint[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_same_seed_draws_the_same_examples():
    a = control_data.training_arrays(5, 40)
    b = control_data.training_arrays(5, 40)
    c = control_data.training_arrays(6, 40)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True)) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert control_data.eval_examples(30) == control_data.eval_examples(30)


def test_training_never_uses_the_held_out_sizes_and_positions():
    train = list(control_data.training_examples(0, 3000))
    assert not any(e.scene.radius in control_data.HELD_OUT_RADII for e in train)
    assert not any(control_data.held_out_centre(e.scene.centre) for e in train)
    held = control_data.eval_examples(100)
    assert all(e.scene.radius in control_data.HELD_OUT_RADII for e in held)
    assert all(control_data.held_out_centre(e.scene.centre) for e in held)
    # The held-out cells are spread over the image, not one corner.
    xs = [e.scene.centre[0] for e in held]
    ys = [e.scene.centre[1] for e in held]
    assert min(xs) < 48 < 80 < max(xs) and min(ys) < 48 < 80 < max(ys)


def test_captions_contradict_and_drop_out_in_the_stated_shares():
    train = list(control_data.training_examples(1, 4000))
    empty = np.mean([e.caption == "" for e in train])
    contradicting = np.mean([e.contradicts for e in train])
    assert abs(empty - control_data.CAPTION_DROPOUT) < 0.02
    assert abs(contradicting - control_data.CONTRADICTING) < 0.03
    held = control_data.eval_examples(100)
    assert 30 <= sum(e.contradicts for e in held) <= 34
    # Every shape is drawn, and the image shows the outline's shape whatever the caption says.
    assert {e.scene.shape for e in held if e.contradicts} == set(data.SHAPES)


def test_the_hint_is_what_canny_gives_for_a_drawn_shape():
    scene = data.Scene("triangle", "red", "blue", "medium", (50, 70), 28)
    hint = control_data.hint_of(scene)
    assert hint.shape == (128, 128, 3) and hint.dtype == np.uint8
    assert set(np.unique(hint)) == {0, 255}
    # A user draws the shape (here in the image's own colours) and runs the canny preprocessor: the same edges at
    # processor_res 128, nearly the same at the default 512 (detected larger, shrunk back to the image size).
    drawn = data.draw(scene)
    at_128 = prepare_hint(drawn, 128, 128, "just_resize", preprocess="canny", processor_res=128)
    assert np.array_equal(_uint8(at_128), hint)
    at_512 = _uint8(prepare_hint(drawn, 128, 128, "just_resize", preprocess="canny"))[:, :, 0] > 0
    near = np.asarray(Image.fromarray(hint[:, :, 0]).filter(ImageFilter.MaxFilter(3))) > 0
    assert near[at_512].mean() > 0.95 and abs(int(at_512.sum()) - int((hint[:, :, 0] > 0).sum())) < 30
    # The edges lie on the outline: inside the dilated filled mask, and not in its interior.
    mask = control_data.filled_mask("triangle", (50, 70), 28)
    ys, xs = np.nonzero(hint[:, :, 0])
    assert mask[ys, xs].mean() > 0.4 and len(ys) > 100


def test_hint_command_writes_the_outline(tmp_path):
    out = tmp_path / "hint.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtrt.shapes.hint",
            "--shape",
            "square",
            "--centre",
            "40,80",
            "--radius",
            "24",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(out)), control_data.outline_hint("square", (40, 80), 24))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtrt.shapes.hint",
            "--shape",
            "square",
            "--centre",
            "10,80",
            "--radius",
            "24",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "expected a shape inside the 128x128 image" in bad.stderr


def test_training_is_reproducible_from_its_seed(tmp_path):
    """Two short runs with the same settings write byte-identical weights; another seed does not."""
    from sdtrt.shapes.train_control import ControlTrainSettings, train

    small = {"steps": 2, "batch": 2, "examples": 6, "warmup": 1}
    records = [
        train(tmp_path / name, ControlTrainSettings(seed=seed, **small))
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    ]
    assert records[0]["sha256"] == records[1]["sha256"] != records[2]["sha256"]
    assert (tmp_path / "a" / "shapes-outline" / "config.json").read_bytes() == (
        tmp_path / "b" / "shapes-outline" / "config.json"
    ).read_bytes()
