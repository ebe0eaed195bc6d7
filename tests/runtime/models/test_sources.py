"""Model sources: presets, diffusers folders, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.models.presets import load_preset, preset_configs
from sdtrt.runtime.models.sources import load_source


def save_diffusers_folder(bundle, folder, weights: str = "safetensors"):
    """Write the bundle in the layout StableDiffusionPipeline.save_pretrained produces."""
    folder.mkdir(parents=True)
    safe = weights == "safetensors"
    bundle.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=safe)
    bundle.unet.save_pretrained(folder / "unet", safe_serialization=safe)
    bundle.vae.save_pretrained(folder / "vae", safe_serialization=safe)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundle.scheduler_config))
    (folder / "tokenizer").mkdir()
    bundle.tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def test_preset_is_seeded_and_reproducible():
    a, b = load_preset("tiny"), load_preset("tiny")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.source["sha256"] == b.source["sha256"]
    assert load_preset("tiny", seed=1).unet.conv_in.weight.ne(a.unet.conv_in.weight).any()


def test_sd15_preset_configs_are_the_real_architecture():
    text, unet, vae, scheduler = preset_configs("sd15-random")
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert text["hidden_size"] == 768 and text["num_hidden_layers"] == 12
    assert vae["scaling_factor"] == 0.18215 and scheduler["beta_schedule"] == "scaled_linear"
    import diffusers

    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**unet)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_diffusers_folder_round_trip(tmp_path, tiny_bundle):
    folder = save_diffusers_folder(tiny_bundle, tmp_path / "model")
    loaded = load_source(str(folder))
    assert loaded.source["kind"] == "diffusers"
    assert loaded.model == tiny_bundle.model
    sample = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, 32)
    t = torch.tensor([10.0])
    with torch.no_grad():
        a = tiny_bundle.unet(sample, t, text).sample
        b = loaded.unet(sample, t, text).sample
    # identical weights; kernels may pick another summation order for the loaded tensors' layout
    sa, sb = tiny_bundle.unet.state_dict(), loaded.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.tokenizer.encode("a photo of a cat").ids[:7] == ids


def test_diffusers_folder_errors(tmp_path, tiny_bundle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="missing model_index.json, text_encoder"):
        load_source(str(tmp_path / "empty"))
    folder = save_diffusers_folder(tiny_bundle, tmp_path / "pickled", weights="pickle")
    with pytest.raises(SourceError, match=r"weights of unet, vae as pickle files .* --allow-pickle"):
        load_source(str(folder))


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist; give a diffusers model folder"):
        load_source(str(tmp_path / "nothing.safetensors"))
    presets = "tiny, tiny-xl, shapes, sd15-random, sdxl-random"
    with pytest.raises(SourceError, match=f"unknown preset 'sd99'; the presets are {presets}"):
        load_source("sd99")


def test_a_preset_name_wins_over_a_same_named_folder_without_a_model(tmp_path, monkeypatch):
    from sdtrt.runtime.models.sources import load_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # e.g. the repository's own shapes/ package folder next to a `sdtrt export shapes`
    assert load_source("tiny").source["kind"] == "preset"
    (tmp_path / "tiny" / "model_index.json").write_text("{}")
    with pytest.raises(SourceError, match="not a diffusers Stable Diffusion folder"):
        load_source("tiny")


def test_sdxl_preset_configs_are_the_real_architecture():
    import diffusers
    import transformers

    from sdtrt.runtime.models.presets import preset_text_encoder_2

    text, unet, vae, scheduler = preset_configs("sdxl-random")
    assert unet["cross_attention_dim"] == 2048 and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert vae["scaling_factor"] == 0.13025 and scheduler["_class_name"] == "EulerDiscreteScheduler"
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**unet)
        encoder_2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**preset_text_encoder_2("sdxl-random"))
        )
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    assert sum(p.numel() for p in encoder_2.parameters()) == 694_659_840  # OpenCLIP ViT-bigG text tower


@pytest.mark.parametrize(
    ("native", "multiple", "size_range", "expected"),
    [
        (512, 64, None, (256, 512, 1024)),  # SD 1.5
        (768, 64, None, (384, 768, 1536)),  # SD 2.x-v
        (1024, 32, None, (512, 1024, 2048)),  # SDXL
        (512, 32, None, (256, 512, 1024)),  # SDXL-Turbo
        (0, 64, None, (256, 512, 1024)),  # unknown: SD 1.5's
        (128, 16, None, (64, 128, 256)),  # tiny, tiny-xl
        (128, 16, (128, 128), (128, 128, 128)),  # shapes: trained at 128 only
        (512, 64, (384, 768), (384, 512, 768)),  # a model that declares a range
    ],
)
def test_default_profile_follows_the_native_size(native, multiple, size_range, expected):
    from types import SimpleNamespace

    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.specs import ModelInfo

    downsamples = {64: 3, 32: 2, 16: 1}[multiple]
    model = ModelInfo(native_size=native, unet_downsamples=downsamples)
    profile = default_profile(SimpleNamespace(model=model, size_range=size_range))
    assert (profile.min_height, profile.opt_height, profile.max_height) == expected
    assert (profile.min_width, profile.opt_width, profile.max_width) == expected
    assert profile.max_prompt_windows == 3 and profile.max_batch == 4


def test_diffusers_folder_defaults_follow_its_scheduler_and_size(tmp_path, tiny_bundle):
    """A folder whose scheduler is EulerDiscrete generates with euler at the UNet's native size, as diffusers does."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.models.reference import diffusers_pipeline
    from sdtrt.runtime.pipeline import Pipeline

    folder = tmp_path / "model"
    diffusers_pipeline(tiny_bundle, "euler").save_pretrained(folder, safe_serialization=True)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    bundle = load_source(str(folder))
    assert bundle.model.native_size == 128  # sample_size 16 x VAE factor 8
    out = tmp_path / "art"
    export_artifacts(
        bundle, out, ExportOptions(profile=default_profile(bundle), components=("text_encoder", "unet", "vae_decoder"))
    )
    with Pipeline.from_artifacts(out, device="cpu") as pipe:
        result = pipe("a cat", steps=3, guidance_scale=7.5, seed=2)
    assert result.settings.scheduler == "euler" and result.images[0].size == (128, 128)
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = reference(
            "a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="pt"
        ).images
    mse = float(((result.pixels - expected) ** 2).mean())
    assert mse < 1e-8  # same image: PSNR above 80 dB
