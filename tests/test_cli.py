"""The real `sdtrt` command, run as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("export", "check"):
        assert command in result.stdout


def test_export_then_check(tmp_path):
    out = tmp_path / "A"
    result = run("export", "tiny", "--out", str(out), "--precision", "fp32", "--max-size", "128")
    assert result.returncode == 0, result.stderr
    assert "exported preset tiny" in result.stdout and "unet.onnx" in result.stdout
    assert "[2/5] exporting unet (fp32)" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile_id"] == "b1-1-4_h64-128-128_w64-128-128_t3"  # 3 prompt windows by default
    report = tmp_path / "check.json"
    result = run("check", str(out), "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 16 checks passed" in result.stdout
    rows = json.loads(report.read_text())
    assert len(rows) == 12 and all(r["passed"] and r["rel_l2"] < 1e-4 for r in rows)


def test_check_fails_with_exit_code_on_a_wrong_graph(tmp_path):
    """A graph exported from other weights than its manifest names: check must notice and exit 1."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.profile import ShapeProfile

    out = tmp_path / "B"
    options = ExportOptions(profile=ShapeProfile.square(64, 64, 128), components=("vae_decoder",))
    export_artifacts(load_preset("tiny", seed=1), out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"]["seed"] = 0  # claims to come from the seed-0 model: its numbers will not match
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run("check", str(out))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "checks failed" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("export", "sd99", "--out", "X"), "unknown preset 'sd99'"),
        (("export", "tiny", "--out", "X", "--min-size", "60"), "multiple of 8 pixels, got 60; use 64"),
        (("export", "tiny", "--out", "X", "--min-size", "big"), "expected N or WIDTHxHEIGHT"),
        (("check", "no-such-folder"), "does not exist; run `sdtrt export`"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 1  # usage errors too: one line and exit 1, as every user error
    assert message in result.stderr.splitlines()[-1] and result.stderr.count("error: ") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "X").exists()


def test_pickle_checkpoint_is_refused(tmp_path):
    import torch

    fake = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, fake)
    result = run("export", str(fake), "--out", str(tmp_path / "X"))
    assert result.returncode == 1
    assert "pickle" in result.stderr and "--allow-pickle" in result.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_generate_writes_png_with_a1111_parameters(tmp_path, tiny_fp32, backend):
    from PIL import Image

    out = tmp_path / "img.png"
    previews = tmp_path / "previews"
    result = run(
        "generate",
        str(tiny_fp32),
        "a photo of a cat",
        "--negative",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "42",
        "--size",
        "96x64",
        "--scheduler",
        "dpmpp_2m",
        "--backend",
        backend,
        "--out",
        str(out),
        "--preview-dir",
        str(previews),
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (seed 42)" in result.stdout
    image = Image.open(out)
    assert image.size == (96, 64)
    text = image.text["parameters"]
    assert text.startswith("a photo of a cat\nNegative prompt: blurry\n")
    assert "Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 96x64, Model hash: " in text
    assert ", Model: tiny" in text and "Model: artifacts" not in text  # the model, not its folder's name
    assert len(list(previews.glob("step-*.png"))) == 3


def test_generate_img2img_and_batch(tmp_path, tiny_fp32):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    result = run(
        "generate",
        str(tiny_fp32),
        "a red square",
        "--steps",
        "4",
        "--seed",
        "1",
        "--size",
        "64x64",
        "--init-image",
        str(init),
        "--strength",
        "0.5",
        "--num-images",
        "2",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x-0.png").exists() and (tmp_path / "x-1.png").exists()
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "x-1.png").text["parameters"]
    bad = run("generate", str(tiny_fp32), "x", "--size", "100x64", "--out", str(tmp_path / "y.png"))
    assert bad.returncode == 1 and "multiple of 8 pixels" in bad.stderr and not (tmp_path / "y.png").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, tiny_fp32):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("generate", str(tiny_fp32), "x", "--steps", "1", "--out", str(blocker / "img.png"))
    assert result.returncode == 1 and "cannot write the image" in result.stderr
    assert "Traceback" not in result.stderr
    result = run(
        "generate",
        str(tiny_fp32),
        "x",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "ok.png"),
        "--preview-dir",
        str(blocker / "p"),
    )
    assert result.returncode == 1 and "cannot write previews" in result.stderr
    assert not (tmp_path / "ok.png").exists()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = run("generate", str(tiny_fp32), "x", "--init-image", str(bad), "--out", str(tmp_path / "ok.png"))
    assert result.returncode == 1 and "is not an image Pillow can read" in result.stderr
