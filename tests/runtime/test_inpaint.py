"""Inpainting with a regular model: parity with diffusers' StableDiffusionInpaintPipeline on the same tiny weights,
the pixels outside the mask, A1111's options (blur, invert, fill, only masked) and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.inpaint import FILLS, Inpaint, crop_box
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.schedulers import DIFFUSERS_SCHEDULERS

PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 64, 128
STEPS = 8


def init_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def block_mask(box=(16, 8, 72, 48)) -> Image.Image:
    """White (repaint) in ``box``, aligned to the 8-pixel latent grid so no resize method can change it."""
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, box)
    return mask


def unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """diffusers' StableDiffusionInpaintPipeline over the tiny model's modules (a 4-channel UNet)."""
    diffusers = pytest.importorskip("diffusers")
    base = diffusers_pipeline(tiny_bundle, "euler")
    inpaint = diffusers.StableDiffusionInpaintPipeline(**base.components)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.base_scheduler_config = dict(tiny_bundle.scheduler_config)
    return inpaint


def run_reference(reference, scheduler: str, seed: int, image, mask, strength: float) -> torch.Tensor:
    """diffusers' inpainting, then the composite sdtrt (and A1111) applies: the init image outside the mask."""
    import diffusers

    cls_name, kwargs = DIFFUSERS_SCHEDULERS[scheduler]
    reference.scheduler = getattr(diffusers, cls_name).from_config(reference.base_scheduler_config, **kwargs)
    with torch.no_grad():
        out = reference(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=image,
            mask_image=mask,
            height=HEIGHT,
            width=WIDTH,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
        ).images.float()
    alpha = unit(mask)[:, :1]
    return alpha * out + (1 - alpha) * unit(image)


def run(pipe, scheduler="euler", seed=5, strength=0.6, **inpaint):
    image = inpaint.pop("image", init_image())
    options = {"mask": block_mask(), "blur": 0, **inpaint}
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        seed=seed,
        height=HEIGHT,
        width=WIDTH,
        scheduler=scheduler,
        image=image,
        strength=strength,
        inpaint=Inpaint(**options),
    )


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"])
def test_masked_generation_matches_diffusers_inpaint_pipeline(pipe, reference, scheduler):
    """diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet blends each step with the init latents
    noised to the next step's level, as sdtrt does; mask_blur 0 and a grid-aligned mask, strength < 1 (at 1,
    diffusers starts from pure noise where A1111 and sdtrt noise the image), the same sampler and seed. Euler a
    checks the draw order too (its per-step noise comes after the masked image's VAE sample)."""
    result = run(pipe, scheduler, seed=11)
    expected = run_reference(reference, scheduler, 11, init_image(), block_mask(), 0.6)
    assert psnr(result.pixels, expected) >= 40
    inside = block_mask().crop((16, 8, 72, 48))
    assert inside.getextrema() == (255, 255)
    assert psnr(result.pixels[..., 8:48, 16:72], expected[..., 8:48, 16:72]) >= 40


def test_outside_the_mask_the_image_is_the_init_image(pipe):
    src = np.asarray(init_image()).astype(int)
    plain = np.asarray(
        pipe(PROMPT, steps=STEPS, seed=5, height=HEIGHT, width=WIDTH, scheduler="euler", image=init_image(),
             strength=0.6).images[0]
    ).astype(int)  # fmt: skip
    out = np.asarray(run(pipe, seed=5).images[0]).astype(int)
    inside = np.asarray(block_mask()) > 0
    assert np.abs(out - src)[~inside].max() == 0  # blur 0: the composite keeps every outside pixel
    assert np.abs(out - src)[inside].mean() > 20  # and the masked region was generated
    assert np.abs(plain - src)[~inside].mean() > 20  # img2img without a mask changes everything
    # with a blur, pixels the blurred mask does not reach are untouched; the edge is a blend
    blurred = run(pipe, seed=5, blur=4)
    alpha = np.asarray(block_mask().filter(ImageFilter.GaussianBlur(4)))
    out = np.asarray(blurred.images[0]).astype(int)
    assert np.abs(out - src)[alpha == 0].max() == 0
    assert np.abs(out - src)[alpha == 255].mean() > 20


