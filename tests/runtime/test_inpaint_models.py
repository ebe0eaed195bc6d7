"""Inpainting models (9-channel UNets): what describes them, and loading them from presets, diffusers folders
and original-layout single files (recognised by the input convolution's shape, with no flag)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdtrt.runtime.errors import ArtifactError, ShapeError, SourceError  # noqa: E402
from sdtrt.runtime.manifest import Manifest, read_manifest  # noqa: E402
from sdtrt.runtime.models.bundle import model_info  # noqa: E402
from sdtrt.runtime.models.presets import TINY_UNET, TINY_VAE, load_preset  # noqa: E402
from sdtrt.runtime.models.single_file import read_state_dict, save_original_checkpoint  # noqa: E402
from sdtrt.runtime.models.sources import load_checkpoint, load_source  # noqa: E402
from sdtrt.runtime.pipeline import Pipeline  # noqa: E402
from sdtrt.runtime.specs import ModelInfo, component_spec, component_specs, required_components  # noqa: E402


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# -- the description ---------------------------------------------------------------------------------------------
def test_unet_input_channels_default_to_the_latents_and_old_manifests_still_read(tiny_fp32):
    assert ModelInfo().unet_in_channels == 4 and not ModelInfo().inpainting
    assert ModelInfo(unet_in_channels=4) == ModelInfo()  # 0 and 4 mean the same: manifests compare equal
    data = json.loads((tiny_fp32 / "manifest.json").read_text())
    assert data["model"]["unet_in_channels"] == 4
    del data["model"]["unet_in_channels"]  # as written before the field existed
    old = Manifest.from_dict(data)
    assert old.model == read_manifest(tiny_fp32).model and not old.model.inpainting
    assert old.model.condition_channels == 0


def test_inpainting_is_latents_mask_and_masked_image_latents():
    model = ModelInfo(unet_in_channels=9)
    assert model.inpainting and model.condition_channels == 5
    assert ModelInfo(latent_channels=16, unet_in_channels=33).inpainting  # 2 x latents + 1 for any latent width
    with pytest.raises(ShapeError, match=r"UNet takes 7 input channels but the latents have 4: expected 4 .* or 9"):
        ModelInfo(unet_in_channels=7)


def test_specs_widen_the_unet_sample_only():
    model = ModelInfo(unet_in_channels=9, cache_branch=0, cache_feature=(32, 1))
    specs = component_specs(model)
    for name in ("unet", "unet_shallow"):
        assert specs[name].input("sample").shape == ("unet_batch", 9, "latent_height", "latent_width")
        assert specs[name].outputs[0].shape == ("unet_batch", 4, "latent_height", "latent_width")
    assert specs["vae_decoder"].inputs[0].shape[1] == 4 and specs["vae_encoder"].outputs[0].shape[1] == 4
    # a ControlNet beside an inpainting UNet reads the latents alone
    control = component_spec(dataclasses.replace(model, control_residuals=((32, 1),)), "controlnet_edges")
    assert control.input("sample").shape[1] == 4


def test_an_inpainting_model_requires_the_vae_encoder():
    assert "vae_encoder" in required_components(ModelInfo(unet_in_channels=9))
    assert "vae_encoder" not in required_components(ModelInfo())
    xl = ModelInfo(family="sdxl", text_width_2=32, add_text_embeds_width=24, add_time_ids=6, unet_in_channels=9)
    assert required_components(xl) == ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def test_inpainting_artifact_without_vae_encoder_is_refused(tiny_inpaint_fp32, tmp_path):
    import shutil

    folder = tmp_path / "no-encoder"
    shutil.copytree(tiny_inpaint_fp32, folder)
    data = json.loads((folder / "manifest.json").read_text())
    del data["components"]["vae_encoder"]
    (folder / "manifest.json").write_text(json.dumps(data))
    why = r"no 'vae_encoder' component \(an inpainting model encodes the masked image on every call\)"
    with pytest.raises(ArtifactError, match=why + ".*export it with --components vae_encoder"):
        Pipeline.from_artifacts(folder)


# -- loading -----------------------------------------------------------------------------------------------------
def test_latent_channels_come_from_the_vae_and_a_mismatched_unet_is_refused(tiny_inpaint_bundle):
    b = tiny_inpaint_bundle
    assert b.model.latent_channels == 4 and b.model.unet_in_channels == 9 and b.model.inpainting
    with torch.random.fork_rng(devices=[]):
        odd = diffusers.UNet2DConditionModel(**{**TINY_UNET, "in_channels": 5})
    with pytest.raises(SourceError, match=r"UNet takes 5 channels and gives 4, but the VAE's latents have 4"):
        model_info(b.text_encoder, odd, b.vae, b.scheduler_config)
    with torch.random.fork_rng(devices=[]):
        vae8 = diffusers.AutoencoderKL(**{**TINY_VAE, "latent_channels": 8})
    with pytest.raises(SourceError, match=r"expected 8 in .* or 17 .* and 8 out"):
        model_info(b.text_encoder, b.unet, vae8, b.scheduler_config)


def test_every_extra_input_channel_changes_the_prediction(tiny_inpaint_bundle):
    """The preset's mask and masked-image channels carry weight: feeding them wrongly changes the output."""
    unet = tiny_inpaint_bundle.unet
    weight = unet.conv_in.weight
    assert weight.shape[1] == 9 and all(float(weight[:, c].abs().min()) > 0 for c in range(9))
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 9, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = unet(sample, 500, context).sample
        for channels in (slice(4, 5), slice(5, 9)):  # the mask, the masked image's latents
            other = sample.clone()
            other[:, channels] = torch.randn_like(other[:, channels])
            changed = unet(other, 500, context).sample
            assert base.shape == (1, 4, 8, 8)
            assert float((changed - base).norm() / base.norm()) > 0.01


