"""Hires fix: both passes against diffusers (latent and pixel upscale), the sizes, the profile check, the
infotext, and ``sdtrt generate --hires-*`` as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.hires import (
    LATENT_UPSCALE_MODES,
    HiresFix,
    check_hires,
    run_hires,
    second_pass,
    second_pass_steps,
)
from sdtrt.runtime.images import infotext
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.schedulers import DIFFUSERS_SCHEDULERS

PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry, low quality"
STEPS = 6


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as p:
        yield p


def _scheduler(bundle, name: str):
    import diffusers

    cls_name, kwargs = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(bundle.scheduler_config, **kwargs)


def reference_hires(bundle, hires: HiresFix, sampler: str, seed: int, size: int) -> torch.Tensor:
    """diffusers: StableDiffusionPipeline for the first pass, A1111's upscale, StableDiffusionImg2ImgPipeline for
    the second pass with a fresh generator of the same seed (A1111 draws the second pass's noise anew)."""
    import diffusers

    base = diffusers_pipeline(bundle, sampler)
    total, strength, _ = second_pass_steps(hires, STEPS)
    common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 7.5}
    with torch.no_grad():
        latent = hires.upscaler in LATENT_UPSCALE_MODES
        first = base(
            **common,
            num_inference_steps=STEPS,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="latent" if latent else "pil",
        ).images
        big = size * 2
        if latent:
            mode, antialias = LATENT_UPSCALE_MODES[hires.upscaler]
            init = torch.nn.functional.interpolate(first, size=(big // 8, big // 8), mode=mode, antialias=antialias)
        else:
            init = first[0].resize((big, big), Image.Resampling.LANCZOS)
        img2img = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
        img2img.scheduler = _scheduler(bundle, sampler)
        img2img.set_progress_bar_config(disable=True)
        out = img2img(
            **common,
            image=init,
            strength=strength,
            num_inference_steps=total,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
        )
    return out.images.float()


@pytest.mark.parametrize(
    ("upscaler", "sampler"), [("Latent", "euler_a"), ("Latent (bicubic antialiased)", "dpmpp_2m"), ("Lanczos", "euler")]
)
def test_hires_fix_matches_diffusers(pipe, tiny_bundle, upscaler, sampler):
    pytest.importorskip("diffusers")
    hires = HiresFix(scale=2, upscaler=upscaler, denoising_strength=0.6)
    steps_seen = []
    result = run_hires(
        pipe,
        PROMPT,
        hires,
        NEGATIVE,
        steps=STEPS,
        seed=3,
        height=64,
        width=64,
        scheduler=sampler,
        callback=lambda i, total, _: steps_seen.append((i, total)),
    )
    expected = reference_hires(tiny_bundle, hires, sampler, seed=3, size=64)
    assert result.pixels.shape == expected.shape == (1, 3, 128, 128)
    assert result.images[0].size == (128, 128)
    assert result.pixels.std() > 0.01
    value = psnr(result.pixels, expected)
    print(f"hires fix {upscaler} {sampler} vs diffusers PSNR: {value:.1f} dB")
    assert value >= 40, value
    # A1111's step count: the second pass runs as many steps as the first (hires steps 0), the last of a longer
    # schedule: int(6 / 0.6) = 10 steps, from step 4
    assert steps_seen == [(i, STEPS) for i in range(STEPS)] + [(i, 10) for i in range(4, 10)]
    assert (result.settings.width, result.settings.height) == (64, 64)  # the first pass's, as A1111 reports


def test_second_pass_differs_from_a_plain_upscale(pipe):
    """The second pass really denoises: it is close to, not equal to, the first pass enlarged."""
    hires = HiresFix(scale=2, upscaler="Lanczos", denoising_strength=0.3)
    result = run_hires(pipe, PROMPT, hires, steps=STEPS, seed=4, height=64, width=64)
    first = pipe(PROMPT, steps=STEPS, seed=4, height=64, width=64)
    enlarged = np.asarray(first.images[0].resize((128, 128), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    value = psnr(result.pixels[0], torch.from_numpy(enlarged).permute(2, 0, 1))
    assert 10 < value < 60, value


def test_batch_keeps_each_images_seed(pipe):
    hires = HiresFix(scale=2, denoising_strength=0.5, steps=3)
    batch = run_hires(pipe, PROMPT, hires, steps=4, seed=20, height=64, width=64, num_images=2)
    alone = run_hires(pipe, PROMPT, hires, steps=4, seed=21, height=64, width=64)
    assert batch.seeds == [20, 21] and batch.pixels.shape == (2, 3, 128, 128)
    assert psnr(batch.pixels[1], alone.pixels[0]) >= 60
    pixel = run_hires(pipe, PROMPT, HiresFix(upscaler="Nearest", steps=3), steps=4, seed=20, height=64, width=64,
                      num_images=2)  # fmt: skip
    assert pixel.seeds == [20, 21] and [im.size for im in pixel.images] == [(128, 128)] * 2


def test_second_pass_sizes():
    # scale: sides cut to multiples of 8, as A1111's latents are
    assert second_pass(HiresFix(scale=1.3), 64, 96).size == (80, 120)
    assert second_pass(HiresFix(scale=2), 64, 96).size == (128, 192)
    # one side given: the other keeps the aspect
    assert second_pass(HiresFix(resize=(0, 192)), 64, 96).size == (128, 192)
    # both given: cover that size, then crop the middle
    sizes = second_pass(HiresFix(resize=(128, 256)), 64, 64)
    assert (sizes.cover, sizes.size, sizes.offset) == ((256, 256), (128, 256), (64, 0))


def test_second_pass_steps_as_a1111():
    assert second_pass_steps(HiresFix(denoising_strength=0.7), 20) == (28, 20.5 / 28, 20)
    assert second_pass_steps(HiresFix(steps=10, denoising_strength=1.0), 20) == (10, 1.0, 10)
    for steps in range(1, 60):
        for strength in (0.05, 0.3, 0.45, 0.7, 0.999, 1.0):
            total, s, run = second_pass_steps(HiresFix(denoising_strength=strength), steps)
            assert min(int(total * s), total) == run == steps


def test_second_size_outside_the_profile_fails_before_any_work(pipe, tiny_fp32):
    calls = []
    with pytest.raises(
        ShapeError,
        match=r"512x512 is outside the profile of this artifact \(width 64\.\.256"
        r".*sdtrt export tiny --out ARTIFACTS --min-size 64x64 --max-size 512x512$",
    ):
        run_hires(pipe, PROMPT, HiresFix(scale=4), steps=2, height=128, width=128, callback=lambda *a: calls.append(a))
    assert calls == []
    manifest = read_manifest(tiny_fp32)
    with pytest.raises(ShapeError, match="second pass at 40x40: .* multiples of 16 pixels"):
        check_hires(manifest, HiresFix(resize=(0, 44)), 64, 64)
    with pytest.raises(ShapeError, match="second pass at 48x48 is outside"):  # below the profile too
        check_hires(manifest, HiresFix(resize=(0, 48)), 64, 64)
    with pytest.raises(ConfigError, match="unknown hires upscaler 'ESRGAN'.*Latent \\(antialiased\\)"):
        HiresFix(upscaler="ESRGAN")
    with pytest.raises(ConfigError, match=r"denoising strength must be in \(0, 1\]"):
        HiresFix(denoising_strength=0)
    with pytest.raises(ConfigError, match="text-to-image"):
        run_hires(pipe, PROMPT, HiresFix(), image=Image.new("RGB", (64, 64)))


def test_init_latents_are_checked(pipe):
    with pytest.raises(ShapeError, match=r"init_latents must be \[1 or 1, 4, 8, 8\]"):
        pipe(PROMPT, steps=2, height=64, width=64, init_latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ConfigError, match="either an image or init_latents"):
        pipe(PROMPT, steps=2, image=Image.new("RGB", (64, 64)), init_latents=torch.zeros(1, 4, 8, 8))
    result = pipe(PROMPT, steps=4, seed=1, strength=0.5, init_latents=torch.zeros(1, 4, 12, 8))
    assert result.images[0].size == (64, 96)  # their own size by default


def test_infotext_carries_the_hires_fields(pipe):
    hires = HiresFix(resize=(128, 0), steps=3, denoising_strength=0.45, sampler="euler", prompt="a dog, sharp",
                     guidance_scale=5.0)  # fmt: skip
    result = run_hires(pipe, PROMPT, hires, steps=4, seed=5, height=64, width=64, scheduler="euler_a")
    text = infotext(PROMPT, "", 5, result.settings)
    assert "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 64x64" in text
    assert (
        'Denoising strength: 0.45, Hires sampler: Euler, Hires prompt: "a dog, sharp", Hires resize: 0x128, '
        "Hires steps: 3, Hires upscaler: Latent, Hires CFG Scale: 5"
    ) in text
    plain = run_hires(pipe, PROMPT, HiresFix(), steps=2, seed=5, height=64, width=64)
    assert "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent" in infotext(
        PROMPT, "", 5, plain.settings
    )
    assert plain.settings.to_dict()["hires"]["width"] == 128


SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=300)


def test_cli_hires_equals_the_python_call(pipe, tiny_fp32, tmp_path):
    out = tmp_path / "hires.png"
    flags = ["--hires-scale", "2", "--hires-upscaler", "Latent (nearest)", "--hires-steps", "3"]
    flags += ["--hires-denoise", "0.5", "--hires-sampler", "euler", "--hires-prompt", "a dog", "--hires-cfg", "4"]
    done = _cli("generate", str(tiny_fp32), PROMPT, "--size", "64", "--steps", "4", "--seed", "9", "--out", str(out),
                "--negative", NEGATIVE, *flags)  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = Image.open(out)
    assert image.size == (128, 128) and "64x64 then 128x128 (hires fix), 4 steps" in done.stdout
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent (nearest)" in image.info["parameters"]
    hires = HiresFix(upscaler="Latent (nearest)", steps=3, denoising_strength=0.5, sampler="euler", prompt="a dog",
                     guidance_scale=4.0)  # fmt: skip
    expected = run_hires(pipe, PROMPT, hires, NEGATIVE, steps=4, seed=9, height=64, width=64)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))


def test_cli_hires_refusals(tiny_fp32, tmp_path):
    out = str(tmp_path / "x.png")
    done = _cli("generate", str(tiny_fp32), PROMPT, "--size", "128", "--hires-scale", "4", "--out", out)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "512x512 is outside" in line and "sdtrt export" in line and "--max-size 512x512" in line
    done = _cli("generate", str(tiny_fp32), PROMPT, "--hires-steps", "5", "--out", out)
    assert done.returncode == 1 and "add --hires-scale or --hires-size" in done.stderr
    done = _cli("generate", str(tiny_fp32), PROMPT, "--hires-scale", "2", "--hires-upscaler", "4x-UltraSharp")
    assert done.returncode == 1 and "unknown hires upscaler '4x-UltraSharp'" in done.stderr


def test_controlnets_run_in_both_passes(tiny_control_fp32):
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.hires import upscale_latents

    hint = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    controls = [ControlInput("edges", hint, resize_mode="just_resize")]
    hires = HiresFix(steps=3, denoising_strength=0.5)
    with Pipeline.from_artifacts(tiny_control_fp32, device="cpu") as cpipe:
        got = run_hires(cpipe, PROMPT, hires, steps=4, seed=2, height=64, width=64, controls=controls)
        kept = []
        cpipe(
            PROMPT,
            steps=4,
            seed=2,
            height=64,
            width=64,
            controls=controls,
            callback=lambda *a: kept.append(a[2].clone()),
        )
        total, strength, _ = second_pass_steps(hires, 4)
        big = upscale_latents(kept[-1], "Latent", 16, 16)
        manual = cpipe(PROMPT, steps=total, strength=strength, seed=2, init_latents=big, controls=controls)
        plain = run_hires(cpipe, PROMPT, hires, steps=4, seed=2, height=64, width=64)
    assert got.images[0].size == (128, 128)
    assert torch.equal(got.pixels, manual.pixels)
    assert psnr(plain.pixels, got.pixels) < 40  # the ControlNet changed both passes
    assert len(got.settings.controls) == 1
