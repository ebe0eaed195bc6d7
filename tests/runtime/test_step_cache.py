"""Step caching: the split of the UNet is exact, interval 1 changes nothing, and the cached pipeline is close.

- Exactness (the tests that catch wrong wiring: wrong block, wrong skip connection, wrong concatenation order): the
  shallow UNet fed the feature the full UNet gave at the same step returns the full UNet's prediction, relative L2
  <= 1e-5 in fp32, for every skip branch of tiny and tiny-xl, in PyTorch and as exported ONNX; fed another step's
  feature it does not (so the check can fail).
- Interval 1 on a step-cache artifact gives the image of an artifact exported without step caching, bit for bit.
- Cached images are close to uncached ones (>= 30 dB) but not equal, on every sampler, with CFG off, SDXL,
  img2img, two images per call, a LoRA and a ControlNet; ONNX Runtime and torch agree on them (>= 40 dB); the
  shallow UNet runs on exactly the steps the plan says.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.runtime.cache_plan import full_steps
from sdtrt.runtime.compare import psnr, rel_l2
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.models.step_cache import FeatureUNet, ShallowUNet, cache_split, skip_count
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.specs import residual_layout

SPLIT_TOL = 1e-5
CLOSE_DB, PARITY_DB = 30.0, 40.0
SIZE, STEPS, SEED = 64, 7, 3
PROMPT = "a photo of a cat on a red sofa"


def unet_inputs(unet, xl: bool, seed: int, side: int = 16):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, side, side, generator=generator)
    timestep = torch.tensor([700.0, 700.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    extra = ()
    if xl:
        width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra = (torch.randn(2, width, generator=generator), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    layout = residual_layout(unet.config.block_out_channels, unet.config.layers_per_block)
    residuals = tuple(torch.randn(2, c, side // f, side // f, generator=generator) * 0.2 for c, f in layout)
    return sample, timestep, context, extra, residuals


@pytest.mark.parametrize("preset", ["tiny", "tiny-xl"])
def test_shallow_unet_fed_the_full_steps_feature_gives_the_full_prediction(preset):
    unet, xl = load_preset(preset).unet.eval(), preset == "tiny-xl"
    sample, timestep, context, extra, residuals = unet_inputs(unet, xl, 0)
    other = unet_inputs(unet, xl, 1)[0]
    added = {"text_embeds": extra[0], "time_ids": extra[1]} if xl else None
    with torch.no_grad():
        reference = unet(
            sample,
            timestep,
            context,
            added_cond_kwargs=added,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]
        for branch in range(skip_count(unet)):
            split = cache_split(unet, branch)
            full, feature = FeatureUNet(unet, split, xl)(sample, timestep, context, *extra, *residuals)
            assert torch.equal(full, reference), "the feature hook must not change the UNet's prediction"
            assert tuple(feature.shape[1:]) == (split.feature[0], 16 // split.feature[1], 16 // split.feature[1])
            shallow = ShallowUNet(unet, split, xl, control=True)
            text = (context,) if split.context else ()
            fresh = residuals[: split.fresh_skips]
            assert rel_l2(shallow(sample, timestep, *text, *extra, *fresh, feature), full) <= SPLIT_TOL
            # another step's feature (a different sample) gives another prediction: the check above can fail
            _, stale = FeatureUNet(unet, split, xl)(other, timestep, context, *extra, *residuals)
            assert rel_l2(shallow(sample, timestep, *text, *extra, *fresh, stale), full) > 1e-3


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_exported_shallow_unet_matches_the_exported_full_unet(tmp_path, tiny_bundle, tiny_profile, branch):
    import onnxruntime as ort

    options = ExportOptions(profile=tiny_profile, components=("unet",), cache_branch=branch)
    export_artifacts(load_preset("tiny"), tmp_path / "a", options)
    manifest = read_manifest(tmp_path / "a")
    assert set(manifest.components) == {"unet", "unet_shallow"}
    assert manifest.model.cache_branch == branch
    assert tuple(manifest.model.cache_feature) == cache_split(tiny_bundle.unet, branch).feature
    full = ort.InferenceSession(str(tmp_path / "a" / "unet.onnx"))
    shallow = ort.InferenceSession(str(tmp_path / "a" / "unet_shallow.onnx"))
    sample, timestep, context, _, residuals = unet_inputs(tiny_bundle.unet, False, 2)
    names = [i.name for i in full.get_inputs()]
    feeds = dict(zip(names, (t.numpy() for t in (sample, timestep, context, *residuals)), strict=True))
    noise, feature = full.run(["noise_pred", "cache_feature"], feeds)
    shallow_feeds = {i.name: feeds.get(i.name, feature) for i in shallow.get_inputs()}
    assert [i.name for i in shallow.get_inputs()][-1] == "cache_feature"
    assert len(shallow_feeds) == 3 + branch + 2  # sample, timestep, context, control_down_0..branch, feature
    (out,) = shallow.run(None, shallow_feeds)
    assert np.linalg.norm(out - noise) / np.linalg.norm(noise) <= SPLIT_TOL


def test_a_branch_the_unet_does_not_have_is_refused_before_export(tmp_path, tiny_profile):
    from sdtrt.runtime.errors import ExportError, ShapeError

    with pytest.raises(ShapeError, match="skip branch 4 does not exist in this UNet: it has 4 skip connections"):
        export_artifacts(load_preset("tiny"), tmp_path / "a", ExportOptions(profile=tiny_profile, cache_branch=4))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ExportError, match="skip branch must be 0 or more"):
        ExportOptions(profile=tiny_profile, cache_branch=-1)


@pytest.fixture(scope="module")
def plain_fp32(tmp_path_factory, tiny_profile):
    """The tiny model exported without step caching (as before it existed)."""
    out = tmp_path_factory.mktemp("tiny-plain") / "artifacts"
    export_artifacts(load_preset("tiny"), out, ExportOptions(profile=tiny_profile, step_cache=False))
    return out


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def pipe(request, tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend=request.param, device="cpu") as opened:
        yield opened


def run(pipe, interval: int = 1, **kwargs) -> torch.Tensor:
    call = {"steps": STEPS, "seed": SEED, "height": SIZE, "width": SIZE, "scheduler": "euler"} | kwargs
    return pipe(PROMPT, negative_prompt="blurry", cache_interval=interval, **call).pixels


def test_interval_1_gives_the_image_of_an_artifact_without_step_caching_bit_for_bit(tiny_fp32, plain_fp32):
    assert "unet_shallow" in read_manifest(tiny_fp32).components
    assert "unet_shallow" not in read_manifest(plain_fp32).components
    for backend in ("onnxruntime", "torch"):
        with (
            Pipeline.from_artifacts(tiny_fp32, backend=backend) as cached,
            Pipeline.from_artifacts(plain_fp32, backend=backend) as plain,
        ):
            for scheduler in ("euler_a", "dpmpp_2m"):
                assert torch.equal(run(cached, 1, scheduler=scheduler), run(plain, 1, scheduler=scheduler))


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_cached_images_are_close_to_uncached_on_every_sampler(pipe, scheduler):
    uncached = run(pipe, 1, scheduler=scheduler)
    for interval, schedule in ((2, "uniform"), (3, "uniform"), (3, "quadratic")):
        cached = run(pipe, interval, scheduler=scheduler, cache_schedule=schedule)
        assert not torch.equal(cached, uncached)
        assert psnr(cached, uncached) >= CLOSE_DB, (interval, schedule)


@pytest.mark.parametrize(
    "kwargs",
    [{"guidance_scale": 1.0}, {"num_images": 2, "seed": [5, 9]}, {"cache_schedule": "quadratic", "steps": 12}],
    ids=["cfg-off", "batch-2", "quadratic-12"],
)
def test_onnxruntime_and_torch_agree_on_cached_images(tiny_fp32, kwargs):
    with (
        Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime") as ort_pipe,
        Pipeline.from_artifacts(tiny_fp32, backend="torch") as torch_pipe,
    ):
        a, b = run(ort_pipe, 3, **kwargs), run(torch_pipe, 3, **kwargs)
        assert psnr(a, b) >= PARITY_DB
        assert psnr(a, run(ort_pipe, 1, **kwargs)) >= CLOSE_DB


def test_batch_images_equal_their_single_runs(pipe):
    both = run(pipe, 3, num_images=2, seed=[5, 9])
    for k, seed in enumerate((5, 9)):
        assert psnr(both[k : k + 1], run(pipe, 3, seed=seed)) >= 60.0


class CountingEngine:
    """Stands for an engine, counting its calls."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0
        self.name, self.inputs, self.outputs = engine.name, engine.inputs, engine.outputs
        self.device, self.graph_capturable = engine.device, engine.graph_capturable

    def infer(self, feeds):
        self.calls += 1
        return self.engine.infer(feeds)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize("strength", [None, 0.6])
