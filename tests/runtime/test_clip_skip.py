"""Clip skip: the exported text encoder gives any layer's hidden state at run time, checked against diffusers.

sdtrt counts as A1111 does (``clip_skip`` N = "CLIP_stop_at_last_layers" N: ``hidden_states[-N]`` through the
final layer norm, 1 the last layer); diffusers' ``clip_skip`` k is sdtrt's N = k + 1. diffusers applies it to the
prompt only and encodes the negative prompt from the last layer; A1111 and sdtrt apply it to both, so the guided
image parity feeds diffusers the negative embeddings of its own ``encode_prompt(..., clip_skip=k)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from sdtrt.runtime.clip_skip import check_clip_skip
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.images import infotext
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.specs import ModelInfo

pytest.importorskip("diffusers")

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH, STEPS = 64, 64, 6
LAYERS = 3  # the text encoder of the deeper tiny model: clip skip 1..3, diffusers' clip_skip 0..2
MIN_PSNR = 40.0  # fp32, sdtrt vs diffusers (about 60+ dB measured on the tiny model)
EMBED_TOL = 1e-4  # max abs difference of the text embeddings, fp32 ONNX Runtime vs PyTorch


def deeper_bundle(bundle):
    """The tiny model with a seeded 3-layer text encoder (the tiny preset's has 2)."""
    import transformers

    from sdtrt.runtime.models.bundle import model_info
    from sdtrt.runtime.models.presets import TINY_TEXT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = transformers.CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": LAYERS})
        text = transformers.CLIPTextModel(config).eval().requires_grad_(False)
    model = model_info(text, bundle.unet, bundle.vae, bundle.scheduler_config)
    return dataclasses.replace(bundle, text_encoder=text, model=model, source={})


def diffusers_reference(bundle):
    """diffusers' StableDiffusionPipeline over ``bundle``. diffusers 0.42 reads ``text_model.final_layer_norm``
    for clip_skip, which transformers 5 moved onto the model itself: point the old name at the same norm."""
    from sdtrt.runtime.models.reference import diffusers_pipeline

    encoder = bundle.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    return diffusers_pipeline(bundle, "euler")


def export(bundle, folder, profile, model=None):
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    if model is not None:
        bundle = dataclasses.replace(bundle, model=model)
    components = ("text_encoder", "unet", "vae_decoder")
    export_artifacts(bundle, folder, ExportOptions(profile=profile, components=components, step_cache=False))
    return folder


@pytest.fixture(scope="module")
def deep(tiny_bundle):
    return deeper_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def deep_pipe(deep, tiny_profile, tmp_path_factory):
    folder = export(deep, tmp_path_factory.mktemp("clip-skip") / "artifacts", tiny_profile)
    with Pipeline.from_artifacts(folder, device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def deep_reference(deep):
    return diffusers_reference(deep)


def reference_image(reference, clip_skip: int, seed: int, guidance: float = 7.5) -> torch.Tensor:
    """diffusers' image with its ``clip_skip`` = ``clip_skip`` - 1 (None for 1), the negative prompt too."""
    skip = clip_skip - 1 if clip_skip > 1 else None
    common = {"num_inference_steps": STEPS, "height": HEIGHT, "width": WIDTH, "output_type": "pt"}
    common["generator"] = [torch.Generator().manual_seed(seed)]
    with torch.no_grad():
        if guidance <= 1:  # unguided: diffusers' own call with clip_skip, as users make it
            return reference(PROMPT, guidance_scale=guidance, clip_skip=skip, **common).images.float()
        text = reference.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=skip)[0]
        negative = reference.encode_prompt(NEGATIVE, "cpu", 1, False, clip_skip=skip)[0]
        out = reference(prompt_embeds=text, negative_prompt_embeds=negative, guidance_scale=guidance, **common)
    return out.images.float()


def run(pipe, clip_skip: int, seed: int, guidance: float = 7.5, **call):
    return pipe(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=guidance, seed=seed, height=HEIGHT,
                width=WIDTH, scheduler="euler", clip_skip=clip_skip, **call)  # fmt: skip


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_text_embeddings_match_diffusers(deep_pipe, deep_reference, clip_skip):
    got, _ = deep_pipe.encode_prompts([PROMPT, NEGATIVE], clip_skip)
    skip = clip_skip - 1 if clip_skip > 1 else None
    with torch.no_grad():
        want = deep_reference.encode_prompt([PROMPT, NEGATIVE], "cpu", 1, False, clip_skip=skip)[0]
    assert got.shape == want.shape == (2, 77, 32)
    diff = float((got - want).abs().max())
    print(f"\nclip skip {clip_skip}: text embeddings max abs diff vs diffusers {diff:.2e}")
    assert diff <= EMBED_TOL


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_image_matches_diffusers(deep_pipe, deep_reference, clip_skip):
    result = run(deep_pipe, clip_skip, seed=3)
    value = psnr(result.pixels, reference_image(deep_reference, clip_skip, seed=3))
    print(f"\nclip skip {clip_skip} (guided) vs diffusers: {value:.1f} dB")
    assert result.pixels.std() > 0.01 and value >= MIN_PSNR
    assert result.settings.clip_skip == clip_skip and result.settings.to_dict()["clip_skip"] == clip_skip


def test_unguided_matches_diffusers_clip_skip_call(deep_pipe, deep_reference):
    result = run(deep_pipe, 2, seed=4, guidance=1.0)
    value = psnr(result.pixels, reference_image(deep_reference, 2, seed=4, guidance=1.0))
    print(f"\nclip skip 2 (unguided, diffusers' clip_skip=1 call) vs diffusers: {value:.1f} dB")
    assert value >= MIN_PSNR


def test_clip_skip_changes_the_image(deep_pipe, deep_reference):
    images = {n: run(deep_pipe, n, seed=5).pixels for n in (1, 2, 3)}
    for a, b in ((1, 2), (2, 3), (1, 3)):
        assert not torch.equal(images[a], images[b]), f"clip skip {a} and {b} gave the same image"
        assert psnr(images[a], images[b]) < MIN_PSNR  # far apart, where each matches its reference closely
    assert psnr(images[1], reference_image(deep_reference, 1, seed=5)) >= MIN_PSNR
    assert "clip_skip" not in run(deep_pipe, 1, seed=5).settings.to_dict()


def test_out_of_range_is_refused_before_work(deep_pipe):
    calls = []
    deep_pipe.wrap_engine("text_encoder", lambda engine: _Counting(engine, calls))
    for bad, match in ((0, "integer >= 1"), (LAYERS + 1, f"past this text encoder's {LAYERS} layers; give 1..3"),
                       (True, "integer >= 1"), (1.5, "integer >= 1")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            run(deep_pipe, bad, seed=1)
    assert calls == []


class _Counting:
    """An engine stand-in that counts calls and runs the real one."""

    def __init__(self, engine, calls):
        self.engine, self.calls = engine, calls

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def infer(self, feeds):
        self.calls.append(feeds)
        return self.engine.infer(feeds)


def test_sdxl_is_refused():
    sdxl = ModelInfo(family="sdxl", text_width=32, text_width_2=32, add_text_embeds_width=24, add_time_ids=6)
    check_clip_skip(sdxl, 1)
    with pytest.raises(ConfigError, match="clip skip 2 is not supported for SDXL models .* use clip skip 1"):
        check_clip_skip(sdxl, 2)


def test_manifest_records_the_input(tiny_fp32):
    manifest = read_manifest(tiny_fp32)
    assert manifest.model.text_layers == 2 and manifest.model.clip_skip_ready
    entry = manifest.components["text_encoder"]
    assert [(t.name, t.dtype, tuple(t.shape)) for t in entry.inputs] == [
        ("input_ids", "int32", ("text_batch", 77)),
        ("clip_skip", "int32", (1,)),
    ]
    assert entry.shapes["clip_skip"] == {"min": [1], "opt": [1], "max": [1]}


@pytest.fixture(scope="module")
def old_artifact(tiny_bundle, tiny_profile, tmp_path_factory):
    """An artifact as exported before the text encoder took clip_skip: its graph and a manifest without
    ``text_layers``."""
    old_model = dataclasses.replace(tiny_bundle.model, text_layers=0)
    folder = export(tiny_bundle, tmp_path_factory.mktemp("old") / "artifacts", tiny_profile, old_model)
    data = json.loads((folder / "manifest.json").read_text())
    del data["model"]["text_layers"]
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))
    return folder


