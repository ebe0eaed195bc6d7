"""check_folder from Python: the rows, the verdict and the summary line that `sdtrt check` prints."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sdtrt.export.folder_check import CheckOptions, check_folder
from sdtrt.runtime.errors import ArtifactError, ConfigError, SdtrtError
from sdtrt.runtime.manifest import read_manifest


@dataclass(frozen=True)
class StubReport:
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "stub": True}


def test_float_artifact_passes_with_one_row_per_output_and_size(tiny_fp32):
    outputs = sum(len(e.outputs) for e in read_manifest(tiny_fp32).components.values())
    outcome = check_folder(tiny_fp32)
    assert outcome.kind == "artifact" and outcome.report is None and outcome.quantized == ()
    assert outcome.passed and not outcome.failed_rows
    # two sizes per output: text_encoder 2, unet 2 (with the step cache's feature), unet_shallow 1, VAE 1 + 2
    assert len(outcome.rows) == 2 * outputs == 16
    assert all(r.rel_l2 < 1e-4 for r in outcome.rows)
    assert outcome.summary == "all 16 checks passed"
    rows = json.loads(outcome.rows_json())
    assert len(rows) == 16 and all(r["passed"] for r in rows)
    assert {r["component"] for r in rows if r["output"] == "noise_pred"} == {"unet", "unet_shallow"}


def test_adherence_step_is_called_with_the_folder_and_judged(tiny_fp32, tmp_path):
    seen: list[Path] = []

    def adherence(folder: Path) -> StubReport:
        seen.append(folder)
        return StubReport(passed=False)

    outcome = check_folder(tiny_fp32, CheckOptions(seed=1, adherence=adherence))
    assert seen == [Path(tiny_fp32)]
    assert outcome.kind == "adherence" and not outcome.failed_rows and len(outcome.rows) == 16
    assert not outcome.passed and outcome.report_failed
    assert outcome.summary == "all checks passed, quality report failed"
    outcome.save_report(tmp_path / "sub" / "report.json")
    assert json.loads((tmp_path / "sub" / "report.json").read_text()) == {"passed": False, "stub": True}


def test_a_corrupted_file_fails(tiny_fp32, tmp_path):
    folder = tmp_path / "corrupted"
    shutil.copytree(tiny_fp32, folder)
    target = folder / read_manifest(folder).components["vae_decoder"].file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vae_decoder.onnx does not match the manifest \(sha256 .*re-export"):
        check_folder(folder)


def test_a_quantized_folder_without_a_quality_report_is_refused_before_any_check(tiny_fp32, tmp_path):
    folder = tmp_path / "int8"
    shutil.copytree(tiny_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["unet"]["precision"] = "int8"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"quantized components \(unet\).*CheckOptions\(quality="):
        check_folder(folder)


def test_progress_hears_every_component_and_reaches_the_adherence_step(tiny_fp32):
    from sdtrt.export.check import CHECK_PHASE

    calls: list[tuple[str, int, int]] = []

    def adherence(folder: Path, progress) -> StubReport:
        progress("adherence", 1, 1)
        return StubReport(passed=True)

    outcome = check_folder(tiny_fp32, CheckOptions(adherence=adherence), progress=lambda *call: calls.append(call))
    assert outcome.passed
    assert calls == [(CHECK_PHASE, k, 5) for k in range(6)] + [("adherence", 1, 1)]


def test_an_engine_folder_of_a_quantized_unet_goes_to_the_engine_check(tiny_fp32, tmp_path):
    """Engines are checked against their ONNX files whatever their precision: no quality report is asked for."""
    folder = tmp_path / "engines"
    shutil.copytree(tiny_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["kind"] = "tensorrt"
    manifest["components"]["unet"]["precision"] = "int8"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdtrtError) as caught:
        check_folder(folder)
    assert "quality report" not in str(caught.value)
