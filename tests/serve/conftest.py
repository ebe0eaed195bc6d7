"""Fixtures of the serving tests: an artifact without the shallow UNet (step caching refused)."""

from __future__ import annotations

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