def test_the_shallow_unet_runs_on_the_steps_the_plan_says(tiny_fp32, strength):
    image = Image.new("RGB", (SIZE, SIZE), (200, 40, 40)) if strength else None
    with Pipeline.from_artifacts(tiny_fp32) as pipe:
        full, shallow = pipe.wrap_engine("unet", CountingEngine), pipe.wrap_engine("unet_shallow", CountingEngine)
        steps = 12
        kwargs = {"image": image, "strength": strength} if strength else {}
        run(pipe, 3, steps=steps, **kwargs)
        first = 0 if strength is None else steps - int(steps * strength)
        plan = full_steps(steps, first, 3)
        assert full.calls == sum(plan) and shallow.calls == steps - first - sum(plan)
        assert plan[first] and plan[-1] and shallow.calls > 0  # the plan counts from the first step run


def test_sdxl_cached_images_are_close_and_backends_agree(tiny_xl_fp32):
    kwargs = {"steps": 6, "height": SIZE, "width": SIZE}
    with (
        Pipeline.from_artifacts(tiny_xl_fp32) as ort_pipe,
        Pipeline.from_artifacts(tiny_xl_fp32, backend="torch") as torch_pipe,
    ):
        cached, uncached = run(ort_pipe, 2, **kwargs), run(ort_pipe, 1, **kwargs)
        assert not torch.equal(cached, uncached) and psnr(cached, uncached) >= CLOSE_DB
        assert psnr(cached, run(torch_pipe, 2, **kwargs)) >= PARITY_DB


