"""The step-cache quality benchmark's orchestration at tiny size: every row it promises, with PSNR against the
uncached images of the same prompts and seeds, and bad settings refused before any work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from sdtrt.benchmarks.step_cache_quality import format_tables, main

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")


def test_rows_for_every_setting_and_branch(tmp_path, capsys):
    out = tmp_path / "quality.json"
    args = ["--out", str(tmp_path / "artifacts"), "--model", "tiny", "--count", "2", "--steps", "4"]
    args += ["--precisions", "fp32", "--intervals", "2", "--branches", "0", "--branch-steps", "4"]
    assert main([*args, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    grid = [r for r in rows if r["part"] == "grid"]
    assert [(r["interval"], r["schedule"]) for r in grid] == [(1, "uniform"), (2, "uniform"), (2, "quadratic")]
    assert grid[0]["psnr_db"] is None and grid[0]["shallow_step_ms"] is None  # the reference: uncached
    for row in grid[1:]:
        # cached images differ from the uncached ones, yet stay close (the tiny model barely moves)
        assert 25 < row["psnr_db"] < 80 and row["shallow_step_ms"] > 0 and row["full_step_ms"] > 0
        assert set(row["accuracy"]) >= {"background", "colour", "shape", "all"}
    branches = [r for r in rows if r["part"] == "branches"]
    assert [r["branch"] for r in branches] == [0]
    for row in branches:
        assert row["interval"] == 3 and row["steps"] == 4 and 25 < row["psnr_db"] < 80
        assert row["uncached_full_step_ms"] > 0 and row["shallow_step_ms"] > 0
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["tiny-fp32-branch0"]  # one export for both
    assert record["meta"]["command"].startswith("python -m sdtrt.benchmarks.step_cache_quality")
    printed = capsys.readouterr().out
    assert printed.strip() == format_tables(rows) and "| fp32 | 4 | 2 | quadratic |" in printed
    assert math.isfinite(branches[0]["psnr_db"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--intervals", "0"], "cache interval must be an integer >= 1"),
        (["--precisions", "int8"], "precisions must be fp32 or fp16, got ['int8']"),
        (["--steps", "1"], "steps >= 2"),
        (["--branches", "zero"], "invalid literal"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "sdtrt.benchmarks.step_cache_quality", "--out", str(tmp_path / "a"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "a").exists()