def test_old_artifact_runs_clip_skip_1_and_refuses_more(old_artifact, tiny_fp32, tiny_bundle):
    import onnx

    graph = onnx.load(str(old_artifact / "text_encoder.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids"]
    manifest = read_manifest(old_artifact)
    assert manifest.model.text_layers == 0 and not manifest.model.clip_skip_ready
    with Pipeline.from_artifacts(old_artifact, device="cpu") as old, Pipeline.from_artifacts(tiny_fp32) as new:
        a, b = old.encode_prompts([PROMPT])[0], new.encode_prompts([PROMPT], 1)[0]
        assert float((a - b).abs().max()) <= 1e-5  # clip skip 1 on the new graph is the old graph's output
        assert run(old, 1, seed=2).images
        with pytest.raises(ConfigError, match="exported with the clip_skip input.*re-export the model"):
            run(old, 2, seed=2)
        with pytest.raises(ConfigError, match="re-export"):
            old.encode_prompts([PROMPT], 2)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backends_match_diffusers(tiny_fp32, tiny_bundle, backend):
    reference = diffusers_reference(tiny_bundle)
    with Pipeline.from_artifacts(tiny_fp32, backend=backend, device="cpu") as pipe:
        result = run(pipe, 2, seed=6)
        value = psnr(result.pixels, reference_image(reference, 2, seed=6))
        print(f"\n{backend}: clip skip 2 vs diffusers clip_skip=1: {value:.1f} dB")
        assert value >= MIN_PSNR
        assert not torch.equal(result.pixels, run(pipe, 1, seed=6).pixels)


def test_infotext_writes_clip_skip_when_it_skips(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32) as pipe:
        skipped, plain = run(pipe, 2, seed=1).settings, run(pipe, 1, seed=1).settings
    text = infotext(PROMPT, NEGATIVE, 1, skipped)
    assert "Size: 64x64, Clip skip: 2" in text
    assert "Clip skip" not in infotext(PROMPT, NEGATIVE, 1, plain)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=600)