@pytest.fixture(scope="module")
def tiny_xl_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-xl-cache") / "artifacts"
    from sdtrt.runtime.profile import ShapeProfile

    export_artifacts(load_preset("tiny-xl"), out, ExportOptions(profile=ShapeProfile.square(64, 64, 128)))
    return out


def test_bad_cache_arguments_are_refused_before_any_work(tiny_fp32, plain_fp32):
    with Pipeline.from_artifacts(tiny_fp32) as pipe:
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ConfigError, match="cache interval must be an integer >= 1"):
                run(pipe, bad)
        with pytest.raises(ConfigError, match="cache schedule must be one of uniform, quadratic, got 'sometimes'"):
            run(pipe, 2, cache_schedule="sometimes")
    with Pipeline.from_artifacts(plain_fp32) as pipe, pytest.raises(ArtifactError, match="--step-cache"):
        run(pipe, 2)


def test_cli_generates_cached_and_refuses_bad_cache_options(tmp_path, tiny_fp32, plain_fp32):
    def sdtrt(*args):
        return subprocess.run([sys.executable, "-m", "sdtrt.cli", *args], capture_output=True, text=True, timeout=300)

    common = ["--steps", "6", "--size", "64", "--seed", "1"]
    done = sdtrt("generate", str(tiny_fp32), PROMPT, *common, "--cache-interval", "3", "--out", str(tmp_path / "a.png"))
    assert done.returncode == 0, done.stderr
    parameters = Image.open(tmp_path / "a.png").info["parameters"]
    assert "Cache interval: 3" in parameters and "Cache schedule: uniform" in parameters
    cases = [
        (tiny_fp32, ["--cache-interval", "0"], "cache interval must be an integer >= 1"),
        (tiny_fp32, ["--cache-interval", "-3"], "cache interval must be an integer >= 1"),
        (tiny_fp32, ["--cache-interval", "2", "--cache-schedule", "often"], "cache schedule must be one of"),
        (plain_fp32, ["--cache-interval", "2"], "re-export the model with `sdtrt export MODEL --step-cache`"),
    ]
    for folder, options, message in cases:
        done = sdtrt("generate", str(folder), PROMPT, *common, *options, "--out", str(tmp_path / "b.png"))
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "b.png").exists()
    done = sdtrt("export", "tiny", "--out", str(tmp_path / "deep"), "--cache-branch", "7")
    assert done.returncode != 0 and "skip branch 7 does not exist in this UNet" in done.stderr
    assert not (tmp_path / "deep").exists()
