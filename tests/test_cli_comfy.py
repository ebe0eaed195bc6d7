"""``sdtrt generate --sigma-schedule``: ComfyUI's default workflow as a real subprocess, against the runtime's
ComfyUI stages called in-process with the same settings (the PNG's pixels are identical), and its refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def in_process(
    folder,
    prompt: str,
    negative: str,
    sampler: str,
    schedule: str,
    steps: int,
    cfg: float,
    seed: int,
    batch: int = 1,
    size: int = 64,
) -> np.ndarray:
    """The default workflow's nodes called one by one: CLIPTextEncode x2, EmptyLatentImage, KSampler, VAEDecode,
    then SaveImage's conversion."""
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(folder, backend="onnxruntime") as pipe:
        positive, negative_cond = pipe.encode_conditioning(prompt), pipe.encode_conditioning(negative)
        latents = torch.zeros(batch, 4, size // 8, size // 8)
        sigmas = pipe.ksampler_sigmas(schedule, steps, 1.0)
        out = pipe.sample_latents(latents, positive, negative_cond, sampler=sampler, sigmas=sigmas, cfg=cfg, seed=seed)
        images = pipe.decode_images(out)
    return np.clip(255.0 * images.numpy(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("sampler", "schedule"), [("euler", "normal"), ("dpmpp_2m_sde", "beta")])
def test_generate_equals_the_stage_functions_pixel_for_pixel(tmp_path, tiny_fp32, sampler, schedule):
    out = tmp_path / "comfy.png"
    args = ("--scheduler", sampler, "--sigma-schedule", schedule, "--seed", "3", "--steps", "4", "--size", "64")
    result = run("generate", str(tiny_fp32), "a cat", *args, "--cfg", "7", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (seed 3)" in result.stdout
    png = Image.open(out)
    assert f"Sampler: {sampler}, Schedule type: {schedule}, CFG scale: 7.0, Seed: 3" in png.text["parameters"]
    expected = in_process(tiny_fp32, "a cat", "", sampler, schedule, 4, 7.0, 3)
    assert np.array_equal(np.array(png), expected[0])


def test_generate_batch_with_ancestral_sampler_and_karras(tmp_path, tiny_fp32):
    out = tmp_path / "batch.png"
    args = ("--scheduler", "euler_a", "--sigma-schedule", "karras", "--seed", str(2**64 - 1), "--steps", "3")
    result = run(
        "generate",
        str(tiny_fp32),
        "a dog",
        "--negative",
        "blurry",
        *args,
        "--size",
        "64",
        "--num-images",
        "2",
        "--cfg",
        "4.5",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    expected = in_process(tiny_fp32, "a dog", "blurry", "euler_ancestral", "karras", 3, 4.5, 2**64 - 1, batch=2)
    for k in range(2):
        assert np.array_equal(np.array(Image.open(tmp_path / f"batch-{k}.png")), expected[k])
    assert not np.array_equal(expected[0], expected[1])  # one noise draw for the batch, not one seed per image


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--scheduler", "dpmpp_2m_karras"), "use --scheduler dpmpp_2m --sigma-schedule karras"),
        (("--sigma-schedule", "polyexp"), "unknown sigma schedule 'polyexp'; expected one of: simple, sgm_uniform"),
        (("--scheduler", "heun"), "--scheduler must be one of: euler, euler_a, dpmpp_2m, ddim, lcm"),
        (("--seed", str(2**64)), "(ComfyUI's range)"),
        (("--crop", "0x0"), "--crop is not available with --sigma-schedule"),
        (("--cache-interval", "0"), "cache interval must be an integer >= 1"),
        (("--steps", "0"), "steps must be in [1, 10000]"),
        (("--size", "72"), "image sides must be multiples of 16 pixels"),
    ],
)
def test_refusals_are_one_line_before_work(tmp_path, tiny_fp32, extra, message):
    args = ["generate", str(tiny_fp32), "a cat", "--sigma-schedule", "normal", "--size", "64", "--out"]
    line = one_error_line(run(*args, str(tmp_path / "x.png"), *extra))
    assert message in line
    assert not (tmp_path / "x.png").exists()


def test_the_sde_sampler_without_torchsde_is_refused_before_work(tmp_path, tiny_fp32):
    fake = tmp_path / "fake" / "torchsde"  # a torchsde that does not import, found before the installed one
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torchsde is broken here")\n')
    out = tmp_path / "x.png"
    args = ["generate", str(tiny_fp32), "a cat", "--scheduler", "dpmpp_2m_sde", "--sigma-schedule", "karras"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([SDTRT, *args, "--size", "64", "--out", str(out)], capture_output=True, text=True,
                            timeout=600, env=env)  # fmt: skip
    line = one_error_line(result)
    assert "dpmpp_2m_sde" in line and 'pip install "sdtrt[sde]"' in line and "torchsde is broken here" in line
    assert not out.exists()


def test_the_server_lists_the_sde_sampler_only_where_torchsde_imports(monkeypatch):
    from sdtrt.serve.comfy.nodes_sampling import sampler_lists

    assert "dpmpp_2m_sde" in sampler_lists()[0]
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde now raises ImportError
    samplers, schedules = sampler_lists()
    assert "dpmpp_2m_sde" not in samplers and "euler" in samplers and "beta" in schedules


def test_mapping_table_is_shared():
    from sdtrt.runtime.sampling import COMFY_SAMPLERS, SIGMA_SAMPLERS
    from sdtrt.runtime.schedulers import SCHEDULER_NAMES

    # every sdtrt sampler name but the Karras variant maps; ComfyUI-only samplers go by their ComfyUI name
    assert set(SCHEDULER_NAMES) - {"dpmpp_2m_karras"} <= set(COMFY_SAMPLERS)
    assert {COMFY_SAMPLERS[name] for name in set(COMFY_SAMPLERS) - set(SCHEDULER_NAMES)} == {"dpmpp_2m_sde"}
    assert all(COMFY_SAMPLERS[name] == name for name in set(COMFY_SAMPLERS) - set(SCHEDULER_NAMES))
    assert sorted(COMFY_SAMPLERS.values()) == sorted(SIGMA_SAMPLERS)
    from sdtrt.cli.generate import generate_cmd
    from sdtrt.runtime.sampling import SIGMA_SCHEDULES

    (option,) = [p for p in generate_cmd.params if p.name == "sigma_schedule"]
    assert all(name in option.help for name in SIGMA_SCHEDULES)  # the help lists every schedule


def test_img2img_equals_loadimage_vaeencode_ksampler(tmp_path, tiny_fp32):
    """--init-image + --strength: LoadImage -> VAEEncode -> KSampler(denoise) -> VAEDecode -> SaveImage."""
    from sdtrt.runtime.pipeline import Pipeline

    rng = np.random.default_rng(0)
    source = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (70, 64, 3), dtype=np.uint8)).save(source)  # 70: VAEEncode crops to 64
    out, previews = tmp_path / "out.png", tmp_path / "previews"
    args = ("--sigma-schedule", "simple", "--scheduler", "dpmpp_2m", "--seed", "9", "--steps", "3", "--cfg", "5")
    result = run(
        "generate",
        str(tiny_fp32),
        "a cat",
        *args,
        "--init-image",
        str(source),
        "--strength",
        "0.6",
        "--out",
        str(out),
        "--preview-dir",
        str(previews),
    )
    assert result.returncode == 0, result.stderr
    assert "Denoising strength: 0.6" in Image.open(out).text["parameters"]
    assert len(list(previews.iterdir())) == 3
    pixels = torch.from_numpy(np.array(Image.open(source).convert("RGB")).astype(np.float32) / 255.0)[None]
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime") as pipe:
        latents = pipe.encode_images(pixels)
        assert latents.shape == (1, 4, 8, 8)
        sigmas = pipe.ksampler_sigmas("simple", 3, 0.6)
        positive, negative = pipe.encode_conditioning("a cat"), pipe.encode_conditioning("")
        out_latents = pipe.sample_latents(
            latents, positive, negative, sampler="dpmpp_2m", sigmas=sigmas, cfg=5.0, seed=9
        )
        expected = np.clip(255.0 * pipe.decode_images(out_latents)[0].numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(np.array(Image.open(out)), expected)
