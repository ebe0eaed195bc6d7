"""ControlNet engines on the TensorRT backend: opened with the others, run inside the denoising step.

Most tests run on tests/trt_double.py, a RECORDING DOUBLE of tensorrt (the CPU standing in for the GPU): they check
sdtrt's wiring, never TensorRT's results. The double's engines write their run count into every output, so a step
with ControlNets must hand the UNet exactly (run count x scale), summed over the ControlNets. Tests marked ``trt``
build real engines (parity with ONNX Runtime, the step captured in a CUDA graph); the ``gpu`` test compares the
captured step with a ControlNet against the eager one on the torch backend. Those run only where a GPU (and
TensorRT) exist.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.export.build import TensorRTBuildOptions, build_engines
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.profile import ShapeProfile

PROFILE = ShapeProfile(1, 1, 2, 64, 128, 256, 64, 128, 256)
MEMORY = {"unet": 7000, "controlnet_edges": 9000, "controlnet_depth": 3000}
PROMPT, SIZE, STEPS = "a photo of a cat", 64, 2


def hint_image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(((rng.random((size, size, 3)) > 0.8) * 255).astype(np.uint8))


HINTS = {"edges": hint_image(1), "depth": hint_image(2)}


def control(name: str, **kw) -> ControlInput:
    return ControlInput(name, HINTS[name], resize_mode="just_resize", **kw)


@pytest.fixture
def use_double(use_double):
    """The shared installer, with this module's engine memory sizes."""
    return functools.partial(use_double, memory=MEMORY)


@pytest.fixture
def control_engines(use_double, tiny_control_fp32, tmp_path):
    """Engines of the tiny fp32 artifact with the ControlNets ``edges`` and ``depth``, built by the double."""
    use_double()
    out = tmp_path / "engines"
    build_engines(tiny_control_fp32, out, PROFILE, TensorRTBuildOptions())
    return out


def contexts(double) -> dict:
    """The double's execution contexts by network name."""
    return {c.engine.plan["name"]: c for c in double.records.contexts}


def values(seen: bytes) -> np.ndarray:
    return np.frombuffer(seen, dtype=np.float32)


def test_controlnet_engines_share_the_activation_buffer(use_double, control_engines):
    double = use_double()
    with Pipeline.from_artifacts(control_engines, backend="tensorrt", device="cpu") as pipe:
        assert pipe.controlnets == ["depth", "edges"]
        engines = pipe.engines
        assert {"controlnet_edges", "controlnet_depth"} <= set(engines)
        assert len({id(e._memory) for e in engines.values()}) == 1  # one buffer for every engine
        assert engines["controlnet_edges"].graph_capturable == engines["unet"].graph_capturable
    memories = {c.memory for c in double.records.contexts}
    assert len(memories) == 1 and next(iter(memories))[1] == 9000  # sized by the largest: a ControlNet


def test_controlnet_engine_outputs_follow_the_downscaled_latent_size(use_double, control_engines):
    use_double()
    with Pipeline.from_artifacts(control_engines, backend="tensorrt", device="cpu") as pipe:
        edges = pipe.engines["controlnet_edges"]
        feeds = {
            "sample": torch.randn(2, 4, 16, 12),
            "timestep": torch.full((2,), 500.0),
            "encoder_hidden_states": torch.randn(2, 77, 32),
            "controlnet_cond": torch.rand(2, 3, 128, 96),
        }
        out = edges.infer(feeds)
    assert [tuple(out[n].shape) for n in out] == [
        (2, 32, 16, 12),
        (2, 32, 16, 12),
        (2, 32, 8, 6),
        (2, 64, 8, 6),
        (2, 64, 8, 6),
    ]
    assert list(out) == [t.name for t in edges.outputs]


@pytest.mark.parametrize(
    "controls, scales",
    [([], {}), ([("edges", 0.5)], {"edges": 0.5}), ([("edges", 0.5), ("depth", 0.25)], {"edges": 0.5, "depth": 0.25})],
    ids=["none", "one", "two"],
)
def test_step_feeds_the_unet_the_scaled_sum_of_the_controlnets(use_double, control_engines, controls, scales):
    """Each step runs every active ControlNet once on the UNet's own inputs and the hint, and hands the UNet the sum
    of their residuals, each x its scale; without controls the UNet gets zeros and no ControlNet runs."""
    double = use_double()
    chosen = [control(name, scale=scale) for name, scale in controls]
    with Pipeline.from_artifacts(control_engines, backend="tensorrt", device="cpu") as pipe:
        result = pipe(PROMPT, steps=STEPS, seed=1, height=SIZE, width=SIZE, controls=chosen)
    assert result.images[0].size == (SIZE, SIZE)
    ran = contexts(double)
    unet = ran["unet"]
    assert unet.runs == STEPS
    for name in ("edges", "depth"):
        assert ran[f"controlnet_{name}"].runs == (STEPS if name in scales else 0)
    for step in range(STEPS):
        seen = unet.inputs_seen[step]
        # the double's ControlNets output their run count: step k is run k + 1
        expected = sum(scale * (step + 1) for scale in scales.values())
        assert unet.shapes["control_mid"] == (2, 64, 4, 4) and unet.shapes["control_down_0"] == (2, 32, 8, 8)
        for residual in ("control_down_0", "control_down_3", "control_mid"):
            assert np.all(values(seen[residual]) == np.float32(expected)), (step, residual)
        for name in scales:
            net = ran[f"controlnet_{name}"].inputs_seen[step]
            assert net["sample"] == seen["sample"] and net["timestep"] == seen["timestep"]
            assert net["encoder_hidden_states"] == seen["encoder_hidden_states"]
            hint = torch.from_numpy(np.asarray(HINTS[name])).float().div(255).permute(2, 0, 1)
            assert net["controlnet_cond"] == hint[None].expand(2, -1, -1, -1).contiguous().numpy().tobytes()


