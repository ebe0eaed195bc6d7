"""The shipped outline ControlNet: a diffusers folder in fp16 that loads, matches its record, and is refused when
damaged."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.models.controlnet import load_controlnet
from sdtrt.runtime.models.presets import (
    CONTROLNET_WEIGHTS_NAME,
    DATA_DIR,
    SHIPPED_CONTROLNET_NAMES,
    SHIPPED_CONTROLNETS,
    load_shapes,
    read_shapes_record,
    shipped_controlnet,
)
from sdtrt.shapes.control_score import TARGETS

FOLDER = SHIPPED_CONTROLNETS["shapes-outline"]
RECORD = json.loads((DATA_DIR / "shapes-outline.json").read_text())


def test_shipped_folder_is_found_by_name_and_matches_its_record():
    assert shipped_controlnet("shapes-outline") == FOLDER
    assert SHIPPED_CONTROLNET_NAMES["shapes-outline"] == "outline"
    assert shipped_controlnet("control_v11p_sd15_canny") is None
    assert sha256_file(FOLDER / CONTROLNET_WEIGHTS_NAME) == RECORD["sha256"]
    assert RECORD["base_model"]["sha256"] == read_shapes_record()["sha256"]
    for key in ("controlnet", "training", "parameters", "bytes"):
        assert key in RECORD
    assert RECORD["training"]["data"]["data_seed"] == RECORD["training"]["settings"]["seed"] + 1


def test_shipped_weights_are_fp16_and_load_as_a_controlnet_of_the_shapes_model():
    with safe_open(str(FOLDER / CONTROLNET_WEIGHTS_NAME), "pt") as weights:
        dtypes = {str(weights.get_slice(k).get_dtype()) for k in weights.keys()}
    assert dtypes == {"F16"}
    source = load_controlnet(FOLDER)
    assert source.family == "sd1" and source.format == "diffusers_folder"
    unet = load_shapes().unet
    assert source.cross_attention_dim == unet.config.cross_attention_dim
    assert source.residual_count == len(unet.down_blocks) * (unet.config.layers_per_block + 1) + 1
    # Trained: the zero convolutions, which start at zero, are not zero any more.
    assert float(source.model.controlnet_mid_block.weight.abs().max()) > 0


def test_recorded_quality_meets_the_targets():
    quality = RECORD.get("quality")
    if not quality:
        pytest.fail("shapes-outline.json has no measured quality; run python -m sdtrt.shapes.evaluate_control --record")
    for name, report in quality.items():
        at_1, at_0 = report["scale_1"], report["scale_0"]
        for target, goal in TARGETS.items():
            assert at_1[target] >= goal, f"{name}: {target} {at_1[target]} < {goal}"
        assert at_0["mean_iou"] < at_1["mean_iou"] - 0.2, f"{name}: the scale-0 figure must drop"


def test_a_damaged_controlnet_is_refused(tmp_path):
    shutil.copytree(FOLDER, tmp_path / FOLDER.name)
    shutil.copy(DATA_DIR / "shapes-outline.json", tmp_path / "shapes-outline.json")
    assert shipped_controlnet("shapes-outline", tmp_path) == tmp_path / FOLDER.name
    weights = tmp_path / FOLDER.name / CONTROLNET_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SourceError, match="damaged or were replaced: expected sha256 .*; reinstall sdtrt"):
        shipped_controlnet("shapes-outline", tmp_path)
    (tmp_path / "shapes-outline.json").unlink()
    with pytest.raises(SourceError, match="record .* is missing or unreadable"):
        shipped_controlnet("shapes-outline", tmp_path)
