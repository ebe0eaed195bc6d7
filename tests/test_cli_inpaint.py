"""`sdtrt generate --init-image IMG --mask MASK` as a subprocess: the Python API's image, and bad masks refused in one
line before any engine opens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtrt.cli.options import INPAINT_FILLS
from sdtrt.runtime.inpaint import FILLS, Inpaint

from .test_cli_generate import one_error_line, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint-cli")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / "mask.png")
    Image.new("L", (32, 32), 255).save(folder / "small.png")
    Image.new("L", (64, 64), 0).save(folder / "black.png")
    return folder


def test_the_cli_inpaints_as_the_python_api_does(tmp_path, tiny_fp32, files):
    from sdtrt.runtime.pipeline import Pipeline

    out = tmp_path / "out.png"
    args = ["--steps", "6", "--size", "64x64", "--strength", "0.7", "--seed", "3", "--scheduler", "euler"]
    options = ["--mask-blur", "2", "--inpainting-fill", "latent-nothing"]
    result = run("generate", str(tiny_fp32), "a red square", "--init-image", str(files / "init.png"), "--mask",
                 str(files / "mask.png"), *options, *args, "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    init, mask = Image.open(files / "init.png"), Image.open(files / "mask.png")
    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as pipe:
        expected = pipe("a red square", steps=6, height=64, width=64, strength=0.7, seed=3, scheduler="euler",
                        image=init, inpaint=Inpaint(mask, blur=2, fill="latent nothing")).images[0]  # fmt: skip
    got = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(expected))
    outside = np.asarray(mask) == 0
    near = np.zeros_like(outside)
    near[10:54, 10:54] = True  # the blur's reach
    assert np.array_equal(got[outside & ~near], np.asarray(init.convert("RGB"))[outside & ~near])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "{mask}"], "--mask needs the image it applies to: add --init-image IMAGE"),
        (["--init-image", "{init}", "--mask", "{small}"], "the mask is 32x32 but the init image is 64x64"),
        (["--init-image", "{init}", "--mask", "{black}"], "the mask repaints nothing"),
        (["--init-image", "{init}", "--mask-blur", "8"], "--mask-blur set how a mask is used; add --mask MASK"),
        (["--init-image", "{init}", "--mask", "{mask}", "--mask-blur", "-1"], "mask blur must be an integer"),
    ],
)
def test_bad_masks_are_one_line_before_any_engine_opens(tiny_fp32, files, extra, message):
    paths = {"mask": files / "mask.png", "init": files / "init.png", "small": files / "small.png",
             "black": files / "black.png"}  # fmt: skip
    extra = [value.format(**paths) for value in extra]
    result = run("generate", str(tiny_fp32), "x", "--size", "64x64", *extra, "--out", str(files / "never.png"))
    assert message in one_error_line(result)
    assert not (files / "never.png").exists()


def test_the_cli_offers_the_runtimes_fills():
    assert INPAINT_FILLS == FILLS
