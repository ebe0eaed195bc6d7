"""`sdtrt export` / `check` / `generate` on the shapes model as a user runs them: trained at 128x128 only, its
default profile is 128..128 and other sizes are refused; a check reports progress and prints nothing extra when
stderr is not a terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shapes_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "artifacts"
    parts = ("--precision", "fp32", "--components", "text_encoder,unet,vae_decoder")
    result = run("export", "shapes", "--out", str(out), *parts)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    return out


def test_shapes_exports_at_128_only_and_refuses_256_before_denoising(shapes_artifact, tmp_path):
    profile = json.loads((shapes_artifact / "manifest.json").read_text())["profile"]
    assert {profile[f"{end}_{side}"] for end in ("min", "opt", "max") for side in ("height", "width")} == {128}
    image = tmp_path / "big.png"
    args = ("a red circle on a blue background", "--size", "256", "--out", str(image))
    result = run("generate", str(shapes_artifact), *args)
    assert result.returncode == 1 and not image.exists()
    assert "at 256x256 is outside this artifact's profile: width 128..128, height 128..128" in result.stderr
    assert "denoising" not in result.stderr and "Traceback" not in result.stderr


def test_asking_shapes_for_other_sizes_warns_at_export(tmp_path):
    out = tmp_path / "wide"
    args = ("--precision", "fp32", "--components", "vae_decoder", "--min-size", "64", "--max-size", "256")
    result = run("export", "shapes", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert "warning: this model was trained at 128x128; the profile allows 64x64 to 256x256" in result.stderr


def test_adherence_report_calls_progress_with_increasing_counts(shapes_artifact):
    from sdtrt.shapes.evaluate import ARTIFACT_PHASE, REFERENCE_PHASE
    from sdtrt.shapes.report import adherence_report

    calls: list[tuple[str, int, int]] = []
    adherence_report(shapes_artifact, prompts=2, steps=3, progress=lambda *call: calls.append(call))
    assert calls == [(ARTIFACT_PHASE, k, 2) for k in range(3)] + [(REFERENCE_PHASE, k, 3) for k in range(4)]


def test_check_prints_nothing_extra_on_stderr_when_it_is_not_a_terminal(shapes_artifact):
    result = run("check", str(shapes_artifact), "--prompts", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prompt adherence passed" in result.stdout
    assert result.stderr == ""  # no progress line, no transformers "requires torchvision" notice


PREVIEW_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square on a green background",
    "a small white triangle on a purple background",
    "a green circle on a red background",
    "a purple square on a white background",
    "a blue triangle on a yellow background",
)


def _mean_colour_error(preview, image) -> float:
    """Mean absolute difference (of 255) between the average colours of a preview and of the decoded image."""
    colours = [np.asarray(picture, np.float32).mean((0, 1)) for picture in (preview, image)]
    return float(np.abs(colours[0] - colours[1]).mean())


def test_previews_use_the_map_fitted_to_this_vae_and_match_the_image_colours(shapes_artifact):
    from sdtrt.runtime.images import latent_rgb_map, latents_to_rgb
    from sdtrt.runtime.pipeline import Pipeline

    fitted, fixed, last = [], [], {}

    def keep(step, total, latents):
        last["latents"] = latents.clone()

    with Pipeline.from_artifacts(shapes_artifact, backend="onnxruntime", device="cpu") as pipe:
        rgb_map = latent_rgb_map(pipe.manifest)
        assert rgb_map is not None and rgb_map.shape == (5, 3)  # 4 channels and the bias
        for k, prompt in enumerate(PREVIEW_PROMPTS):
            result = pipe(prompt, seed=10 + k, callback=keep)
            image = result.images[0]
            fitted.append(_mean_colour_error(latents_to_rgb(last["latents"], rgb_map)[0], image))
            fixed.append(_mean_colour_error(latents_to_rgb(last["latents"])[0], image))
    print("mean colour error of the previews, fitted map", np.round(fitted, 1), "SD factors", np.round(fixed, 1))
    assert np.mean(fitted) < 40 and np.mean(fixed) > 1.5 * np.mean(fitted), (fitted, fixed)


def test_cli_previews_show_the_image_colours(shapes_artifact, tmp_path):
    from PIL import Image

    out, previews = tmp_path / "x.png", tmp_path / "previews"
    args = (PREVIEW_PROMPTS[0], "--seed", "10", "--steps", "20", "--out", str(out), "--preview-dir", str(previews))
    result = run("generate", str(shapes_artifact), *args)
    assert result.returncode == 0, result.stderr
    assert _mean_colour_error(Image.open(previews / "step-020-0.png"), Image.open(out)) < 30  # SD's factors: 40