def test_cli_clip_skip(tiny_fp32, tmp_path):
    from PIL import Image

    args = ["generate", str(tiny_fp32), PROMPT, "--negative", NEGATIVE, "--steps", str(STEPS), "--seed", "9"]
    args += ["--size", f"{WIDTH}x{HEIGHT}", "--scheduler", "euler", "--cfg", "7.5"]
    done = cli(*args, "--clip-skip", "2", "--out", str(tmp_path / "two.png"))
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "two.png")
    assert "Clip skip: 2" in image.info["parameters"]
    with Pipeline.from_artifacts(tiny_fp32) as pipe:
        expected = run(pipe, 2, seed=9).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    refused = cli(*args, "--clip-skip", "3", "--out", str(tmp_path / "three.png"))
    lines = refused.stderr.splitlines()
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert lines[0] == "error: clip skip 3 is past this text encoder's 2 layers; give 1..2"
    assert not (tmp_path / "three.png").exists()
    zero = cli(*args, "--clip-skip", "0", "--out", str(tmp_path / "zero.png"))
    assert zero.returncode == 1 and len(zero.stderr.splitlines()) == 1
    assert "Invalid value for '--clip-skip': 0 is not in the range x>=1" in zero.stderr


def test_tensorrt_double_profiles_and_feeds_clip_skip(use_double, tiny_fp16, tmp_path):
    """Bookkeeping only (the TensorRT double computes nothing): the engine's profile covers ``clip_skip``, and the
    value a call asks for reaches the text encoder engine."""
    from sdtrt.export.build import TensorRTBuildOptions, build_engines
    from sdtrt.runtime.profile import ShapeProfile

    double = use_double(memory={"text_encoder": 1000, "unet": 7000, "vae_decoder": 5000, "vae_encoder": 3000})
    profile = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
    build_engines(tiny_fp16, tmp_path / "engines", profile, TensorRTBuildOptions())
    builds = {b["network"]: b["profiles"][0] for b in double.records.builds}
    assert builds["text_encoder"]["clip_skip"] == [[1], [1], [1]]
    with Pipeline.from_artifacts(tmp_path / "engines", backend="tensorrt", device="cpu") as pipe:
        pipe("a cat", steps=1, seed=1, height=64, width=64, clip_skip=2)
    encoder = [c for c in double.records.contexts if c.engine.input_names == ["input_ids", "clip_skip"]]
    assert len(encoder) == 1 and encoder[0].runs == 1
    assert np.frombuffer(encoder[0].inputs_seen[-1]["clip_skip"], dtype=np.int32).tolist() == [2]


def test_hires_fix_runs_both_passes_at_the_clip_skip(tiny_fp32):
    from sdtrt.runtime.hires import HiresFix, run_hires

    calls = []
    with Pipeline.from_artifacts(tiny_fp32) as pipe:
        pipe.wrap_engine("text_encoder", lambda engine: _Counting(engine, calls))
        result = run_hires(pipe, PROMPT, HiresFix(scale=2.0, steps=2), NEGATIVE, steps=2, seed=1, height=64,
                           width=64, scheduler="euler", clip_skip=2)  # fmt: skip
    assert result.images[0].size == (128, 128) and result.settings.clip_skip == 2
    assert len(calls) == 2 and all(c["clip_skip"].tolist() == [2] for c in calls)  # first pass, second pass
    assert "Clip skip: 2" in infotext(PROMPT, NEGATIVE, 1, result.settings)
