"""SD 2.x keeps working: a v-prediction model with an OpenCLIP-wide (1024) text encoder, against diffusers."""

from __future__ import annotations

import pytest
import torch

from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.export.profiles import default_profile
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline
from tests.conftest import make_sd2_bundle

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd2_bundle() -> ModelBundle:
    """tiny with SD 2.x's traits: 1024-wide text, linear projections, upcast attention, v-prediction, "!" padding."""
    return make_sd2_bundle()


def test_v_prediction_model_matches_diffusers(tmp_path, sd2_bundle):
    assert (sd2_bundle.model.family, sd2_bundle.model.prediction_type) == ("sd2", "v_prediction")
    out = tmp_path / "sd2"
    export_artifacts(sd2_bundle, out, ExportOptions(profile=default_profile(sd2_bundle)))
    reference = diffusers_pipeline(sd2_bundle, "euler")
    reference.tokenizer.pad_token = "!"  # SD 2.x's tokenizer pads with "!" (id 0)
    with Pipeline.from_artifacts(out, device="cpu") as pipe:
        assert pipe.default_scheduler == "euler" and pipe.tokenizer.pad_id == 0
        result = pipe("a cat on a sofa", negative_prompt="blurry", steps=4, guidance_scale=7.5, seed=1)
    assert result.images[0].size == (128, 128)  # native: sample size 16 x VAE factor 8
    with torch.no_grad():
        expected = reference(
            "a cat on a sofa", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(1), output_type="pt", height=128, width=128,
        ).images  # fmt: skip
    assert psnr(result.pixels, expected) >= 40
