"""The shipped outline ControlNet in an exported shapes artifact: the shape goes where the hint says, through the
CLI and the Python pipeline, and not at scale 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.shapes import control_data, data
from sdtrt.shapes.control_score import score_control
from sdtrt.shapes.evaluate_control import pipeline_control_generator

pytestmark = pytest.mark.slow  # one export and seven images: 35 s on 2 idle cores, 80 s on busy ones
SDTRT = str(Path(sys.executable).with_name("sdtrt"))
# Hints away from where the prompt alone puts the shape, at a held-out size and position.
CASES = [
    control_data.ControlExample(data.Scene("square", "red", "blue", "medium", (36, 40), 23), ""),
    control_data.ControlExample(data.Scene("circle", "yellow", "purple", "medium", (92, 90), 22), ""),
    control_data.ControlExample(data.Scene("triangle", "green", "white", "medium", (88, 36), 24), ""),
]
PROMPTS = [
    "a red square on a blue background",
    "a yellow triangle on a purple background",
    "a green triangle on a white background",
]


@pytest.fixture(scope="module")
def outline_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes-outline") / "artifact"
    # The shipped name: its folder, named "outline" in the artifact.
    done = subprocess.run(
        [SDTRT, "export", "shapes", "--out", str(out), "--controlnet", "shapes-outline"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_generate_cli_draws_the_shape_where_the_hint_says(outline_artifact: Path, tmp_path: Path):
    example = CASES[0]
    hint, image = tmp_path / "hint.png", tmp_path / "image.png"
    x, y = example.scene.centre
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtrt.shapes.hint",
            "--shape",
            "square",
            "--centre",
            f"{x},{y}",
            "--radius",
            str(example.scene.radius),
            "--out",
            str(hint),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    done = subprocess.run(
        [
            SDTRT,
            "generate",
            str(outline_artifact),
            PROMPTS[0],
            "--control",
            f"outline:{hint}",
            "--steps",
            "20",
            "--cfg",
            "2",
            "--seed",
            "1",
            "--out",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    got = score_control(Image.open(image), example)
    assert got.centroid_ok and got.iou > 0.6 and got.colours


def test_the_control_places_the_shape_and_scale_zero_does_not(outline_artifact: Path):
    from sdtrt.runtime.pipeline import Pipeline

    hints = [control_data.hint_of(e.scene) for e in CASES]
    seeds = list(range(len(CASES)))
    with Pipeline.from_artifacts(outline_artifact, backend="onnxruntime") as pipe:
        assert pipe.controlnets == ["outline"]
        generate = pipeline_control_generator(pipe)
        on = [score_control(i, e) for i, e in zip(generate(PROMPTS, hints, seeds, 1.0), CASES, strict=True)]
        off = [score_control(i, e) for i, e in zip(generate(PROMPTS, hints, seeds, 0.0), CASES, strict=True)]
    assert all(s.centroid_ok and s.iou > 0.6 and s.colours for s in on), on
    # The outline wins over the prompt's shape word (cases 2: circle outline, "triangle" prompt).
    assert on[1].iou > 0.6
    assert np.mean([s.iou for s in off]) < 0.4 and sum(s.centroid_ok for s in off) <= 1, off
