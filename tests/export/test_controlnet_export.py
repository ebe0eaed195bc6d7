"""ControlNets through the real `sdtrt` command: export with a model, add to an artifact, generate, refuse.

Adding a ControlNet leaves every other file of the artifact byte for byte; an original-layout single file gives
the image its diffusers folder gives; each bad input is one line on stderr, exit 1, before any work, with the
artifact unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.models.controlnet import controlnet_from_unet, save_original_controlnet
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.pipeline import Pipeline

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
SIZE = "64x64"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_controlnets) -> Path:
    """A folder with an fp32 tiny artifact exported with `edges` by the CLI, the fixture ControlNet folders, the
    `depth` ControlNet as an original-layout single file, and a hint image."""
    root = tmp_path_factory.mktemp("cli-control")
    for name, (folder, _model) in tiny_controlnets.items():
        shutil.copytree(folder, root / name)
    save_original_controlnet(tiny_controlnets["depth"][1], root / "control_depth.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(((rng.random((64, 64, 3)) > 0.8) * 255).astype(np.uint8)).save(root / "hint.png")
    result = run("export", "tiny", "--out", root / "A", "--precision", "fp32", "--controlnet", root / "edges")
    assert result.returncode == 0, result.stderr
    return root


def test_export_with_a_controlnet_records_it_and_the_unet_takes_residuals(work):
    manifest = json.loads((work / "A" / "manifest.json").read_text())
    entry = manifest["components"]["controlnet_edges"]
    assert entry["file"] == "controlnet_edges.onnx"
    assert entry["extra"]["controlnet"]["name"] == "edges"
    assert [t["name"] for t in entry["outputs"]][-1] == "control_mid"
    unet_inputs = [t["name"] for t in manifest["components"]["unet"]["inputs"]]
    assert unet_inputs[-1] == "control_mid" and len(manifest["model"]["control_residuals"]) == 5


def test_adding_a_controlnet_leaves_every_other_file_alone(work, tmp_path):
    target = tmp_path / "A"
    shutil.copytree(work / "A", target)
    before = files_of(target)
    result = run("export", f"canny={work / 'depth'}", "--into", target)
    assert result.returncode == 0, result.stderr
    after = files_of(target)
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed == {"manifest.json"}
    assert {"controlnet_canny.onnx"} <= set(after) - set(before)
    with Pipeline.from_artifacts(target) as pipe:
        assert pipe.controlnets == ["canny", "edges"]


def test_original_layout_single_file_gives_the_image_of_its_diffusers_folder(work, tmp_path):
    target = tmp_path / "A"
    shutil.copytree(work / "A", target)
    config = work / "depth"  # its architecture is the tiny one, not SD 1.5's: give its config
    assert (
        run("export", work / "control_depth.safetensors", "--into", target, "--controlnet-config", config).returncode
        == 0
    )
    assert run("export", work / "depth", "--into", target).returncode == 0
    hint = Image.open(work / "hint.png")
    with Pipeline.from_artifacts(target) as pipe:
        images = [
            pipe("a cat", steps=3, seed=1, height=64, width=64, controls=[ControlInput(n, hint)]).pixels
            for n in ("control_depth", "depth", "edges")
        ]
    assert psnr(images[0], images[1]) >= 100  # the same weights, read from either layout
    assert psnr(images[0], images[2]) < 40  # and a different ControlNet gives another image


def test_generate_with_controls_writes_a1111_controlnet_parameters(work, tmp_path):
    out = tmp_path / "x.png"
    result = run(
        "generate", work / "A", "a cat", "--control", f"edges:{work / 'hint.png'}:0.7:0:0.5",
        "--control-preprocess", "canny", "--steps", "3", "--size", SIZE, "--seed", "1", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parameters = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in parameters
    assert "Guidance End: 0.5" in parameters
    plain = tmp_path / "plain.png"
    assert (
        run("generate", work / "A", "a cat", "--steps", "3", "--size", SIZE, "--seed", "1", "--out", plain).returncode
        == 0
    )
    assert np.abs(np.asarray(Image.open(out), float) - np.asarray(Image.open(plain), float)).mean() > 1


@pytest.mark.parametrize(
    ("control", "expected"),
    [
        ("nope:{hint}", "unknown ControlNet 'nope': this artifact has edges"),
        ("edges:{missing}", "does not exist"),
        ("edges:{empty}", "is not an image"),
        ("edges:{hint}:-1", "scale must be >= 0"),
        ("edges:{hint}:1:0.6:0.6", "0 <= start < end <= 1"),
        ("edges:{hint}:1:0:1.5", "0 <= start < end <= 1"),
        ("edges", "expected NAME:IMAGE"),
    ],
)
def test_bad_controls_are_one_line_errors_before_any_work(work, tmp_path, control, expected):
    (tmp_path / "empty.png").write_bytes(b"")
    text = control.format(hint=work / "hint.png", missing=tmp_path / "missing.png", empty=tmp_path / "empty.png")
    result = run("generate", work / "A", "a cat", "--control", text, "--steps", "2", "--out", tmp_path / "o.png")
    assert expected in one_line_error(result) or expected in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_more_controls_than_controlnets_is_refused(work, tmp_path):
    hint = work / "hint.png"
    result = run("generate", work / "A", "a cat", "--control", f"edges:{hint}", "--control", f"edges:{hint}")
    assert "2 controls were given but the artifact has 1 ControlNet(s) (edges)" in one_line_error(result)


def test_a_controlnet_for_another_family_is_refused_at_export_and_at_run(work, tmp_path):
    xl = controlnet_from_unet(load_preset("tiny-xl").unet, hint_channels=(4, 8, 8, 16))
    xl.save_pretrained(tmp_path / "xl")
    target = tmp_path / "A"
    shutil.copytree(work / "A", target)
    before = files_of(target)
    error = one_line_error(run("export", tmp_path / "xl", "--into", target))
    assert "an SDXL ControlNet" in error and "SD 1.x model" in error
    assert files_of(target) == before
    error = one_line_error(run("export", "tiny", "--out", tmp_path / "B", "--controlnet", tmp_path / "xl"))
    assert "an SDXL ControlNet" in error and not (tmp_path / "B").exists()
    # at run: a manifest claiming an SDXL ControlNet on this SD 1.x artifact
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["components"]["controlnet_edges"]["extra"]["controlnet"]["family"] = "sdxl"
    (target / "manifest.json").write_text(json.dumps(manifest))
    error = one_line_error(run("generate", target, "a cat", "--control", f"edges:{work / 'hint.png'}"))
    assert "ControlNet 'edges' is for sdxl models but this artifact is sd1" in error


def test_a_controlnet_on_an_artifact_whose_unet_takes_no_residuals_names_the_fix(work, tmp_path):
    assert run("export", "tiny", "--out", tmp_path / "P", "--precision", "fp32", "--plain-unet").returncode == 0
    error = one_line_error(run("export", work / "edges", "--into", tmp_path / "P"))
    assert "takes no ControlNet residuals" in error and "sdtrt export MODEL --out FOLDER --controlnet" in error
    error = one_line_error(run("generate", tmp_path / "P", "a cat", "--control", f"edges:{work / 'hint.png'}"))
    assert "takes no ControlNet residuals" in error
    # and the plain UNet still generates, with no residual inputs
    manifest = json.loads((tmp_path / "P" / "manifest.json").read_text())
    assert not any(t["name"].startswith("control_") for t in manifest["components"]["unet"]["inputs"])
    assert (
        run("generate", tmp_path / "P", "a cat", "--steps", "2", "--size", SIZE, "--out", tmp_path / "p.png").returncode
        == 0
    )


def test_a_controlnet_of_another_architecture_is_refused_by_its_residual_shapes(work, tmp_path):
    import diffusers

    config = dict(load_preset("tiny").unet.config)
    other = diffusers.UNet2DConditionModel.from_config({**config, "layers_per_block": 2})  # 7 residuals, not 5
    model = controlnet_from_unet(other, hint_channels=(4, 8, 8, 16))
    model.save_pretrained(tmp_path / "other")
    error = one_line_error(run("export", tmp_path / "other", "--into", work / "A"))
    assert "gives residuals of shapes" in error


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_compares_each_controlnet_with_its_pytorch_module(work, tmp_path, precision):
    folder = work / "A" if precision == "fp32" else tmp_path / "H"
    if precision == "fp16":
        result = run("export", "tiny", "--out", folder, "--precision", "fp16", "--controlnet", work / "edges")
        assert result.returncode == 0, result.stderr
    result = run("check", folder, "--json", tmp_path / "check.json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "check.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    control_rows = [r for r in rows if r["component"] == "controlnet_edges"]
    assert {r["output"] for r in control_rows} >= {"control_down_0", "control_mid"}
    assert all(r["passed"] for r in control_rows)