def test_xl_inpaint_preset_is_sdxl_with_nine_channels():
    b = load_preset("tiny-xl-inpaint")
    assert b.model.family == "sdxl" and b.model.inpainting and b.text_encoder_2 is not None


def test_diffusers_folder_of_an_inpainting_model_loads(tiny_inpaint_bundle, tiny_inpaint_files):
    index = json.loads((tiny_inpaint_files["folder"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    loaded = load_source(str(tiny_inpaint_files["folder"]))
    assert loaded.model == tiny_inpaint_bundle.model
    for name in ("text_encoder", "unet", "vae"):
        same_weights(getattr(loaded, name), getattr(tiny_inpaint_bundle, name))


def test_single_file_is_recognised_by_its_input_conv_and_equals_the_folder(tiny_inpaint_files):
    checkpoint, config = tiny_inpaint_files["checkpoint"], tiny_inpaint_files["config"]
    state = read_state_dict(checkpoint)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert json.loads((config / "unet" / "config.json").read_text())["in_channels"] == 4  # the base model's
    single = load_checkpoint(checkpoint, config_dir=config)
    folder = load_source(str(tiny_inpaint_files["folder"]))
    assert single.model.unet_in_channels == 9 and single.model == folder.model
    for name in ("text_encoder", "unet", "vae"):
        same_weights(getattr(single, name), getattr(folder, name))
    assert single.unet.config.in_channels == 9


def test_sdxl_single_file_is_recognised_by_its_input_conv(tmp_path):
    from sdtrt.runtime.models.single_file_xl import save_sdxl_checkpoint, write_sdxl_config_dir

    b, base = load_preset("tiny-xl-inpaint"), load_preset("tiny-xl")
    checkpoint = save_sdxl_checkpoint(b.text_encoder, b.text_encoder_2, b.unet, b.vae, tmp_path / "xl.safetensors")
    config = write_sdxl_config_dir(base.text_encoder, base.text_encoder_2, base.unet, base.vae, tmp_path / "cfg")
    loaded = load_checkpoint(checkpoint, config_dir=config)
    assert loaded.model == b.model and loaded.model.inpainting
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        same_weights(getattr(loaded, name), getattr(b, name))


def test_single_file_with_an_odd_input_conv_names_both_widths(tiny_inpaint_bundle, tiny_inpaint_files, tmp_path):
    b = tiny_inpaint_bundle
    with torch.random.fork_rng(devices=[]):
        odd = diffusers.UNet2DConditionModel(**{**TINY_UNET, "in_channels": 6}).eval()
    checkpoint = save_original_checkpoint(b.text_encoder, odd, b.vae, tmp_path / "odd.safetensors")
    with pytest.raises(SourceError, match=r"UNet takes 6 channels .* latents have 4: expected 4 in .* or 9"):
        load_checkpoint(checkpoint, config_dir=tiny_inpaint_files["config"])


# -- parity with diffusers ---------------------------------------------------------------------------------------
# diffusers' StableDiffusionInpaintPipeline (and the SDXL one) with a 9-channel UNet feed it [latents, mask,
# masked-image latents] at every step, the mask resized to the latent grid (nearest) and the masked image being
# image * (mask < 0.5); sdtrt does the same. What reproduces A1111's behaviour: mask_blur 0 and a mask aligned to
# the 8-pixel latent grid (A1111 blurs and resizes its mask; no resize method can change an aligned block mask),
# strength < 1 (at 1 diffusers starts from pure noise where A1111 and sdtrt noise the init image), the same sampler
# and seed, and the composite A1111 applies afterwards (the init image outside the mask) over diffusers' output.
PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 64, 128
STEPS = 8
BOX = (16, 8, 72, 48)  # left, top, right, bottom: multiples of 8


def init_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def block_mask():
    from PIL import Image

    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, BOX)
    return mask


def unit(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def diffusers_inpaint(bundle, scheduler: str, seed: int, strength: float, **extra) -> torch.Tensor:
    """diffusers' inpainting pipeline, then A1111's composite: the init image outside the mask."""
    from sdtrt.runtime.models.reference import inpaint_pipeline

    pipe = inpaint_pipeline(bundle, scheduler)
    with torch.no_grad():
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=init_image(),
            mask_image=block_mask(),
            height=HEIGHT,
            width=WIDTH,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
            **extra,
        ).images.float()
    alpha = unit(block_mask())[:, :1]
    return alpha * out + (1 - alpha) * unit(init_image())


def sdtrt_inpaint(pipe, scheduler: str, seed: int, strength: float, **inpaint):
    from sdtrt.runtime.inpaint import Inpaint

    options = {"mask": block_mask(), "blur": 0, **inpaint}
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        seed=seed,
        height=HEIGHT,
        width=WIDTH,
        scheduler=scheduler,
        image=init_image(),
        strength=strength,
        inpaint=Inpaint(**options),
    )


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_inpaint_fp32):
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(tiny_inpaint_fp32, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_inpainting_model_matches_diffusers_inpaint_pipeline(inpaint_pipe, tiny_inpaint_bundle, scheduler):
    from sdtrt.runtime.compare import psnr

    result = sdtrt_inpaint(inpaint_pipe, scheduler, seed=11, strength=0.6)
    expected = diffusers_inpaint(tiny_inpaint_bundle, scheduler, 11, 0.6)
    left, top, right, bottom = BOX
    inside = psnr(result.pixels[..., top:bottom, left:right], expected[..., top:bottom, left:right])
    assert psnr(result.pixels, expected) >= 40 and inside >= 40


def test_parity_fails_when_the_masked_image_is_not_fed(inpaint_pipe, tiny_inpaint_bundle):
    """The check above has teeth: diffusers given blank masked-image latents (Euler draws nothing after them, so
    only the UNet's extra input differs) is far from sdtrt's image inside the mask."""
    from sdtrt.runtime.compare import psnr

    result = sdtrt_inpaint(inpaint_pipe, "euler", seed=11, strength=0.6)
    blank = torch.zeros(1, 4, HEIGHT // 8, WIDTH // 8)
    wrong = diffusers_inpaint(tiny_inpaint_bundle, "euler", 11, 0.6, masked_image_latents=blank)
    left, top, right, bottom = BOX
    assert psnr(result.pixels[..., top:bottom, left:right], wrong[..., top:bottom, left:right]) < 30


@pytest.fixture(scope="module")
def xl_inpaint():
    return load_preset("tiny-xl-inpaint")


@pytest.fixture(scope="module")
def xl_inpaint_pipe(tmp_path_factory, xl_inpaint):
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.pipeline import Pipeline

    out = tmp_path_factory.mktemp("xl-inpaint") / "fp32"
    options = ExportOptions(profile=default_profile(xl_inpaint), precision="fp32", step_cache=False)
    export_artifacts(xl_inpaint, out, options)
    with Pipeline.from_artifacts(out, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_sdxl_inpainting_model_matches_diffusers_xl_inpaint_pipeline(xl_inpaint_pipe, xl_inpaint, scheduler):
    """StableDiffusionXLInpaintPipeline with requires_aesthetics_score False (the UNet takes the base model's six
    time ids: original size, crop, target size, as sdtrt sends them) and the options above."""
    from sdtrt.runtime.compare import psnr

    result = sdtrt_inpaint(xl_inpaint_pipe, scheduler, seed=3, strength=0.7)
    expected = diffusers_inpaint(xl_inpaint, scheduler, 3, 0.7)
    left, top, right, bottom = BOX
    inside = psnr(result.pixels[..., top:bottom, left:right], expected[..., top:bottom, left:right])
    assert psnr(result.pixels, expected) >= 40 and inside >= 40


class _FeedRecorder:
    """Keeps what the UNet is fed (a copy of ``sample`` per call)."""

    def __init__(self, engine) -> None:
        self.engine, self.samples = engine, []
        self.inputs, self.outputs, self.graph_capturable = engine.inputs, engine.outputs, False

    def infer(self, feeds):
        self.samples.append(feeds["sample"].clone())
        return self.engine.infer(feeds)

    def close(self) -> None:
        self.engine.close()


@pytest.mark.parametrize("img2img", [False, True])
def test_an_inpainting_model_without_a_mask_gets_the_full_mask_and_a_blank_image(tiny_inpaint_fp32, img2img):
    """As A1111 conditions txt2img and unmasked img2img on an inpainting model: mask channel 1 everywhere, and the
    latents of a blank (0 in [-1, 1]) image, the VAE's mean."""
    with Pipeline.from_artifacts(tiny_inpaint_fp32, device="cpu") as pipe:
        recorder = pipe.wrap_engine("unet", _FeedRecorder)
        extra = {"image": init_image(), "strength": 0.5} if img2img else {}
        result = pipe("a cat", steps=4, seed=1, height=64, width=128, scheduler="euler", **extra)
        encoder = pipe.engines["vae_encoder"]
        blank = encoder.infer({"image": torch.zeros((1, 3, 64, 128))})["latent_mean"].float()
        scaling = pipe.manifest.model.scaling_factor
    assert len(recorder.samples) == (2 if img2img else 4) and result.pixels.shape == (1, 3, 64, 128)
    for sample in recorder.samples:
        assert sample.shape == (2, 9, 8, 16)
        assert torch.equal(sample[:, 4], torch.ones((2, 8, 16)))
        torch.testing.assert_close(sample[:, 5:], (blank * scaling).expand(2, -1, -1, -1), rtol=1e-5, atol=1e-5)
