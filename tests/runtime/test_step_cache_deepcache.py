"""Step caching against an implementation written elsewhere: the ``deepcache`` package's ``DeepCacheSDHelper``.

The helper patches diffusers' own ``StableDiffusionPipeline`` in PyTorch (it caches the outputs of the deep blocks
and replays them on the steps between full ones); sdtrt runs its exported full and shallow UNets on ONNX Runtime.
Same weights, seed, sampler (euler), interval and skip branch: the images must agree to >= 40 dB, while the cached
images differ clearly from the uncached ones (so the comparison can fail).

What of the package runs with current diffusers: only ``DeepCacheSDHelper`` with ``skip_mode='uniform'``. Its own
pipelines (``DeepCache.sd.pipeline_stable_diffusion``, the only code with the non-uniform schedule) fail to import
("cannot import name 'PositionNet' from diffusers.models.embeddings"), and the helper's other skip modes never run a
full step. So for the non-uniform ("quadratic") schedule the test subclasses the helper and drives its skip decision
from ``paper_quadratic_steps`` below: the schedule re-implemented here from the DeepCache paper (its full steps are
also checked against sdtrt's plan, ``cache_plan.full_steps``). The helper's uniform rule does not force the last
step full, so the step counts here make the last step index a multiple of the interval.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.export.profiles import default_profile
from sdtrt.runtime.cache_plan import full_steps
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.models.bundle import ModelBundle, model_info
from sdtrt.runtime.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, preset_configs
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.models.tokenizer import clip_tokenizer
from sdtrt.runtime.pipeline import Pipeline
from tests.conftest import make_sd2_bundle

deepcache = pytest.importorskip("DeepCache")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry"
SIZE = 128
GUIDANCE = 7.5
SEED = 4
AGREE_DB = 40.0  # sdtrt cached vs DeepCache cached
CACHED_DIFFERS_DB = 60.0  # sdtrt cached vs sdtrt uncached must fall below this (ONNX vs PyTorch agree to >= 60)


def paper_quadratic_steps(steps: int, interval: int, centre: float = 0.3, power: float = 1.4) -> set[int]:
    """DeepCache's non-uniform schedule, from the paper: ceil(steps / interval) full steps at
    ``c + sign(x) |x| ** p`` for ``x`` evenly spaced, ``c`` the centre step (15 of 50: 30 % of the way), ``p``
    lowered from 1.4 in steps of 0.02 until the steps are distinct; first and last step full."""
    c, count = centre * (steps - 1), math.ceil(steps / interval)
    while True:
        x = np.linspace(-(c ** (1 / power)), (steps - 1 - c) ** (1 / power), count)
        chosen = {int(v) for v in np.clip(np.round(c + np.sign(x) * np.abs(x) ** power), 0, steps - 1)}
        if len(chosen) >= count or power <= 1.0:
            return chosen | {0, steps - 1}
        power = max(1.0, power - 0.02)


class ScheduledHelper(deepcache.DeepCacheSDHelper):
    """The package's helper with its skip decision taken from a set of full steps (its own rule is uniform only)."""

    def __init__(self, pipe, full: set[int]) -> None:
        super().__init__(pipe=pipe)
        self.full = full

    def is_skip_step(self, block_i, layer_i, blocktype="down"):
        if self.start_timestep is None:
            self.start_timestep = self.cur_timestep
        if self.cur_timestep - self.start_timestep in self.full:
            return False
        # The helper's depth rule alone (a skip mode other than 'uniform' goes straight to it).
        mode, self.params["skip_mode"] = self.params["skip_mode"], "scheduled"
        try:
            return super().is_skip_step(block_i, layer_i, blocktype)
        finally:
            self.params["skip_mode"] = mode


def deepcache_image(bundle: ModelBundle, steps: int, interval: int, branch: int, full: set[int] | None = None):
    """diffusers' pipeline (euler) with the helper on: ``full`` None uses the helper's own uniform rule."""
    pipe = diffusers_pipeline(bundle, "euler")
    if bundle.model.prediction_type == "v_prediction":
        pipe.tokenizer.pad_token = "!"  # SD 2.x's tokenizer pads with "!" (id 0)
    helper = deepcache.DeepCacheSDHelper(pipe=pipe) if full is None else ScheduledHelper(pipe, full)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="uniform")
    # The helper numbers branches for 3 resnets per up block (SD 1.x/2.x): block = id // 3, resnet = id % 3.
    per_block = len(bundle.unet.up_blocks[0].resnets)
    helper.params["cache_block_id"], helper.params["cache_layer_id"] = divmod(branch, per_block)
    helper.enable()
    try:
        with torch.no_grad():
            return pipe(
                PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(SEED), output_type="pt", height=SIZE, width=SIZE,
            ).images.float()  # fmt: skip
    finally:
        helper.disable()  # the UNet is shared with other tests


