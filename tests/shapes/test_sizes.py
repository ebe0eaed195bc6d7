"""The shapes model was trained at 128x128 only: its default profile is 128..128, other sizes are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600)


def test_shapes_exports_at_128_only_and_refuses_256_before_denoising(tmp_path):
    out = tmp_path / "artifacts"
    parts = ("--precision", "fp32", "--components", "text_encoder,unet,vae_decoder")
    result = run("export", "shapes", "--out", str(out), *parts)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    profile = json.loads((out / "manifest.json").read_text())["profile"]
    assert {profile[f"{end}_{side}"] for end in ("min", "opt", "max") for side in ("height", "width")} == {128}
    image = tmp_path / "big.png"
    result = run("generate", str(out), "a red circle on a blue background", "--size", "256", "--out", str(image))
    assert result.returncode == 1 and not image.exists()
    assert "at 256x256 is outside this artifact's profile: width 128..128, height 128..128" in result.stderr
    assert "denoising" not in result.stderr and "Traceback" not in result.stderr


def test_asking_shapes_for_other_sizes_warns_at_export(tmp_path):
    out = tmp_path / "wide"
    args = ("--precision", "fp32", "--components", "vae_decoder", "--min-size", "64", "--max-size", "256")
    result = run("export", "shapes", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert "warning: this model was trained at 128x128; the profile allows 64x64 to 256x256" in result.stderr
