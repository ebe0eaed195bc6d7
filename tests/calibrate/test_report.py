"""The quality report's table and its held-out prompts: labelled columns only, each prompt once."""

from __future__ import annotations

import pytest

from sdtrt.calibrate.measure import held_out_prompts
from sdtrt.calibrate.report import ImageRow, QualityReport, StepRow, format_report
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.manifest import read_manifest


def _report(fp16: bool) -> QualityReport:
    half = 0.02 if fp16 else None
    return QualityReport(
        artifact="int8",
        precision="int8",
        unquantized_dtype="fp32",
        reference="fp32",
        references={"fp32": "fp32"} | ({"fp16": "fp16"} if fp16 else {}),
        size="128x128",
        steps=[StepRow(0, 999.0, 0.01, 0.012, half), StepRow(1, 500.0, 0.02, 0.021, half)],
        images=[ImageRow("a red circle on a blue background", 1000, 41.5, 40.0 if fp16 else None)],
        max_rel_l2=0.15,
        min_psnr_db=15.0,
    )


def test_table_without_an_fp16_reference_has_no_unlabelled_column():
    lines = format_report(_report(fp16=False)).splitlines()
    assert "fp16" not in "\n".join(lines)
    body = lines[2:4] + lines[5:6]  # the step rows and the image row
    assert all(not line.rstrip().endswith("-") for line in body), body
    assert [len(line.split()) for line in lines[2:4]] == [4, 4]  # step, timestep, rel L2, ORT kernels


def test_table_with_an_fp16_reference_labels_its_columns():
    lines = format_report(_report(fp16=True)).splitlines()
    assert lines[1].endswith("rel L2 vs fp16") and lines[4].endswith("vs fp16")
    assert lines[2].endswith("0.0200") and lines[5].endswith("40.0")


def test_held_out_prompts_are_distinct_and_the_limit_says_how_many(tiny_fp32):
    manifest = read_manifest(tiny_fp32)
    candidates = ("a", "b", "a", "c", "b", "d")
    assert held_out_prompts(manifest, 3, candidates) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="at most 4 distinct held-out prompts are available, asked for 5; ask for 4"):
        held_out_prompts(manifest, 5, candidates)
