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
