"""`sdtrt generate` as a newcomer meets it, run as a subprocess: where images go, seeds, and errors before work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
SEED_MAX = 2**32 - 1


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused command (exit 1, nothing else printed, no traceback)."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "", result.stdout
    return lines[0]


def test_out_folder_gets_numbered_images_never_overwritten(tmp_path, tiny_fp32):
    from PIL import Image

    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    args = ("generate", str(tiny_fp32), "a cat", "--steps", "1", "--size", "64")
    for _ in range(2):
        result = run(*args, "--seed", "7", "--out", str(folder))
        assert result.returncode == 0, result.stderr
    result = run(*args, "--seed", "10", "--num-images", "2", "--out", str(folder) + "/")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00001-7.png", "00002-7.png", "00003-10.png", "00004-11.png", "notes.txt"]
    assert f"wrote {folder / '00004-11.png'} (seed 11)" in result.stdout
    assert "Seed: 11," in Image.open(folder / "00004-11.png").text["parameters"]
    new = tmp_path / "new"  # a path ending in / is a folder, created like a file's parent
    result = run(*args, "--seed", "3", "--out", f"{new}/")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in new.iterdir()] == ["00001-3.png"]


def test_an_os_error_is_one_line_and_the_traceback_only_with_vv(tmp_path):
    too_long = str(tmp_path / ("x" * 300))  # no file system takes a 300-byte name
    result = run("export", "tiny", "--out", too_long)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.splitlines()[-1]  # after export's own "loading tiny ..."
    assert line.startswith("error: File name too long on ") and line.endswith("that you may read or write it")
    debug = run("-vv", "export", "tiny", "--out", too_long)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_seed_minus_one_is_random_and_recorded(tmp_path, tiny_fp32):
    from PIL import Image

    seeds = []
    for k in range(2):
        out = tmp_path / f"{k}.png"
        result = run(
            "generate", str(tiny_fp32), "a cat", "--steps", "1", "--size", "64", "--seed", "-1", "--out", str(out)
        )
        assert result.returncode == 0, result.stderr
        seed = int(re.search(rf"wrote {re.escape(str(out))} \(seed (\d+)\)", result.stdout).group(1))
        assert 0 <= seed <= SEED_MAX
        assert f"Seed: {seed}," in Image.open(out).text["parameters"]
        seeds.append(seed)
    assert seeds[0] != seeds[1]


@pytest.fixture(scope="module")
def manifest_only(tmp_path_factory, tiny_fp32):
    """tiny_fp32's manifest, tokenizer and scheduler config without its ONNX files: opening an engine fails."""
    folder = tmp_path_factory.mktemp("no-onnx") / "artifacts"
    folder.mkdir()
    for name in ("manifest.json", "tokenizer.json", "scheduler_config.json"):
        shutil.copy(tiny_fp32 / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "init.png")
    (root / "bad.png").write_text("not an image")
    (root / "blocker").write_text("a file where a folder should be")
    return root


BAD_ARGUMENTS = [
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--size", "100x100"], "multiple of 8 pixels, got 100x100"),
    (["--size", "512"], "outside this artifact's profile"),
    (["--num-images", "9"], "outside this artifact's profile"),
    (["--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["--init-image", "{files}/init.png", "--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
    (["--init-image", "{files}/bad.png"], "is not an image Pillow can read"),
    (["--init-image", "{files}/missing.png"], "does not exist"),
    (["--lora", "{files}/missing.safetensors"], "LoRA file"),
    (["--seed", "-2"], f"seed must be -1 (random) or 0..{SEED_MAX}, got -2"),
    (["--seed", str(SEED_MAX + 1)], f"seed must be -1 (random) or 0..{SEED_MAX}, got {SEED_MAX + 1}"),
    (["--seed", str(SEED_MAX), "--num-images", "2"], f"give a seed of at most {SEED_MAX - 1}"),
    (["--out", "{files}/blocker/img.png"], "cannot write the image"),
    (["--out", "{files}/" + "x" * 300 + ".png"], "cannot write the image"),
    (["--preview-dir", "{files}/blocker/p"], "cannot write previews"),
    (["--steps", "many"], "Invalid value for '--steps'"),
]


@pytest.mark.parametrize(
    "args, message", BAD_ARGUMENTS, ids=[" ".join(a).replace("{files}/", "")[:40] for a, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_are_refused_before_any_engine_opens(tmp_path, manifest_only, files, args, message):
    args = [a.format(files=files) for a in args]
    out = ["--out", str(tmp_path / "img.png")] if "--out" not in args else []
    line = one_error_line(run("generate", str(manifest_only), "a cat", *args, *out))
    assert message in line  # the argument's error, not the missing engine file's
    assert not any(tmp_path.iterdir())


def test_good_arguments_on_the_same_folder_do_reach_the_engines(tmp_path, manifest_only):
    line = one_error_line(run("generate", str(manifest_only), "a cat", "--out", str(tmp_path / "img.png")))
    assert "text_encoder.onnx' is missing" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (("--bogus",), "No such option '--bogus'"),
        (("gen",), "No such command 'gen'"),
        (("generate", "A"), "Missing argument 'PROMPT'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, message):
    line = one_error_line(run(*args))
    assert message in line and "--help`" in line
