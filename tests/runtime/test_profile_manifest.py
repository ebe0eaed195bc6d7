from __future__ import annotations

import dataclasses
import json

import pytest

from sdtrt.runtime.errors import ArtifactError, ShapeError
from sdtrt.runtime.manifest import SCHEMA_VERSION, Manifest, model_display_name, read_manifest, resolve_file
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import ModelInfo, check_size, component_specs, dim_ranges, shape_ranges


def test_profile_id_is_stable_and_readable():
    a = ShapeProfile.square(256, 512, 768, max_batch=4)
    b = ShapeProfile(1, 1, 4, 256, 512, 768, 256, 512, 768)
    assert a.id == b.id == "b1-1-4_h256-512-768_w256-512-768"
    assert ShapeProfile.static(512, 768).id == "b1_h512_w768"
    assert ShapeProfile.static(512, 512, batch=2).id != ShapeProfile.static(512, 512).id
    assert ShapeProfile(max_prompt_windows=3).id.endswith("_t3")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_height": 500, "opt_height": 512, "max_height": 512}, "multiple of 8 pixels, got 500; use 504"),
        ({"min_batch": 2, "opt_batch": 1}, r"1 <= min <= opt <= max"),
        ({"min_batch": 0}, r"batch range must satisfy"),
        ({"max_prompt_windows": 0}, "max_prompt_windows must be >= 1"),
    ],
)
def test_profile_rejects_bad_ranges(kwargs, message):
    with pytest.raises(ShapeError, match=message):
        ShapeProfile(**kwargs)


def test_profile_check_names_the_allowed_range():
    profile = ShapeProfile.square(256, 512, 768)
    profile.check(512, 768)
    with pytest.raises(ShapeError, match=r"outside this artifact's profile: width 256\.\.768"):
        profile.check(1024, 512)


def test_unet_batch_doubles_for_guidance_and_latents_scale():
    profile = ShapeProfile(1, 1, 4, 256, 512, 768, 256, 512, 1024, max_prompt_windows=2)
    model = ModelInfo()
    dims = dim_ranges(profile, model)
    assert dims["unet_batch"] == (1, 2, 8)
    assert dims["text_batch"] == (1, 2, 16)
    assert dims["latent_width"] == (32, 64, 128)
    assert dims["text_length"] == (77, 77, 154)
    unet = component_specs(model)["unet"]
    ranges = shape_ranges(unet, profile, model)
    assert ranges["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 96, 128))
    assert ranges["encoder_hidden_states"][2] == (8, 154, 768)
    assert ranges["timestep"] == ((1,), (2,), (8,))


def test_sdxl_extra_unet_inputs_fit_the_description():
    model = ModelInfo(family="sdxl", text_width=768, text_width_2=1280, add_text_embeds_width=1280, add_time_ids=6)
    specs = component_specs(model)
    assert list(specs) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    unet = specs["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.input("encoder_hidden_states").shape[-1] == 2048
    assert unet.input("text_embeds").shape == ("unet_batch", 1280)
    assert [t.name for t in specs["text_encoder_2"].outputs] == ["penultimate_hidden_state", "text_embeds"]
    assert "text_encoder_2" not in component_specs(ModelInfo())
    with pytest.raises(ShapeError, match="needs text_width_2"):
        ModelInfo(family="sdxl", text_width=768, add_text_embeds_width=1280, add_time_ids=6)


def test_check_size_messages():
    model = ModelInfo()  # SD 1.x: 8x VAE, 3 UNet downsamples -> multiples of 64
    check_size(512, 768, model)
    with pytest.raises(ShapeError, match="multiple of 8 pixels, got 513x512"):
        check_size(512, 513, model)
    with pytest.raises(ShapeError, match="multiples of 64 pixels; got 520x512, try 512x512"):
        check_size(512, 520, model)


def test_manifest_round_trip(tiny_fp32):
    manifest = read_manifest(tiny_fp32)
    again = Manifest.from_dict(json.loads(manifest.to_json()))
    assert again == manifest
    assert manifest.schema_version == SCHEMA_VERSION
    assert set(manifest.components) == {"text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
    assert manifest.model.cache_branch == 0 and manifest.model.cache_feature  # step caching is on by default


def _write(folder, data):
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_manifest_errors(tmp_path, tiny_fp32):
    with pytest.raises(ArtifactError, match="does not exist; run `sdtrt export`"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "bad")
    data = json.loads((tiny_fp32 / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="schema version 99 is not supported"):
        read_manifest(_write(tmp_path / "v99", data | {"schema_version": 99}))
    broken = dict(data)
    del broken["components"]
    with pytest.raises(ArtifactError, match="incomplete or malformed"):
        read_manifest(_write(tmp_path / "broken", broken))
    evil = json.loads(json.dumps(data))
    evil["components"]["unet"]["data_file"] = "../../etc/passwd"
    with pytest.raises(ArtifactError, match="not a plain relative name"):
        read_manifest(_write(tmp_path / "evil", evil))
    assert read_manifest(_write(tmp_path / "torch", data | {"kind": "torch"})).kind == "torch"
    with pytest.raises(ArtifactError, match="manifest kind must be one of onnx, tensorrt, torch, got 'openvino'"):
        read_manifest(_write(tmp_path / "openvino", data | {"kind": "openvino"}))


def test_resolve_file_refuses_symlinks(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x")
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "unet.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="is a link or leads outside"):
        resolve_file(folder, "unet.onnx")
    with pytest.raises(ArtifactError, match="is missing"):
        resolve_file(folder, "vae.onnx")


def test_model_display_name_is_the_model_not_the_artifact_folder(tiny_fp32):
    manifest = read_manifest(tiny_fp32)
    assert tiny_fp32.name == "artifacts" and model_display_name(manifest, tiny_fp32.name) == "tiny"

    def named(**source):
        return model_display_name(dataclasses.replace(manifest, source=source), "artifacts")

    assert named(kind="diffusers", path="/models/dreamshaper-8") == "dreamshaper-8"
    assert named(kind="single_file", path="/models/v1-5-pruned-emaonly.safetensors") == "v1-5-pruned-emaonly"
    assert named(kind="preset", name="shapes") == "shapes"
    assert named(kind="unknown") == "artifacts"
