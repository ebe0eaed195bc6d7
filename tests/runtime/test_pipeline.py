"""End-to-end fidelity: the runtime against diffusers' own pipelines on the same tiny weights, plus bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import ArtifactError, ConfigError, ShapeError
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.schedulers import DIFFUSERS_SCHEDULERS

PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 64, 128
STEPS = 8


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """diffusers' StableDiffusionPipeline on the tiny weights, with a transformers CLIPTokenizer."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pipe = diffusers_pipeline(tiny_bundle, "euler")
    pipe.base_scheduler_config = dict(tiny_bundle.scheduler_config)  # every sampler starts from this config
    return pipe


def run_reference(reference, name: str, seed: int, guidance: float = 7.5, image=None, strength: float = 0.8):
    import diffusers

    cls_name, kwargs = DIFFUSERS_SCHEDULERS[name]
    scheduler = getattr(diffusers, cls_name).from_config(reference.base_scheduler_config, **kwargs)
    generator = [torch.Generator().manual_seed(seed)]
    common = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "num_inference_steps": STEPS,
        "guidance_scale": guidance,
        "generator": generator,
        "output_type": "pt",
    }
    with torch.no_grad():
        if image is None:
            reference.scheduler = scheduler
            out = reference(height=HEIGHT, width=WIDTH, **common)
        else:
            img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
            img2img.scheduler = scheduler
            img2img.set_progress_bar_config(disable=True)
            out = img2img(image=image, strength=strength, **common)
    return out.images.float()


@pytest.fixture(scope="module")
def ort_fp32(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def torch_fp32(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="torch", device="cpu") as pipe:
        yield pipe


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_onnxruntime_matches_diffusers(ort_fp32, reference, scheduler):
    result = ort_fp32(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=7.5,
        seed=3,
        height=HEIGHT,
        width=WIDTH,
        scheduler=scheduler,
    )
    expected = run_reference(reference, scheduler, seed=3)
    assert result.pixels.shape == expected.shape == (1, 3, HEIGHT, WIDTH)
    assert result.pixels.std() > 0.01  # not a blank image
    value = psnr(result.pixels, expected)
    print(f"onnxruntime fp32 {scheduler} vs diffusers PSNR: {value:.1f} dB")
    assert value >= 60, value


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_torch_backend_matches_diffusers(torch_fp32, reference, scheduler):
    result = torch_fp32(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=5, height=HEIGHT, width=WIDTH, scheduler=scheduler
    )
    value = psnr(result.pixels, run_reference(reference, scheduler, seed=5))
    print(f"torch fp32 {scheduler} vs diffusers PSNR: {value:.1f} dB")
    assert value >= 60


def test_without_guidance_matches_diffusers(ort_fp32, reference):
    result = ort_fp32(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=1.0,
        seed=7,
        height=HEIGHT,
        width=WIDTH,
        scheduler="euler",
    )
    assert psnr(result.pixels, run_reference(reference, "euler", seed=7, guidance=1.0)) >= 60


def test_img2img_matches_diffusers(ort_fp32, reference):
    from PIL import Image

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    result = ort_fp32(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        seed=11,
        height=HEIGHT,
        width=WIDTH,
        scheduler="euler_a",
        image=init,
        strength=0.6,
    )
    assert len(result.times.steps) == int(STEPS * 0.6)
    expected = run_reference(reference, "euler_a", seed=11, image=init, strength=0.6)
    assert psnr(result.pixels, expected) >= 60


def test_fp16_artifact_is_close(tiny_fp16, ort_fp32):
    with Pipeline.from_artifacts(tiny_fp16, backend="onnxruntime", device="cpu") as pipe:
        half = pipe(PROMPT, steps=STEPS, seed=2, height=HEIGHT, width=WIDTH, scheduler="euler")
    full = ort_fp32(PROMPT, steps=STEPS, seed=2, height=HEIGHT, width=WIDTH, scheduler="euler")
    value = psnr(half.pixels, full.pixels)
    print(f"fp16 vs fp32 artifact PSNR: {value:.1f} dB")
    assert 30 <= value < math.inf


def test_seeds_batches_and_callback(ort_fp32):
    seen = []
    result = ort_fp32(
        ["a cat", "a dog"],
        steps=3,
        seed=100,
        num_images=2,
        height=HEIGHT,
        width=WIDTH,
        callback=lambda i, total, latents: seen.append((i, total, tuple(latents.shape))),
    )
    assert result.seeds == [100, 101, 102, 103]
    assert result.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert seen == [(i, 3, (4, 4, HEIGHT // 8, WIDTH // 8)) for i in range(3)]
    assert len(result.images) == 4 and result.images[0].size == (WIDTH, HEIGHT)
    single = ort_fp32("a dog", steps=3, seed=103, height=HEIGHT, width=WIDTH)
    assert psnr(single.pixels[0], result.pixels[3]) >= 60  # image k of a batch == seed + k on its own
    assert len(result.times.steps) == 3 and result.times.total > 0


def test_latent_preview():
    from sdtrt.runtime.images import latents_to_rgb

    previews = latents_to_rgb(torch.randn(2, 4, 8, 16))
    assert [p.size for p in previews] == [(16, 8), (16, 8)]
    assert np.asarray(previews[0]).std() > 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"height": 60}, ShapeError, "multiple of 8 pixels"),
        ({"height": 72}, ShapeError, "multiples of 16 pixels"),
        ({"height": 512}, ShapeError, r"outside this artifact's profile: width 64\.\.256, height 64\.\.256"),
        ({"num_images": 5}, ShapeError, r"batch 1\.\.4"),
        ({"steps": 0}, ShapeError, "steps must be an integer >= 1"),
        ({"guidance_scale": -1.0}, ConfigError, "guidance_scale must be >= 0"),
        ({"scheduler": "heun"}, ConfigError, "unknown scheduler 'heun'; expected one of: euler"),
        ({"prompt": []}, ConfigError, "prompt list is empty"),
        ({"strength": 1.5, "image": "init"}, ShapeError, r"strength must be in \(0, 1\]"),
        ({"seed": -2}, ConfigError, r"seed must be -1 \(random\) or 0\.\.4294967295, got -2"),
        ({"seed": 2**32}, ConfigError, r"seed must be -1 \(random\) or 0\.\.4294967295, got 4294967296"),
    ],
)
def test_bad_requests(ort_fp32, kwargs, error, message):
    from PIL import Image

    kwargs = dict(kwargs)
    if kwargs.get("image") == "init":
        kwargs["image"] = Image.new("RGB", (WIDTH, HEIGHT))
    prompt = kwargs.pop("prompt", "a cat")
    with pytest.raises(error, match=message):
        ort_fp32(prompt, **{"steps": 2, "height": HEIGHT, "width": WIDTH, **kwargs})


