"""Inpainting on the TensorRT backend, on tests/trt_double.py (a RECORDING DOUBLE of tensorrt, the CPU standing in
for the GPU): the wiring of the masked step, never TensorRT's numbers. The double's engines write their run count
into every output (the VAE encoder's mean and std too), so what the UNet must be fed where the mask keeps the
image is known exactly: the init latents noised to each step's level, whatever the UNet predicted."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.export.build import TensorRTBuildOptions, build_engines
from sdtrt.runtime.inpaint import Inpaint
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.profile import ShapeProfile

MEMORY = {"text_encoder": 1000, "unet": 7000, "vae_decoder": 5000, "vae_encoder": 3000, "unet_shallow": 2000}
PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
STEPS, STRENGTH = 6, 0.5


@pytest.fixture
def use_double(use_double):
    return functools.partial(use_double, memory=MEMORY)


def scene() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # latent pixels 2..5 repaint
    return image, mask


def test_the_masked_step_keeps_the_unmasked_latents_whatever_the_unet_says(use_double, tiny_fp32, tmp_path):
    double = use_double()
    out = tmp_path / "engines"
    build_engines(tiny_fp32, out, PROFILE, TensorRTBuildOptions())
    image, mask = scene()
    with Pipeline.from_artifacts(out, backend="tensorrt", device="cpu") as pipe:
        calls = [
            pipe(
                "a cat",
                steps=STEPS,
                seed=2,
                height=64,
                width=64,
                scheduler="euler",
                image=image,
                strength=STRENGTH,
                inpaint=Inpaint(mask, blur=0),
            )  # fmt: skip
            for _ in range(2)
        ]
        (denoiser,) = pipe._denoisers.values()
        scaling = pipe.manifest.model.scaling_factor
    unet = next(c for c in double.records.contexts if c.engine.plan["name"] == "unet")
    encoder = next(c for c in double.records.contexts if c.engine.plan["name"] == "vae_encoder")
    runs = int(STEPS * STRENGTH)
    assert unet.runs == 2 * runs and encoder.runs == 2  # one init-image encode per call (a regular UNet)
    assert unet.shapes["sample"] == (2, 4, 8, 8)  # latents only: no mask channels for a 4-channel UNet
    samples = [np.frombuffer(seen["sample"], dtype=np.float32).reshape(2, 4, 8, 8) for seen in unet.inputs_seen]
    keep = np.ones((8, 8), dtype=bool)
    keep[2:6, 2:6] = False
    schedule = denoiser.schedule
    generator = torch.Generator().manual_seed(2)  # per image: the VAE sample, then the noise (as diffusers)
    vae_sample, noise = (torch.randn((1, 4, 8, 8), generator=generator) for _ in range(2))
    first = STEPS - runs
    for call in (1, 2):  # the double's encoder gives mean = std = its run count
        clean = (call + call * vae_sample) * scaling
        for k in range(runs):
            i = first + k
            level = schedule.signal_scale[i] * clean + schedule.noise_scale[i] * noise
            expected = (level * schedule.input_scale[i]).numpy()[0]
            fed = samples[(call - 1) * runs + k]
            np.testing.assert_allclose(fed[0][:, keep], expected[:, keep], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(fed[0], fed[1])  # the uncond and cond rows get the same latents
            if k:  # after a prediction, the masked region is generated, not put back
                assert np.abs(fed[0][:, ~keep] - expected[:, ~keep]).max() > 1e-3
    src = np.asarray(image).astype(int)
    outside = np.asarray(mask) == 0
    for result in calls:
        got = np.asarray(result.images[0]).astype(int)
        np.testing.assert_array_equal(got[outside], src[outside])


@pytest.mark.trt
@pytest.mark.parametrize("precision, floor", [("fp32", 40.0), ("fp16", 30.0)])
def test_real_engines_inpaint_as_onnxruntime_does(request, tiny_fp32, tmp_path, precision, floor):
    """The masked step on real engines, captured in a CUDA graph, against ONNX Runtime on the CPU."""
    from sdtrt.runtime.compare import psnr

    artifact = tiny_fp32 if precision == "fp32" else request.getfixturevalue("tiny_fp16")
    out = tmp_path / "engines"
    build_engines(artifact, out, ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128), TensorRTBuildOptions(opt_level=1))
    image, mask = scene()
    args = {"steps": STEPS, "seed": 3, "height": 64, "width": 64, "image": image, "strength": 0.75}
    with Pipeline.from_artifacts(artifact, backend="onnxruntime", device="cpu") as pipe:
        expected = pipe("a cat", inpaint=Inpaint(mask, blur=2), **args).pixels
    with Pipeline.from_artifacts(out, backend="tensorrt") as pipe:
        assert pipe.cuda_graph
        found = pipe("a cat", inpaint=Inpaint(mask, blur=2), **args).pixels
    assert psnr(found, expected) >= floor
