"""SDXL end to end on ``tiny-xl``: export, check, and the runtime against diffusers' StableDiffusionXLPipeline.

Same weights, seed, prompts (empty negative included) and sampler must give the same image as diffusers (fp32,
PSNR >= 40 dB), with and without guidance, with the micro-conditioning changed, and for a Turbo-configured model
saved as a diffusers folder and as a single-file checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtrt.export.check import check_artifacts
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.export.profiles import default_profile
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import ConfigError, ExportError, ShapeError, SourceError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.models.presets import config_folder, load_preset, shipped_config
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.prompts import PromptTokenizer
from sdtrt.runtime.specs import control_input_names

pytest.importorskip("diffusers")

PROMPT = "a red circle on a blue background"
SIZE = 128  # tiny-xl's native size: UNet sample size 16 x VAE factor 8
PARITY_DB = 40.0


def export(bundle, out: Path, precision: str, **options) -> Path:
    export_artifacts(bundle, out, ExportOptions(profile=default_profile(bundle), precision=precision, **options))
    return out


@pytest.fixture(scope="module")
def xl_bundle():
    return load_preset("tiny-xl")


@pytest.fixture(scope="module")
def xl_fp32(tmp_path_factory, xl_bundle) -> Path:
    return export(xl_bundle, tmp_path_factory.mktemp("xl") / "fp32", "fp32")


@pytest.fixture(scope="module")
def xl_fp16(tmp_path_factory, xl_bundle) -> Path:
    return export(xl_bundle, tmp_path_factory.mktemp("xl") / "fp16", "fp16")


@pytest.fixture(scope="module")
def reference(xl_bundle):
    return diffusers_pipeline(xl_bundle, "euler")


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def pipe(request, xl_fp32):
    with Pipeline.from_artifacts(xl_fp32, backend=request.param, device="cpu") as opened:
        yield opened


def run_reference(reference, seed: int, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = reference(prompt=PROMPT, height=SIZE, width=SIZE, generator=generator, output_type="pt", **kwargs)
    return out.images.float()


# -- export and check ------------------------------------------------------------------------------------------


def test_fp16_artifact_keeps_the_vae_fp32_and_both_tokenizers(xl_fp16):
    manifest = read_manifest(xl_fp16)
    precisions = {name: entry.precision for name, entry in manifest.components.items()}
    assert precisions == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet": "fp16",
        "unet_shallow": "fp16",  # step caching's shallow UNet, exported by default
        "vae_decoder": "fp32",  # SDXL's VAE overflows in fp16: force_upcast keeps it fp32
        "vae_encoder": "fp32",
    }
    assert manifest.precision == "fp16"
    unet = manifest.components["unet"]
    residuals = list(control_input_names(manifest.model))
    assert [t.name for t in unet.inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", *residuals
    ]  # fmt: skip
    assert len(residuals) == 5  # tiny-xl: conv_in, 2 x (1 resnet), 1 downsampler, middle
    assert unet.shapes["text_embeds"]["max"] == [8, 24]  # 2 x max batch 4, pooled width 24
    assert unet.shapes["encoder_hidden_states"]["max"] == [8, 77 * 3, 64]  # 3 prompt windows, 32 + 32 wide
    second = PromptTokenizer.from_file(xl_fp16 / manifest.tokenizer_2)
    first = PromptTokenizer.from_file(xl_fp16 / manifest.tokenizer)
    assert (first.pad_id, second.pad_id) == (49407, 0)  # OpenCLIP pads with "!" (id 0)


def test_vae_precision_can_be_forced_or_follow_an_fp16_safe_vae(tmp_path, xl_bundle):
    forced = export(xl_bundle, tmp_path / "forced", "fp16", components=("vae_decoder",), vae_precision="fp16")
    assert read_manifest(forced).components["vae_decoder"].precision == "fp16"
    safe = dataclasses.replace(xl_bundle, model=dataclasses.replace(xl_bundle.model, upcast_vae=False))
    fixed = export(safe, tmp_path / "fixed", "fp16", components=("vae_decoder",))
    assert read_manifest(fixed).components["vae_decoder"].precision == "fp16"
    with pytest.raises(ExportError, match="VAE precision must be one of auto, fp32, fp16"):
        ExportOptions(vae_precision="bf16")


def test_sd1_model_has_no_second_encoder_to_export(tmp_path, tiny_bundle):
    with pytest.raises(ExportError, match="this sd1 model has no component text_encoder_2"):
        export(tiny_bundle, tmp_path / "x", "fp32", components=("text_encoder_2",))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_covers_every_component(precision, xl_fp32, xl_fp16, xl_bundle):
    rows = check_artifacts(xl_fp32 if precision == "fp32" else xl_fp16, bundle=xl_bundle)
    every = {"text_encoder", "text_encoder_2", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
    assert {r.component for r in rows} == every
    assert {(r.component, r.output) for r in rows} >= {
        ("text_encoder", "penultimate_hidden_state"),
        ("text_encoder_2", "penultimate_hidden_state"),
        ("text_encoder_2", "text_embeds"),
    }
    failed = [r for r in rows if not r.passed]
    assert not failed, failed


# -- the runtime against diffusers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("negative", "guidance"),
    [(None, 5.0), ("", 5.0), ("blurry, low quality", 5.0), (None, 0.0)],
    ids=["no-negative", "empty-negative", "negative", "no-guidance"],
)
def test_matches_diffusers(pipe, reference, negative, guidance):
    result = pipe(PROMPT, negative_prompt=negative, steps=4, guidance_scale=guidance, seed=3, scheduler="euler")
    expected = run_reference(reference, 3, negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance)
    value = psnr(result.pixels, expected)
    print(f"{pipe.backend} fp32 negative={negative!r} cfg={guidance} vs diffusers SDXL: {value:.1f} dB")
    assert value >= PARITY_DB
    assert result.settings.time_ids == (SIZE, SIZE, 0, 0, SIZE, SIZE)


def test_no_negative_prompt_means_zero_conditioning(pipe):
    """force_zeros_for_empty_prompt: negative_prompt=None is zeros, an explicit "" is encoded (diffusers' rule)."""
    zeroed = pipe(PROMPT, steps=3, guidance_scale=5.0, seed=4, scheduler="euler")
    encoded = pipe(PROMPT, negative_prompt="", steps=3, guidance_scale=5.0, seed=4, scheduler="euler")
    assert zeroed.settings.zero_negative and not encoded.settings.zero_negative
    assert psnr(zeroed.pixels, encoded.pixels) < 60  # really different conditioning


def test_micro_conditioning_matches_diffusers(pipe, reference):
    sizes = {"original_size": (64, 96), "crops_coords_top_left": (8, 16), "target_size": (128, 128)}
    result = pipe(PROMPT, steps=3, guidance_scale=5.0, seed=6, scheduler="euler", **sizes)
    expected = run_reference(reference, 6, num_inference_steps=3, guidance_scale=5.0, **sizes)
    assert result.settings.time_ids == (64, 96, 8, 16, 128, 128)
    assert psnr(result.pixels, expected) >= PARITY_DB
    default = pipe(PROMPT, steps=3, guidance_scale=5.0, seed=6, scheduler="euler")
    assert psnr(default.pixels, result.pixels) < 60  # the time ids reach the UNet


def test_batch_of_prompts_and_images(pipe, reference):
    result = pipe([PROMPT, "a green square"], steps=2, guidance_scale=5.0, seed=9, scheduler="euler", num_images=2)
    assert result.seeds == [9, 10, 11, 12] and len(result.images) == 4
    single = pipe("a green square", steps=2, guidance_scale=5.0, seed=11, scheduler="euler")
    assert psnr(result.pixels[2:3], single.pixels) >= 60


def test_fp16_artifact_is_close_to_fp32(xl_fp16, xl_fp32):
    with (
        Pipeline.from_artifacts(xl_fp16, device="cpu") as half,
        Pipeline.from_artifacts(xl_fp32, device="cpu") as full,
    ):
        a = half(PROMPT, steps=4, guidance_scale=5.0, seed=2)
        b = full(PROMPT, steps=4, guidance_scale=5.0, seed=2)
    value = psnr(a.pixels, b.pixels)
    print(f"tiny-xl fp16 vs fp32: {value:.1f} dB")
    assert value >= 40


def test_sdxl_conditioning_is_refused_elsewhere_and_checked(tiny_fp32, xl_fp32):
    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as sd1:
        with pytest.raises(ConfigError, match="are SDXL conditioning; this is a sd1 model"):
            sd1("a cat", steps=1, original_size=(512, 512))
    with Pipeline.from_artifacts(xl_fp32, device="cpu") as xl:
        with pytest.raises(ConfigError, match=r"original_size must be two integers >= 0 \(height, width\)"):
            xl("a cat", steps=1, original_size=(512,))
        with pytest.raises(ShapeError, match="image size must be positive, got 0x0"):
            xl("a cat", steps=1, height=0, width=0)


# -- sources: a diffusers SDXL-Turbo folder and a single-file checkpoint --------------------------------------------


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory) -> Path:
    """tiny-xl with SDXL-Turbo's scheduler, saved by StableDiffusionXLPipeline.save_pretrained."""
    bundle = load_preset("tiny-xl")
    bundle.scheduler_config = json.loads(
        (shipped_config("sdxl-turbo") / "scheduler" / "scheduler_config.json").read_text()
    )
    folder = tmp_path_factory.mktemp("turbo") / "tiny-xl-turbo"
    diffusers_pipeline(bundle, "euler_a").save_pretrained(folder, safe_serialization=True)
    return folder


