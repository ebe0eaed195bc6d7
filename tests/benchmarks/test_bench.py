"""The benchmark harness: rows complete, summaries consistent with the rows (no timing assertions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sdtrt.benchmarks.harness import BenchConfig, run_benchmark
from sdtrt.benchmarks.report import format_table, percentile, summarize
from sdtrt.runtime.errors import ConfigError, ShapeError

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
ROW_KEYS = {
    "backend",
    "run",
    "precision",
    "text_encode_s",
    "denoise_s",
    "step_median_s",
    "vae_decode_s",
    "end_to_end_s",
    "images_per_s",
    "it_per_s",
    "loop_overhead_s",
    "peak_memory_bytes",
    "config",
    "env",
}


def test_bench_cli_rows_table_and_plot(tmp_path):
    out, chart = tmp_path / "rows.json", tmp_path / "chart.png"
    result = subprocess.run(
        [
            SDTRT,
            "bench",
            "tiny",
            "--backends",
            "onnxruntime,torch,diffusers",
            "--size",
            "64x64",
            "--steps",
            "3",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--precision",
            "fp32",
            "--json",
            str(out),
            "--plot",
            str(chart),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    rows, summary = data["rows"], data["summary"]
    assert [r["backend"] for r in rows] == ["onnxruntime"] * 2 + ["torch"] * 2 + ["diffusers"] * 2
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["end_to_end_s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["config"]["steps"] == 3 and row["env"]["torch"]
        assert row["it_per_s"] == pytest.approx(3 / row["denoise_s"])
        assert row["end_to_end_s"] >= row["text_encode_s"] + row["vae_decode_s"]
    base = summary[0]["median_s"]
    for s in summary:
        mine = [r["end_to_end_s"] for r in rows if r["backend"] == s["backend"]]
        assert s["median_s"] == pytest.approx(percentile(mine, 0.5))
        assert s["speedup"] == pytest.approx(base / s["median_s"])
    assert summary[0]["speedup"] == pytest.approx(1.0)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout.splitlines()
    assert any(line.startswith("onnxruntime") and "1.00x" in line for line in table)
    assert any(line.startswith("diffusers") for line in table)


def test_summary_and_table_from_synthetic_rows():
    def row(backend, total):
        return {
            "backend": backend,
            "precision": "fp32",
            "end_to_end_s": total,
            "peak_memory_bytes": 2**30,
            "it_per_s": 1.0,
            "images_per_s": 1 / total,
            "step_median_s": 0.1,
            "text_encode_s": 0.01,
            "denoise_s": 0.5,
            "vae_decode_s": 0.1,
            "loop_overhead_s": 0.02,
            "config": {"source": "tiny"},
            "env": {},
        }

    rows = [row("a", t) for t in (1.0, 3.0, 2.0)] + [row("b", t) for t in (0.5, 0.5, 1.5)]
    summary = summarize(rows)
    assert [s["median_s"] for s in summary] == [2.0, 0.5]
    assert summary[1]["speedup"] == pytest.approx(4.0)
    assert summary[0]["p90_s"] == pytest.approx(2.8)
    assert "4.00x" in format_table(summary)


def test_bad_configs_are_rejected_up_front(tiny_fp32):
    with pytest.raises(ConfigError, match="unknown backend.*choose from diffusers"):
        BenchConfig(source="tiny", backends=("tensorrtx",))
    with pytest.raises(ConfigError, match="runs must be >= 1"):
        BenchConfig(source="tiny", runs=0)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run_benchmark(BenchConfig(source="tiny", backends=("torch-graph",), device="cpu"))
    with pytest.raises(ShapeError, match="outside this artifact's profile"):
        run_benchmark(
            BenchConfig(
                source="tiny", backends=("onnxruntime",), height=512, width=512, artifacts=str(tiny_fp32), device="cpu"
            )
        )
