"""`sdtrt export` / `check` / `generate` on the shapes model as a user runs them: trained at 128x128 only, its
default profile is 128..128 and other sizes are refused; a check reports progress and prints nothing extra when
stderr is not a terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