def sdtrt_images(folder, steps: int, interval: int, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached, uncached) pixels of sdtrt's ONNX Runtime pipeline."""
    with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu") as pipe:
        common = {"negative_prompt": NEGATIVE, "steps": steps, "guidance_scale": GUIDANCE, "seed": SEED}
        common |= {"height": SIZE, "width": SIZE, "scheduler": "euler"}
        cached = pipe(PROMPT, cache_interval=interval, cache_schedule=schedule, **common).pixels
        return cached, pipe(PROMPT, **common).pixels


def check_against_deepcache(bundle, folder, steps: int, interval: int, branch: int, schedule: str) -> None:
    """sdtrt cached ~ DeepCache cached (>= 40 dB), and both clearly away from sdtrt uncached."""
    if schedule == "uniform":
        assert (steps - 1) % interval == 0, "the helper's uniform rule would leave the last step shallow"
        expected = deepcache_image(bundle, steps, interval, branch)
    else:
        full = paper_quadratic_steps(steps, interval)
        assert tuple(i in full for i in range(steps)) == full_steps(steps, 0, interval, schedule)
        expected = deepcache_image(bundle, steps, interval, branch, full)
    cached, uncached = sdtrt_images(folder, steps, interval, schedule)
    assert cached.shape == expected.shape == (1, 3, SIZE, SIZE) and cached.std() > 0.01
    agree, apart = psnr(cached, expected), psnr(cached, uncached)
    print(f"branch {branch} N={interval} {schedule}: vs DeepCache {agree:.1f} dB, vs uncached {apart:.1f} dB")
    assert agree >= AGREE_DB, (agree, apart)
    assert apart < CACHED_DIFFERS_DB and apart < agree - 10, (agree, apart)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(bundle, branch) -> an fp32 artifact with the shallow UNet cut at that branch, exported once per module."""
    folders = {}

    def get(bundle: ModelBundle, branch: int):
        key = (id(bundle), branch)  # module-scoped bundles: one id each
        if key not in folders:
            folders[key] = tmp_path_factory.mktemp(f"{bundle.model.family}-branch{branch}") / "artifacts"
            options = ExportOptions(profile=default_profile(bundle), cache_branch=branch)
            export_artifacts(bundle, folders[key], options)
        return folders[key]

    return get


@pytest.mark.parametrize(("branch", "schedule"), [(0, "uniform"), (0, "quadratic"), (2, "uniform"), (3, "quadratic")])
def test_tiny_matches_deepcache(exported, tiny_bundle, branch, schedule):
    check_against_deepcache(
        tiny_bundle, exported(tiny_bundle, branch), steps=7, interval=3, branch=branch, schedule=schedule
    )


@pytest.fixture(scope="module")
def plain_outer_bundle() -> ModelBundle:
    """tiny with its outer blocks free of cross-attention, as SDXL and shapes have them: a shallow UNet of branch 0
    never reads the text context, so it has no such input."""
    unet_cfg = {**TINY_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}
    unet_cfg["up_block_types"] = ["CrossAttnUpBlock2D", "UpBlock2D"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)).eval().requires_grad_(False)
        unet = diffusers.UNet2DConditionModel(**unet_cfg).eval().requires_grad_(False)
        vae = diffusers.AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    scheduler = preset_configs("tiny")[3]
    return ModelBundle(text, unet, vae, clip_tokenizer(), scheduler, model_info(text, unet, vae, scheduler))


def test_shallow_unet_without_text_context_matches_deepcache(exported, plain_outer_bundle):
    onnx = pytest.importorskip("onnx")
    folder = exported(plain_outer_bundle, 0)
    graph = onnx.load(str(folder / "unet_shallow.onnx"), load_external_data=False).graph
    assert "encoder_hidden_states" not in [i.name for i in graph.input]
    check_against_deepcache(plain_outer_bundle, folder, steps=7, interval=3, branch=0, schedule="uniform")


@pytest.fixture(scope="module")
def sd2_bundle() -> ModelBundle:
    """An SD-2-style model with two resnets per down block as SD 2.x has (so the helper's own branch numbering
    applies unchanged)."""
    return make_sd2_bundle(layers_per_block=2)


@pytest.mark.parametrize(
    ("branch", "schedule", "steps"),
    [
        (0, "uniform", 10),
        pytest.param(4, "uniform", 10, marks=pytest.mark.slow),  # each SD-2-style case: about 20 s
        pytest.param(1, "quadratic", 9, marks=pytest.mark.slow),
    ],
)
def test_sd2_style_matches_deepcache(exported, sd2_bundle, branch, schedule, steps):
    assert (sd2_bundle.model.family, sd2_bundle.model.prediction_type) == ("sd2", "v_prediction")
    folder = exported(sd2_bundle, branch)
    check_against_deepcache(sd2_bundle, folder, steps=steps, interval=3, branch=branch, schedule=schedule)


@pytest.mark.parametrize("steps", [7, 10, 20, 25, 50])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_quadratic_plan_follows_the_paper(steps, interval):
    plan = full_steps(steps, 0, interval, "quadratic")
    assert {i for i, full in enumerate(plan) if full} == paper_quadratic_steps(steps, interval)
