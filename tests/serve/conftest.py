"""Fixtures of the serving tests: an artifact without the shallow UNet (step caching refused), a folder of two
models (``sdtrt serve`` with several checkpoints), and webuiapi's shared default arguments kept empty between
tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def no_shallow(tmp_path_factory, tiny_bundle, tiny_profile) -> Path:
    """The tiny model exported without the shallow UNet (``sdtrt export --no-step-cache``)."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts

    out = tmp_path_factory.mktemp("tiny-no-step-cache") / "artifacts"
    components = ("text_encoder", "unet", "vae_decoder")
    export_artifacts(tiny_bundle, out, ExportOptions(profile=tiny_profile, components=components, step_cache=False))
    return out


@pytest.fixture(scope="session")
def other_fp32(tmp_path_factory, tiny_profile) -> Path:
    """A second tiny model (other weights, so other images and another sha256), exported as ``tiny_fp32`` is."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset

    out = tmp_path_factory.mktemp("tiny-other") / "artifacts"
    export_artifacts(load_preset("tiny", seed=11), out, ExportOptions(profile=tiny_profile))
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_fp32, other_fp32) -> Path:
    """A folder of two models as ``sdtrt serve`` takes it: ``alpha`` (``tiny_fp32``) and ``beta`` (``other_fp32``),
    linked in (each subfolder with a manifest is one model)."""
    root = tmp_path_factory.mktemp("models")
    (root / "alpha").symlink_to(tiny_fp32, target_is_directory=True)
    (root / "beta").symlink_to(other_fp32, target_is_directory=True)
    (root / "notes").mkdir()  # a subfolder without a manifest is not a model
    return root


@pytest.fixture(autouse=True)
def fresh_webuiapi_defaults():
    """webuiapi's ``txt2img``/``img2img`` take mutable default dicts and lists (``alwayson_scripts``,
    ``override_settings``, ...) and write into them (ControlNet units go into ``alwayson_scripts``), so one test's
    request would leak into the next test's: empty them after each test."""
    yield
    webuiapi = sys.modules.get("webuiapi")
    if webuiapi is None:
        return
    for name in ("txt2img", "img2img"):
        for default in getattr(webuiapi.WebUIApi, name).__defaults__ or ():
            if isinstance(default, dict | list):
                default.clear()
