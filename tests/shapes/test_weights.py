"""The trainer end to end on a few steps, and the integrity checks of the weights it writes and sdtrt ships."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.models.presets import load_shapes, verified_shapes_weights
from sdtrt.shapes.train import TrainSettings, train

TINY_RUN = TrainSettings(vae_steps=2, vae_batch=2, latents=8, unet_steps=2, unet_batch=2, warmup=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes-weights")
    record = train(folder, TINY_RUN)
    return folder, record


def test_a_training_run_writes_loadable_checked_weights(trained):
    folder, record = trained
    assert set(p.name for p in folder.iterdir()) == {"shapes.safetensors", "shapes.json"}
    assert json.loads((folder / "shapes.json").read_text())["sha256"] == record["sha256"]
    bundle = load_shapes(folder)
    assert bundle.model.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])
    assert bundle.model.vae_scale_factor == 8 and bundle.model.latent_channels == 4
    assert all(p.dtype == torch.float32 for p in bundle.unet.parameters())
    assert record["training"]["settings"]["unet_steps"] == 2
    # tokens no caption uses are zero rows; the caption words are not
    table = bundle.text_encoder.get_input_embeddings().weight
    assert int((table.abs().sum(dim=1) > 0).sum()) < 40


def test_training_is_reproducible_from_its_seed(trained, tmp_path):
    folder, record = trained
    again = train(tmp_path, TINY_RUN)
    assert again["sha256"] == record["sha256"]


def test_a_damaged_weights_file_is_refused(trained, tmp_path):
    folder, _ = trained
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    weights = copy / "shapes.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="damaged or were replaced: expected sha256"):
        load_shapes(copy)


def test_missing_or_broken_files_say_how_to_fix_them(trained, tmp_path):
    folder, _ = trained
    (tmp_path / "shapes.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON.*retrain with"):
        load_shapes(tmp_path)
    shutil.copy(folder / "shapes.json", tmp_path / "shapes.json")
    with pytest.raises(SourceError, match="weights .* are missing"):
        load_shapes(tmp_path)
    with pytest.raises(SourceError, match="record .* is missing"):
        load_shapes(tmp_path / "nowhere")


def test_the_shipped_weights_match_their_record():
    weights, record = verified_shapes_weights()
    assert weights.stat().st_size == record["bytes"]
    assert record["training"]["command"].startswith("python -m sdtrt.shapes.train")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="vae_crop must be a multiple of 8"):
        TrainSettings(vae_crop=60)
    with pytest.raises(ValueError, match="unet_steps must be >= 1"):
        TrainSettings(unet_steps=0)
