"""The GPU check's step-caching benchmark: its arguments, order and summary, and a dry run on the CPU at tiny size
(no timing assertions)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from sdtrt.benchmarks.step_cache_gpu import parse_args, parse_intervals, rotations, summarize


def test_intervals_always_include_the_uncached_baseline_first():
    assert parse_intervals("3") == (1, 3)
    assert parse_intervals("3,1,5") == (1, 3, 5)
    for bad in ("0", "2,-1", "three", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="integers >= 1 like 1,3"):
            parse_intervals(bad)


def test_bad_arguments_stop_before_any_work(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--runs", "0"])
    assert "--runs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--intervals", "0"])
    args = parse_args(["--preset", "tiny", "--intervals", "3", "--engines", "E"])
    assert args.intervals == (1, 3) and str(args.engines) == "E" and args.schedule == "uniform"


def test_rounds_rotate_and_run_every_configuration_once():
    configs = [("torch", 1), ("torch", 3), ("torch-graph", 1), ("torch-graph", 3)]
    orders = rotations(configs, 5)
    assert all(sorted(order) == sorted(configs) for order in orders)
    assert [order[0] for order in orders] == [*configs, configs[0]]


def test_summary_rows_carry_their_interval_and_the_speed_up():
    args = argparse.Namespace(steps=10, schedule="quadratic")
    times = {("torch", 1): [(2.0, 1.5), (2.2, 1.7)], ("torch", 3): [(1.0, 0.5), (1.2, 0.7)]}
    image = torch.rand(1, 3, 8, 8)
    images = {("torch", 1): image, ("torch", 3): (image + 0.01).clamp(0, 1)}
    from sdtrt.runtime.compare import psnr

    report = summarize(args, times, images, psnr)
    rows = {r["cache_interval"]: r for r in report["rows"]}
    assert rows[1]["cache_schedule"] is None and rows[3]["cache_schedule"] == "quadratic"
    assert rows[3]["speedup_vs_uncached"] == pytest.approx(2.1 / 1.1)
    assert rows[3]["denoise_speedup_vs_uncached"] == pytest.approx(1.6 / 0.6)
    assert 35 < report["quality"]["torch/N3_vs_N1_db"] < 45


def test_dry_run_on_the_cpu_writes_both_rows(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, "-m", "sdtrt.benchmarks.step_cache_gpu", "--preset", "tiny", "--device", "cpu"]
    command += ["--size", "64", "--steps", "4", "--runs", "1", "--warmup", "0", "--precision", "fp32"]
    result = subprocess.run(
        [*command, "--intervals", "3", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["benchmark"] == "step_cache_gpu" and data["config"]["intervals"] == [1, 3]
    assert [(r["backend"], r["cache_interval"]) for r in data["rows"]] == [("torch", 1), ("torch", 3)]  # no CUDA
    # 4 steps at N=3: full, shallow, shallow, full; the cached image differs and stays close (measured 38.9 dB)
    assert 30 <= data["quality"]["torch/N3_vs_N1_db"] < 60
    assert "torch/N3_vs_N1_db" in result.stdout and data["peak_bytes"] is None
