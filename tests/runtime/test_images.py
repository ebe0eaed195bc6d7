"""A1111 PNG metadata: one ``infotext`` for the CLI and the server, and PNG bytes that carry it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sdtrt.runtime.images import infotext, png_bytes
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import LoraSetting, Settings

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def test_infotext_is_what_sdtrt_generate_writes(tmp_path, tiny_fp32):
    """img2img with a negative prompt: the CLI's PNG text, to the letter, from the settings of the same call."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    args = ["a red square", "--negative", "blurry", "--steps", "4", "--seed", "5", "--size", "64x64"]
    args += ["--scheduler", "euler", "--cfg", "6", "--init-image", str(init), "--strength", "0.5"]
    done = subprocess.run(
        [SDTRT, "generate", str(tiny_fp32), *args, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    written = Image.open(out).text["parameters"]
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        result = pipe(
            "a red square", "blurry", steps=4, guidance_scale=6.0, seed=5, height=64, width=64, scheduler="euler",
            image=Image.open(init), strength=0.5,
        )  # fmt: skip
        model_hash = str(pipe.manifest.source.get("sha256", ""))
    assert infotext("a red square", "blurry", 5, result.settings, model_hash, "tiny") == written
    assert "Denoising strength: 0.5" in written


def test_infotext_writes_loras_as_a1111_does():
    loras = (LoraSetting("detail", 0.8, "0123456789ab"), LoraSetting("style", 1.0, "ba9876543210"))
    settings = Settings(20, 7.5, 512, 768, "dpmpp_2m_karras", None, "tensorrt", loras)
    assert infotext("a cat", "", 42, settings, "f" * 64, "sd15") == (
        "a cat <lora:detail:0.8> <lora:style:1>\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 768x512, Model hash: ffffffffff, "
        'Model: sd15, Lora hashes: "detail: 0123456789ab, style: ba9876543210"'
    )


def test_settings_to_dict_keeps_the_json_form():
    plain = Settings(4, 7.5, 64, 96, "euler", None, "onnxruntime")
    assert plain.to_dict() == {
        "steps": 4,
        "guidance_scale": 7.5,
        "height": 64,
        "width": 96,
        "scheduler": "euler",
        "strength": None,
        "backend": "onnxruntime",
    }
    xl = Settings(1, 0.0, 64, 64, "euler_a", 0.5, "torch", (LoraSetting("a", 0.5, "h"),), (64, 64, 0, 0, 64, 64), True)
    assert xl.to_dict()["loras"] == [{"name": "a", "scale": 0.5, "hash": "h"}]
    assert xl.to_dict()["time_ids"] == [64, 64, 0, 0, 64, 64] and xl.to_dict()["zero_negative"] is True
    assert plain["width"] == 96 and xl["loras"] == xl.to_dict()["loras"]  # the old dict reads still work
    with pytest.raises(KeyError):
        plain["loras"]  # absent where it does not apply, as in the old dict


def test_png_bytes_carry_the_parameters():
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    assert Image.open(io.BytesIO(png_bytes(image, "a cat\nSteps: 1"))).text["parameters"] == "a cat\nSteps: 1"
    assert "parameters" not in Image.open(io.BytesIO(png_bytes(image))).text