def test_invert_repaints_the_other_part(pipe):
    src = np.asarray(init_image()).astype(int)
    inverted = Image.eval(block_mask(), lambda v: 255 - v)
    out = np.asarray(run(pipe, mask=inverted, invert=True).images[0]).astype(int)
    np.testing.assert_array_equal(out, np.asarray(run(pipe).images[0]))  # inverting twice = the mask itself
    inside = np.asarray(block_mask()) > 0
    assert np.abs(out - src)[~inside].max() == 0


def test_each_fill_starts_the_masked_region_differently(pipe):
    src = np.asarray(init_image()).astype(int)
    inside = np.asarray(block_mask()) > 0
    outs = {fill: np.asarray(run(pipe, fill=fill, strength=0.5).images[0]).astype(int) for fill in FILLS}
    for fill, out in outs.items():
        assert np.abs(out - src)[~inside].max() == 0, fill
    for a in FILLS:
        for b in FILLS:
            if a < b:
                assert np.abs(outs[a] - outs[b])[inside].mean() > 1, (a, b)


def test_only_masked_generates_the_crop_and_pastes_it_back(pipe):
    big = init_image().resize((256, 128))
    mask = Image.new("L", big.size, 0)
    mask.paste(255, (150, 40, 190, 80))
    box = crop_box(mask, 8, WIDTH, HEIGHT)
    assert box == (114, 32, 226, 88)  # the mask's box padded by 8 is 142..198 x 32..88, widened to 2:1 around it
    result = run(pipe, image=big, mask=mask, only_masked=True, padding=8, blur=2)
    out, src = np.asarray(result.images[0]).astype(int), np.asarray(big).astype(int)
    assert result.images[0].size == big.size  # the init image's size, not the generation's
    reach = np.asarray(mask.filter(ImageFilter.GaussianBlur(2)))
    assert np.abs(out - src)[reach == 0].max() == 0
    assert np.abs(out - src)[reach == 255].mean() > 20


def test_a_batch_keeps_each_images_seed(pipe):
    batch = pipe(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=[3, 4], num_images=2, height=HEIGHT,
                 width=WIDTH, scheduler="euler", image=init_image(), strength=0.6,
                 inpaint=Inpaint(block_mask(), blur=0))  # fmt: skip
    one = run(pipe, seed=4)
    assert psnr(batch.pixels[1:], one.pixels) >= 60


@pytest.mark.parametrize(
    ("options", "image", "match"),
    [
        ({"mask": block_mask()}, None, "needs the init image"),
        ({"mask": Image.new("L", (32, 32), 255)}, init_image(), "the mask is 32x32 but the init image is 128x64"),
        ({"mask": Image.new("L", (WIDTH, HEIGHT), 0)}, init_image(), "repaints nothing"),
        ({"mask": Image.new("L", (WIDTH, HEIGHT), 255), "invert": True}, init_image(), "once inverted"),
        ({"mask": block_mask((60, 30, 62, 32)), "blur": 0}, init_image(), "smaller than one latent pixel"),
    ],
)
def test_bad_masks_are_refused_before_any_work(pipe, options, image, match):
    calls = []
    unet = pipe.engines["unet"]
    real = unet.infer
    unet.infer = lambda feeds: calls.append(1) or real(feeds)
    try:
        with pytest.raises(ConfigError, match=match):
            pipe(PROMPT, steps=STEPS, seed=1, height=HEIGHT, width=WIDTH, image=image, inpaint=Inpaint(**options))
    finally:
        unet.infer = real
    assert calls == []


@pytest.mark.parametrize(
    ("options", "match"),
    [({"fill": "zeros"}, "inpainting fill must be one of"), ({"blur": -1}, "mask blur must be"),
     ({"padding": 1.5}, "mask padding must be"), ({"mask": "mask.png"}, "must be an image")],
)  # fmt: skip
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        Inpaint(**{"mask": block_mask(), **options})


@pytest.mark.gpu
def test_the_masked_step_replays_as_a_cuda_graph(tiny_fp32):
    """The blend's mask, init latents, noise and levels are static buffers: the captured step equals eager."""
    results = []
    for graph in (True, False):
        with Pipeline.from_artifacts(tiny_fp32, backend="torch", device="cuda", cuda_graph=graph) as p:
            results.append(run(p, seed=9).pixels)
            assert (p._denoisers.values()[0].graph is not None) == graph
    assert psnr(results[0], results[1]) >= 50
