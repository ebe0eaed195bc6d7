"""Exporting and building inpainting models (9-channel UNets): ONNX that agrees with PyTorch, from a diffusers
folder and from an original-layout single file, and TensorRT profiles for the 9-channel sample (on the recording
double; real engines only in the ``trt`` test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sdtrt.export.build import TensorRTBuildOptions, build_engines  # noqa: E402
from sdtrt.runtime.backends import onnxruntime as ort_backend  # noqa: E402
from sdtrt.runtime.backends import tensorrt as trt_backend  # noqa: E402
from sdtrt.runtime.errors import ShapeError  # noqa: E402
from sdtrt.runtime.manifest import read_manifest  # noqa: E402
from sdtrt.runtime.profile import ShapeProfile  # noqa: E402

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def sdtrt(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SDTRT, *args], capture_output=True, text=True, timeout=timeout)


def onnx_input_shape(path, name: str) -> list:
    graph = onnx.load(str(path), load_external_data=False).graph
    (tensor,) = [t for t in graph.input if t.name == name]
    return [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]


def test_artifact_declares_nine_channel_samples_and_four_channel_predictions(tiny_inpaint_fp32):
    manifest = read_manifest(tiny_inpaint_fp32)
    assert manifest.model.inpainting and manifest.model.unet_in_channels == 9
    assert "vae_encoder" in manifest.components
    for name in ("unet", "unet_shallow"):
        entry = manifest.components[name]
        (sample,) = [t for t in entry.inputs if t.name == "sample"]
        assert sample.shape[1] == 9 and entry.outputs[0].name == "noise_pred" and entry.outputs[0].shape[1] == 4
        assert [s[1] for s in entry.shapes["sample"].values()] == [9, 9, 9]
        assert onnx_input_shape(tiny_inpaint_fp32 / entry.file, "sample")[1] == 9


def test_sdtrt_check_passes_for_the_inpainting_artifact(tiny_inpaint_fp32, tmp_path):
    result = sdtrt("check", str(tiny_inpaint_fp32), "--json", str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["component"] for row in rows} >= {"unet", "unet_shallow", "vae_encoder"}
    assert all(row["passed"] and row["rel_l2"] <= 1e-4 for row in rows)


def test_onnx_unet_reads_the_mask_and_masked_image_channels(tiny_inpaint_fp32):
    """ONNX Runtime's UNet output moves when only the extra channels change, as PyTorch's does."""
    manifest = read_manifest(tiny_inpaint_fp32)
    unet = ort_backend.open_engines(tiny_inpaint_fp32, manifest, ["unet"], "cpu")["unet"]
    g = torch.Generator().manual_seed(0)
    feeds = {
        "sample": torch.randn(2, 9, 8, 8, generator=g),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
    }
    for entry in manifest.components["unet"].inputs:
        if entry.name.startswith("control_"):
            feeds[entry.name] = torch.zeros(_residual_shape(entry, 2, 8))
    base = unet.infer(feeds)["noise_pred"].clone()
    assert base.shape == (2, 4, 8, 8)
    feeds["sample"][:, 4:] = torch.randn(2, 5, 8, 8, generator=g)
    changed = unet.infer(feeds)["noise_pred"]
    assert float((changed - base).norm() / base.norm()) > 0.01
    with pytest.raises(ShapeError):
        unet.infer({**feeds, "sample": feeds["sample"][:, :4].contiguous()})


def _residual_shape(entry, batch: int, side: int) -> tuple[int, ...]:
    """A ControlNet residual input's shape at ``side`` latents: its dims are (rows, channels, side/k, side/k)."""
    factor = int(str(entry.shape[2]).partition("/")[2] or 1)
    return (batch, int(entry.shape[1]), side // factor, side // factor)


def test_export_refuses_the_unet_without_the_vae_encoder(tmp_path):
    result = sdtrt(
        "export", "tiny-inpaint", "--out", str(tmp_path / "A"), "--components", "text_encoder,unet,vae_decoder"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "inpainting model (its UNet takes 9 channels" in result.stderr and "add vae_encoder" in result.stderr
    assert not (tmp_path / "A").exists()


@pytest.mark.slow
def test_folder_and_single_file_export_to_the_same_checked_onnx(tiny_inpaint_files, tmp_path):
    """`sdtrt export` of the diffusers folder and of the single file (base-model config, no flag), `sdtrt check`
    of both, and the same UNet output from both artifacts."""
    common = ("--precision", "fp32", "--no-step-cache", "--max-batch", "2")
    folder, single = tmp_path / "folder", tmp_path / "single"
    result = sdtrt("export", str(tiny_inpaint_files["folder"]), "--out", str(folder), *common)
    assert result.returncode == 0, result.stderr
    checkpoint = str(tiny_inpaint_files["checkpoint"])
    result = sdtrt(
        "export", checkpoint, "--config-dir", str(tiny_inpaint_files["config"]), "--out", str(single), *common
    )
    assert result.returncode == 0, result.stderr
    for artifact in (folder, single):
        result = sdtrt("check", str(artifact))
        assert result.returncode == 0 and "checks passed" in result.stdout, result.stdout + result.stderr
        assert read_manifest(artifact).model.unet_in_channels == 9
    g = torch.Generator().manual_seed(1)
    feeds = {
        "sample": torch.randn(1, 9, 8, 8, generator=g),
        "timestep": torch.full((1,), 321.0),
        "encoder_hidden_states": torch.randn(1, 77, 32, generator=g),
    }
    outputs = []
    for artifact in (folder, single):
        manifest = read_manifest(artifact)
        unet = ort_backend.open_engines(artifact, manifest, ["unet"], "cpu")["unet"]
        extra = {e.name: torch.zeros(_residual_shape(e, 1, 8)) for e in manifest.components["unet"].inputs[3:]}
        outputs.append(unet.infer({**feeds, **extra})["noise_pred"].clone())
    assert torch.equal(outputs[0], outputs[1])


# -- TensorRT ----------------------------------------------------------------------------------------------------
PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)


def test_tensorrt_profiles_and_engines_take_nine_channel_samples(use_double, tiny_inpaint_fp32, tmp_path):
    double = use_double()
    out = tmp_path / "E"
    build_engines(tiny_inpaint_fp32, out, PROFILE, TensorRTBuildOptions(components=("unet", "vae_encoder")))
    builds = {b["network"]: b["profiles"][0] for b in double.records.builds}
    assert list(builds) == ["unet", "unet_shallow", "vae_encoder"]  # the step-cache UNets go together
    for name in ("unet", "unet_shallow"):
        assert builds[name]["sample"] == [[1, 9, 8, 8], [2, 9, 16, 16], [4, 9, 32, 32]]  # CFG doubles the rows
    manifest = read_manifest(out)
    unet = trt_backend.open_engines(out, manifest, ["unet"], "cpu")["unet"]
    feeds = {
        "sample": torch.randn(2, 9, 16, 16),
        "timestep": torch.full((2,), 500.0),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    feeds.update({e.name: torch.zeros(_residual_shape(e, 2, 16)) for e in manifest.components["unet"].inputs[3:]})
    assert unet.infer(feeds)["noise_pred"].shape == (2, 4, 16, 16)
    context = double.records.contexts[-1]
    assert ("sample", (2, 9, 16, 16)) in context.shape_calls
    with pytest.raises(ShapeError, match="sample"):
        unet.infer({**feeds, "sample": torch.randn(2, 4, 16, 16)})


@pytest.mark.trt
@pytest.mark.gpu
def test_inpainting_engines_match_onnxruntime(tiny_inpaint_fp32, tmp_path):
    from sdtrt.export.onnx_export import sample_inputs
    from sdtrt.runtime.specs import component_specs

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    out = tmp_path / "engines"
    names = ["unet", "unet_shallow"]
    manifest = build_engines(tiny_inpaint_fp32, out, profile, TensorRTBuildOptions(opt_level=1, components=("unet",)))
    source = read_manifest(tiny_inpaint_fp32)
    specs = component_specs(source.model)
    trt_engines = trt_backend.open_engines(out, manifest, names, "cuda")
    ort_engines = ort_backend.open_engines(tiny_inpaint_fp32, source, names, "cpu")
    for name in names:
        tensors = sample_inputs(specs[name], source.model, profile, "fp32")
        feeds = dict(zip([t.name for t in specs[name].inputs], tensors, strict=True))
        assert feeds["sample"].shape[1] == 9
        expected = ort_engines[name].infer(feeds)
        found = trt_engines[name].infer({k: v.cuda() for k, v in feeds.items()})
        torch.cuda.synchronize()
        for key, want in expected.items():
            rel = float((found[key].float().cpu() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            assert rel <= 1e-2, (name, key, rel)


def test_controlnet_beside_an_inpainting_unet_reads_four_channel_latents(tiny_inpaint_control_fp32):
    from sdtrt.export.check import check_artifacts

    manifest = read_manifest(tiny_inpaint_control_fp32)
    control = manifest.components["controlnet_edges"]
    assert [t.shape[1] for t in control.inputs if t.name == "sample"] == [4]
    assert [t.shape[1] for t in manifest.components["unet"].inputs if t.name == "sample"] == [9]
    rows = [r for r in check_artifacts(tiny_inpaint_control_fp32) if r.component in ("controlnet_edges", "unet")]
    assert {r.component for r in rows} == {"controlnet_edges", "unet"} and all(r.passed for r in rows)


def test_the_tensorrt_pipeline_feeds_the_engine_latents_mask_and_masked_image(use_double, tiny_inpaint_fp32, tmp_path):
    """On the double (the wiring, not TensorRT's numbers): every UNet run gets 9 channels, the 4 latents, then the
    mask on the latent grid and the masked image's latents, the same for the uncond and cond rows and every step."""
    import numpy as np
    from PIL import Image

    from sdtrt.runtime.inpaint import Inpaint
    from sdtrt.runtime.pipeline import Pipeline

    double = use_double()
    out = tmp_path / "engines"
    build_engines(tiny_inpaint_fp32, out, PROFILE, TensorRTBuildOptions())
    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # latent pixels 2..5 repaint
    with Pipeline.from_artifacts(out, backend="tensorrt", device="cpu") as pipe:
        options = {"steps": 6, "seed": 2, "height": 64, "width": 64, "scheduler": "euler", "strength": 0.5}
        pipe("a cat", image=image, inpaint=Inpaint(mask, blur=0), **options)
    unet = next(c for c in double.records.contexts if c.engine.plan["name"] == "unet")
    encoder = next(c for c in double.records.contexts if c.engine.plan["name"] == "vae_encoder")
    assert unet.shapes["sample"] == (2, 9, 8, 8) and unet.runs == 3
    assert encoder.runs == 2  # the init image, then the masked image
    expected_mask = np.zeros((8, 8), dtype=np.float32)
    expected_mask[2:6, 2:6] = 1
    samples = [np.frombuffer(seen["sample"], dtype=np.float32).reshape(2, 9, 8, 8) for seen in unet.inputs_seen]
    for fed in samples:
        np.testing.assert_array_equal(fed[0], fed[1])  # uncond and cond rows: same latents, same condition
        np.testing.assert_array_equal(fed[0, 4], expected_mask)
        np.testing.assert_array_equal(fed[0, 5:], samples[0][0, 5:])  # a static buffer: the same every step
        assert np.abs(fed[0, 5:]).max() > 0