def test_guess_mode_runs_the_controlnet_on_the_conditional_rows(use_double, control_engines):
    """Guess mode with guidance: the ControlNet sees batch 1 (inside the profile's min batch), the UNet's
    unconditional row gets no residual."""
    double = use_double()
    with Pipeline.from_artifacts(control_engines, backend="tensorrt", device="cpu") as pipe:
        pipe(PROMPT, steps=STEPS, seed=1, height=SIZE, width=SIZE, controls=[control("edges", guess_mode=True)])
    ran = contexts(double)
    assert ran["controlnet_edges"].shapes["sample"] == (1, 4, 8, 8)
    mid = values(ran["unet"].inputs_seen[0]["control_mid"]).reshape(2, -1)
    assert np.all(mid[0] == 0) and np.all(mid[1] > 0)


# -- real TensorRT and CUDA (run where they exist) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_control_fp16(tmp_path_factory, tiny_bundle, tiny_profile, tiny_controlnets):
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    args = [ControlNetArg(str(path), name) for name, (path, _) in tiny_controlnets.items()]
    out = tmp_path_factory.mktemp("tiny-control-fp16") / "artifacts"
    options = ExportOptions(profile=tiny_profile, precision="fp16")
    export_artifacts(tiny_bundle, out, options, controlnets=load_controlnets(args, tiny_bundle.model))
    return out


@pytest.mark.trt
@pytest.mark.parametrize("precision, floor", [("fp32", 40.0), ("fp16", 30.0)])
def test_real_engines_with_a_controlnet_match_onnxruntime(request, tiny_control_fp32, tmp_path, precision, floor):
    """The step with one ControlNet on real engines, captured in a CUDA graph, against ONNX Runtime on the CPU."""
    artifact = tiny_control_fp32 if precision == "fp32" else request.getfixturevalue("tiny_control_fp16")
    out = tmp_path / "engines"
    build_engines(artifact, out, ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128), TensorRTBuildOptions(opt_level=1))
    args = {"steps": 4, "seed": 3, "height": SIZE, "width": SIZE}
    controls = [control("edges")]  # scale 1: the fixture ControlNets change the image well below 30 dB there
    with Pipeline.from_artifacts(artifact, backend="onnxruntime", device="cpu") as pipe:
        expected = pipe(PROMPT, controls=controls, **args).pixels
        plain = pipe(PROMPT, **args).pixels
    with Pipeline.from_artifacts(out, backend="tensorrt") as pipe:
        assert pipe.cuda_graph and pipe.controlnets == ["depth", "edges"]
        found = pipe(PROMPT, controls=controls, **args).pixels
        again = pipe(PROMPT, controls=controls, **args).pixels  # replays the captured step
        (denoiser,) = pipe._denoisers.values()
        assert denoiser.graph is not None  # the step with the ControlNet was captured
    assert psnr(found.cpu(), expected) >= floor
    assert torch.equal(found, again)
    assert psnr(expected, plain) < 30  # the ControlNet changed the image: parity is not parity with no control


@pytest.mark.gpu
@pytest.mark.parametrize("names", [("edges",), ("edges", "depth")])
def test_cuda_graph_step_with_controlnets_matches_eager(tiny_control_fp32, names):
    """The captured step with ControlNets replays the very function the eager step runs (torch backend on CUDA)."""
    results = {}
    controls = [control(name, scale=0.7, start=0.0, end=0.75) for name in names]
    for graph in (False, True):
        with Pipeline.from_artifacts(tiny_control_fp32, backend="torch", device="cuda", cuda_graph=graph) as pipe:
            assert pipe.cuda_graph is graph
            first = pipe(PROMPT, steps=4, seed=9, height=SIZE, width=SIZE, controls=controls)
            again = pipe(PROMPT, steps=4, seed=10, height=SIZE, width=SIZE, controls=controls)
            if graph:
                (denoiser,) = pipe._denoisers.values()  # the second call replayed the first one's capture
                assert denoiser.graph is not None
            results[graph] = (first.pixels, again.pixels)
    for eager, captured in zip(results[False], results[True], strict=True):
        assert psnr(eager, captured) >= 60