def test_turbo_folder_one_step_matches_diffusers(tmp_path, turbo_folder):
    import diffusers

    from sdtrt.runtime.models.sources import load_source

    bundle = load_source(str(turbo_folder))
    assert bundle.model.family == "sdxl" and bundle.model.force_zeros_for_empty_prompt
    assert bundle.tokenizer_2.padding["pad_id"] == 0  # from tokenizer_2/tokenizer_config.json
    out = export(bundle, tmp_path / "turbo", "fp32")
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(turbo_folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with Pipeline.from_artifacts(out, device="cpu") as pipe:
        assert pipe.default_scheduler == "euler_a"  # EulerAncestralDiscreteScheduler
        assert pipe.scheduler_config.timestep_spacing == "trailing"
        result = pipe(PROMPT, steps=1, guidance_scale=0.0, seed=5)  # the one-step generation
    assert result.settings.scheduler == "euler_a"
    assert (result.settings.height, result.settings.width) == (SIZE, SIZE)  # the model's native size
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        expected = reference(
            PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=generator, output_type="pt"
        ).images
    value = psnr(result.pixels, expected)
    print(f"tiny-xl turbo 1 step vs diffusers: {value:.1f} dB")
    assert value >= PARITY_DB


def test_sdxl_folder_missing_a_part_is_refused(tmp_path, turbo_folder):
    import shutil

    from sdtrt.runtime.models.sources import load_source

    broken = tmp_path / "broken"
    shutil.copytree(turbo_folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(SourceError, match="is an SDXL folder .* but lacks tokenizer_2"):
        load_source(str(broken))


def test_single_file_checkpoint_exports_the_same_model(tmp_path, xl_bundle, xl_fp32):
    from sdtrt.runtime.models.single_file_xl import save_sdxl_checkpoint, write_sdxl_config_dir
    from sdtrt.runtime.models.sources import load_source

    path = save_sdxl_checkpoint(
        xl_bundle.text_encoder, xl_bundle.text_encoder_2, xl_bundle.unet, xl_bundle.vae, tmp_path / "xl.safetensors"
    )
    configs = write_sdxl_config_dir(
        xl_bundle.text_encoder, xl_bundle.text_encoder_2, xl_bundle.unet, xl_bundle.vae, tmp_path / "configs"
    )
    bundle = load_source(str(path), config_dir=configs)
    assert bundle.model == xl_bundle.model
    assert bundle.source["kind"] == "single_file"
    out = export(bundle, tmp_path / "art", "fp32", components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"))
    with (
        Pipeline.from_artifacts(out, device="cpu") as converted,
        Pipeline.from_artifacts(xl_fp32, device="cpu") as original,
    ):
        a = converted(PROMPT, steps=2, guidance_scale=5.0, seed=1)
        b = original(PROMPT, steps=2, guidance_scale=5.0, seed=1)
    assert a.settings.scheduler == "euler"  # the shipped SDXL config: EulerDiscreteScheduler
    assert psnr(a.pixels, b.pixels) >= 90


def test_shipped_config_names(tmp_path):
    assert config_folder("sdxl-turbo", "sd15") == shipped_config("sdxl-turbo")
    assert config_folder(None, "sdxl") == shipped_config("sdxl")
    with pytest.raises(SourceError, match="neither a shipped config .*sd15, sdxl, sdxl-turbo"):
        config_folder("sdxl-lightning", "sd15")
    with pytest.raises(SourceError, match="no shipped config 'sdxl-lightning'; the shipped configs are sd15, sdxl"):
        shipped_config("sdxl-lightning")


# -- long prompts ----------------------------------------------------------------------------------------------


def test_long_prompts_fill_three_windows_then_warn(xl_fp32, caplog):
    with Pipeline.from_artifacts(xl_fp32, device="cpu") as pipe:
        long = " ".join(["red"] * 200)
        text, pooled = pipe.encode_prompts([long])
        assert text.shape == (1, 3 * 77, 64) and pooled is not None and pooled.shape == (1, 24)
        assert not caplog.records
        with caplog.at_level(logging.WARNING, logger="sdtrt.runtime.prompts"):
            text, _ = pipe.encode_prompts([" ".join(["red"] * 300)])
        assert text.shape == (1, 3 * 77, 64)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1  # once, not once per tokenizer
        assert "dropped the last 75 tokens" in warnings[0] and "--max-prompt-windows 4" in warnings[0]


# -- the command line ----------------------------------------------------------------------------------------------

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def sdtrt(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SDTRT, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_one_step_generation_and_bad_sizes(xl_fp32, tmp_path):
    out = tmp_path / "turbo.png"
    done = sdtrt("generate", xl_fp32, PROMPT, "--steps", 1, "--cfg", 0, "--seed", 1, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "128x128, 1 steps, euler" in done.stdout  # size and sampler from the model
    from PIL import Image

    assert Image.open(out).size == (SIZE, SIZE)
    for size in ("0x0", "-64x64", "0"):
        bad = sdtrt("generate", xl_fp32, PROMPT, "--size", size, "--out", tmp_path / "x.png")
        assert bad.returncode == 1 and "sizes must be positive pixel counts" in bad.stderr, bad.stderr
    crop = sdtrt("generate", xl_fp32, PROMPT, "--steps", 1, "--crop", "8", "--out", tmp_path / "y.png")
    assert crop.returncode == 1 and "expected WIDTHxHEIGHT (--crop)" in crop.stderr


def test_cli_int8_calibration_of_an_sdxl_unet(xl_fp16, tmp_path):
    int8 = tmp_path / "int8"
    done = sdtrt(
        "calibrate", xl_fp16, "--precision", "int8", "--samples", 4, "--steps", 2, "--trajectory-steps", 4,
        "--size", "64x64", "--out", int8,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (int8 / "tokenizer_2.json").is_file() and (int8 / "text_encoder_2.onnx").is_file()
    checked = sdtrt("check", int8, "--reference", xl_fp16)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "quality report passed" in checked.stdout


def test_torch_backend_fp16_keeps_the_vae_fp32(xl_fp32):
    from sdtrt.runtime.engine import BackendOptions

    options = BackendOptions(precision="fp16")
    with (
        Pipeline.from_artifacts(xl_fp32, backend="torch", device="cpu", options=options) as half,
        Pipeline.from_artifacts(xl_fp32, backend="torch", device="cpu") as full,
    ):
        assert [t.dtype for t in half.engines["unet"].inputs][2:] == ["float16"] * (
            3 + len(half.manifest.model.control_residuals)
        )
        assert [t.dtype for t in half.engines["vae_decoder"].inputs] == ["float32"]
        a = half(PROMPT, steps=2, guidance_scale=5.0, seed=8)
        b = full(PROMPT, steps=2, guidance_scale=5.0, seed=8)
    assert psnr(a.pixels, b.pixels) >= 40


@pytest.mark.gpu
def test_cuda_graph_step_reads_the_pooled_embedding_and_time_ids_of_each_call(xl_fp32):
    """The captured SDXL step replays with this call's text_embeds and time_ids: it equals the eager step."""
    results = {}
    for graph in (False, True):
        with Pipeline.from_artifacts(xl_fp32, backend="torch", device="cuda", cuda_graph=graph) as pipe:
            assert pipe.cuda_graph is graph
            first = pipe(PROMPT, steps=4, guidance_scale=5.0, seed=1, scheduler="euler_a")
            other = pipe("a green square", steps=4, guidance_scale=5.0, seed=2, scheduler="euler_a",
                         original_size=(64, 64), crops_coords_top_left=(8, 8))  # fmt: skip
            if graph:
                assert len(pipe._denoisers) == 1  # replayed, not captured again
            results[graph] = (first.pixels, other.pixels)
    for eager, captured in zip(results[False], results[True], strict=True):
        assert psnr(eager, captured) >= 60
