"""What step caching costs when it is not used: the uncached-run comparison of two real exports, and the size the
shallow UNet adds, counted without exporting and checked against a real export."""

from __future__ import annotations

import json

import pytest

from sdtrt.benchmarks.step_cache_overhead import main as overhead_main
from sdtrt.benchmarks.step_cache_sizes import main as sizes_main
from sdtrt.benchmarks.step_cache_sizes import shallow_size
from sdtrt.runtime.models.presets import preset_configs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny preset exported (fp32, 64x64) with and without step caching."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.profile import ShapeProfile
    from sdtrt.runtime.specs import required_components

    root = tmp_path_factory.mktemp("step-cache-pair")
    folders = []
    for step_cache in (True, False):
        bundle = load_preset("tiny")  # a fresh one: the export records the cache settings in bundle.model
        options = ExportOptions(profile=ShapeProfile.static(64, 64, 1), components=required_components(bundle.model),
                                step_cache=step_cache)  # fmt: skip
        export_artifacts(bundle, root / f"cache-{step_cache}", options)
        folders.append(root / f"cache-{step_cache}")
    return folders


def test_uncached_runs_of_both_exports_interleave(pair, tmp_path, capsys):
    with_cache, without = pair
    out = tmp_path / "overhead.json"
    overhead_main([str(with_cache), str(without), "--steps", "2", "--runs", "2", "--warmup", "0", "--json", str(out)])
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["artifact"], r["round"], r["position"]) for r in rows] == [
        ("with step cache", 0, 0), ("without", 0, 1), ("without", 1, 0), ("with step cache", 1, 1),
    ]  # fmt: skip
    assert all(r["cache_interval"] == 1 and 0 < r["denoise_s"] < r["end_to_end_s"] for r in rows)
    medians = record["summary"]["medians"]
    ratio = medians["with step cache"]["denoise_s"] / medians["without"]["denoise_s"]
    assert record["summary"]["with_over_without"]["denoise_s"] == pytest.approx(ratio)
    by_round = {(r["artifact"], r["round"]): r["denoise_s"] for r in rows}
    per_round = [by_round[("with step cache", k)] / by_round[("without", k)] for k in (0, 1)]
    assert record["summary"]["denoise_per_round"] == pytest.approx(per_round)
    assert "with / without: denoise " in capsys.readouterr().out


def test_the_two_folders_must_be_a_with_and_without_pair(pair):
    with_cache, without = pair
    with pytest.raises(SystemExit, match=r"^error: expected .* exported with step caching and .* without; found"):
        overhead_main([str(without), str(with_cache), "--runs", "1"])


def test_counted_shallow_size_matches_the_exported_graph(pair):
    """The parameter count (meta device, no export) times 4 bytes is the fp32 unet_shallow.onnx's weights: the file
    holds them plus the graph itself (nodes, shapes, folded constants), well under 128 KiB at any model size."""
    unet_config = preset_configs("tiny")[1]
    size = shallow_size(unet_config, 0)
    exported = (pair[0] / "unet_shallow.onnx").stat().st_size
    assert size["shallow_params"] * 4 <= exported <= size["shallow_params"] * 4 + 128 * 1024
    assert 0 < size["shallow_params"] < size["unet_params"]
    deeper = shallow_size(unet_config, size["skips"] - 1)  # the deepest branch skips only the middle block
    assert size["shallow_params"] < deeper["shallow_params"] < size["unet_params"]


def test_sizes_table_and_a_branch_the_unet_lacks(capsys):
    sizes_main(["--presets", "tiny", "--branches", "0,1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["tiny", "0"], ["tiny", "1"]]
    with pytest.raises(SystemExit, match=r"^error: skip branch 9 does not exist in this UNet: it has 4 skip"):
        sizes_main(["--presets", "tiny", "--branches", "9"])
