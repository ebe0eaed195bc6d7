"""The shapes inpainting benchmark: its cases, masks and measurements on hand-made images (a perfect repaint
scores perfectly, a wrong colour or a changed background is caught), bad settings refused before any work, and a
short run on the real shapes model: the shape repainted in the asked colour, the scene kept beyond the blur."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sdtrt.benchmarks.inpaint_shapes import (
    Case,
    blur_reach,
    make_cases,
    mask_of,
    measure,
    summarise,
    zones_of,
)
from sdtrt.shapes import data, score

SCENE = data.Scene("circle", "red", "blue", "medium", (60, 70), 28)
CASE = Case(SCENE, "yellow", 1)


def test_cases_ask_for_another_colour_of_the_same_scene():
    cases = make_cases(40)
    assert [c.prompt for c in cases] == [c.prompt for c in make_cases(40)]  # drawn from a fixed seed
    assert len({c.seed for c in cases}) == 40
    for case in cases:
        asked, scene = score.parse_caption(case.prompt), case.scene
        assert asked.colour == case.colour and case.colour not in (scene.colour, scene.background)
        assert (asked.shape, asked.background) == (scene.shape, scene.background)
        assert case.prompt.replace(case.colour, scene.colour, 1) == scene.caption


def test_zones_cover_the_shape_and_split_the_rest_at_the_blur_reach():
    mask = mask_of(SCENE, 4)
    zones = zones_of(SCENE, mask, 4)
    assert (zones.mask & zones.shape).sum() == zones.shape.sum()  # the grown mask covers the whole shape
    assert zones.mask.sum() > zones.shape.sum()
    together = zones.mask.astype(int) + zones.edge + zones.beyond
    assert (together == 1).all()  # mask, edge and beyond split the image
    assert 4 <= blur_reach(zones) <= 3 * 4  # a Gaussian of std 4 px reaches a few std past the mask
    sharp = zones_of(SCENE, mask, 0)
    assert not sharp.edge.any() and blur_reach(sharp) == 0


def test_a_perfect_repaint_scores_perfectly_and_faults_are_caught():
    zones = zones_of(SCENE, mask_of(SCENE, 4), 4)
    perfect = data.draw(replace(SCENE, colour="yellow"))
    got = measure(perfect, CASE, zones)
    assert got["colour"] == "yellow" and got["shape"] == "circle" and got["iou"] == 1.0
    assert got["outside_max"] == got["beyond_max"] == got["edge_max"] == 0
    row = summarise([got], [CASE])
    assert row["colour_accuracy"] == 1.0 and row["kept_old_colour"] == 0.0 and row["outside_psnr_db"] is None

    kept = measure(data.draw(SCENE), CASE, zones)  # the model ignored the prompt
    assert summarise([kept], [CASE])["colour_accuracy"] == 0.0 and summarise([kept], [CASE])["kept_old_colour"] == 1

    changed = np.array(perfect)
    changed[2, 2] = (0, 0, 0)  # one background pixel far from the mask
    got = measure(Image.fromarray(changed), CASE, zones)
    assert got["beyond_max"] == got["outside_max"] > 0 and got["edge_max"] == 0

    moved = data.draw(replace(SCENE, colour="yellow", centre=(70, 70)))
    got = measure(moved, CASE, zones)
    assert 0.5 < got["iou"] < 1.0 and got["beyond_max"] == 0 and got["edge_max"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fills", "original,blur"], "fills must be some of original, fill, latent-noise, latent-nothing"),
        (["--strengths", "0.5,1.5"], "strengths must be in (0, 1], got [0.5, 1.5]"),
        (["--cases", "0"], "expected cases >= 1"),
        (["--grow", "40"], "grow and blur must be 0..16 pixels, got 40 and 4"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, args, message):
    command = [sys.executable, "-m", "sdtrt.benchmarks.inpaint_shapes", "--out", str(tmp_path / "a"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "a").exists()


def test_a_short_run_repaints_the_shape_and_keeps_the_scene(tmp_path, capsys):
    # about 8 s on two idle cores (export, then 6 images of 20 steps), 32 s when they are shared
    pytest.importorskip("onnxruntime")
    from sdtrt.benchmarks.inpaint_shapes import main

    out = tmp_path / "inpaint.json"
    args = ["--out", str(tmp_path / "artifacts"), "--cases", "3", "--strengths", "0.75", "--fills", "original"]
    assert main([*args, "--no-control", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    inpaint, img2img = record["rows"]
    assert (inpaint["mode"], inpaint["fill"], img2img["mode"], img2img["fill"]) == (
        "inpaint",
        "original",
        "img2img",
        None,
    )
    # the repainted shape has the asked colour in most cases; beyond the blur's reach the scene is untouched
    assert inpaint["colour_accuracy"] >= 2 / 3 and inpaint["kept_old_colour"] == 0.0
    assert inpaint["beyond_max"] == 0 and inpaint["outside_mean"] < 1.0
    # without the mask the same prompt, strength and seed change the background too
    assert img2img["beyond_max"] > 20 and img2img["outside_mean"] > 5 * inpaint["outside_mean"]
    assert [c["results"]["inpaint 0.75 original"]["beyond_max"] for c in record["cases"]] == [0, 0, 0]
    assert record["command"].startswith("python -m sdtrt.benchmarks.inpaint_shapes") and record["summary"]["table"]
    assert "| inpaint | 0.75 | original |" in capsys.readouterr().out