def test_bad_artifacts(tmp_path, tiny_fp32):
    with pytest.raises(ConfigError, match="unknown backend 'cuda'; expected one of: onnxruntime, torch"):
        Pipeline.from_artifacts(tiny_fp32, backend="cuda")
    with pytest.raises(ArtifactError, match="does not exist"):
        Pipeline.from_artifacts(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        Pipeline.from_artifacts(tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_cuda_graph_step_matches_eager(tiny_fp32, scheduler):
    """The captured step replays the very same function: its images equal the eager ones."""
    results = {}
    for graph in (False, True):
        with Pipeline.from_artifacts(tiny_fp32, backend="torch", device="cuda", cuda_graph=graph) as pipe:
            assert pipe.cuda_graph is graph
            first = pipe(PROMPT, steps=STEPS, seed=9, height=HEIGHT, width=WIDTH, scheduler=scheduler)
            again = pipe(PROMPT, steps=STEPS, seed=10, height=HEIGHT, width=WIDTH, scheduler=scheduler)
            if graph:
                assert len(pipe._denoisers) == 1  # the second call replayed the captured graph
                denoiser = next(iter(pipe._denoisers.values()))
                assert denoiser.graph is not None
            results[graph] = (first.pixels, again.pixels)
    for eager, captured in zip(results[False], results[True], strict=True):
        assert psnr(eager, captured) >= 60


def test_one_seed_per_image_keeps_each_images_own_seed(ort_fp32):
    """Requests batched into one call (a server's batching) keep their seeds: same images as separate calls."""
    batched = ort_fp32([PROMPT, "a dog"], steps=2, seed=[5, 9], height=HEIGHT, width=WIDTH, scheduler="euler_a")
    alone = ort_fp32("a dog", steps=2, seed=9, height=HEIGHT, width=WIDTH, scheduler="euler_a")
    assert batched.seeds == [5, 9]
    assert psnr(batched.pixels[1:], alone.pixels) >= 60
    with pytest.raises(ConfigError, match="got 1 seeds for 2 images"):
        ort_fp32([PROMPT, "a dog"], steps=1, seed=[5], height=HEIGHT, width=WIDTH)
    with pytest.raises(ConfigError, match="seed must be an integer or a list of integers"):
        ort_fp32(PROMPT, steps=1, seed="7", height=HEIGHT, width=WIDTH)


class _CountingEngine:
    """Forwards to an engine and counts its calls (the kind of wrapper ``wrap_engine`` is for)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.graph_capturable = False

    def infer(self, feeds):
        self.calls += 1
        return self.engine.infer(feeds)

    def close(self):
        self.engine.close()


def test_wrap_engine_reaches_a_cached_denoiser(tiny_fp32):
    """A wrapper put in after a first call (a denoiser is cached by then) sees every UNet call of the next."""
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        before = pipe(PROMPT, steps=2, seed=3, height=HEIGHT, width=WIDTH, scheduler="euler")
        assert len(pipe._denoisers) == 1
        counter = pipe.wrap_engine("unet", _CountingEngine)
        assert pipe.engines["unet"] is counter and len(pipe._denoisers) == 0
        after = pipe(PROMPT, steps=2, seed=3, height=HEIGHT, width=WIDTH, scheduler="euler")
        assert counter.calls == 2
        assert torch.equal(before.pixels, after.pixels)
        with pytest.raises(ConfigError, match="no engine 'controlnet' in this pipeline"):
            pipe.wrap_engine("controlnet", _CountingEngine)
