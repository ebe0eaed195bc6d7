"""ControlNet benchmarks: the cost script in quick mode and ``sdtrt bench --control`` (no timing assertions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from sdtrt.benchmarks.controlnet_cost import VARIANTS, round_order, summarize

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def test_round_order_keeps_pairs_adjacent_and_alternates_who_runs_first():
    orders = [round_order(r) for r in range(4)]
    for order in orders:
        assert sorted(order) == sorted(VARIANTS)
        plain, ready = order.index("plain"), order.index("ready-0")
        assert abs(plain - ready) == 1  # the zero-residual pair runs back to back
    assert [o.index("plain") < o.index("ready-0") for o in orders] == [True, False, True, False]
    assert {o[0] for o in orders} == set(VARIANTS)


def test_summary_pairs_rounds_and_states_the_decision():
    rows = [
        {"variant": v, "round": r, "step_ms": base + extra}
        for r, base in enumerate((100.0, 140.0, 120.0))  # a noisy machine: the rounds differ a lot
        for v, extra in zip(VARIANTS, (0.0, 1.0, 50.0, 100.0), strict=True)
    ]
    summary = summarize(rows)
    zero = summary["costs"]["ready-0 - plain"]
    assert zero["pairs"] == 3 and zero["median_ms"] == 1.0 and zero["q1_ms"] == zero["q3_ms"] == 1.0
    assert zero["median_pct"] == pytest.approx(100 / 120)  # each round's difference over its own plain run
    assert summary["costs"]["ready-2 - ready-0"]["median_ms"] == 99.0
    assert summary["variants"]["plain"]["fastest_ms"] == 100.0
    assert summary["decision"] == "control-ready by default"
    rows = [dict(row, step_ms=row["step_ms"] + 10) if row["variant"] == "ready-0" else row for row in rows]
    assert summarize(rows)["decision"].startswith("plain UNet by default")


def test_controlnet_cost_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "cost.json"
    command = [sys.executable, "-m", "sdtrt.benchmarks.controlnet_cost", "--quick", "--cache", str(tmp_path / "c")]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["benchmark"] == "controlnet_cost" and data["settings"]["source"] == "tiny"
    rows = data["rows"]
    assert len(rows) == 3 * len(VARIANTS)
    assert [r["variant"] for r in rows[:4]] == round_order(0)
    for row in rows:
        assert row["step_ms"] > 0 and len(row["steps_ms"]) == data["settings"]["steps"]
    assert set(data["summary"]["variants"]) == set(VARIANTS)
    assert set(data["summary"]["costs"]) == {"ready-0 - plain", "ready-1 - ready-0", "ready-2 - ready-0"}
    assert "zero residuals cost" in result.stdout and "ready-2 - ready-0" in result.stdout
    root = tmp_path / "c" / "tiny-64-fp32"
    manifests = [json.loads((root / k / "manifest.json").read_text()) for k in ("plain", "ready")]
    # the plain artifact has no ControlNet and a UNet without residual inputs; the other has both
    assert not any(c.startswith("controlnet_") for c in manifests[0]["components"])
    assert manifests[0]["model"]["control_residuals"] == [] and manifests[1]["model"]["control_residuals"]
    assert {"controlnet_cn1", "controlnet_cn2"} <= set(manifests[1]["components"])


def _hint(path):
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), outline="white", width=2)
    image.save(path)
    return path


def _bench(*args, timeout=600):
    return subprocess.run([SDTRT, "bench", "tiny", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_control_runs_the_controlnets_and_records_them(tmp_path, tiny_control_fp32):
    hint, out = _hint(tmp_path / "hint.png"), tmp_path / "rows.json"
    common = ["--size", "64x64", "--steps", "2", "--runs", "2", "--warmup", "0", "--artifacts", str(tiny_control_fp32)]
    controls = ["--control", f"edges:{hint}:0.8:0:0.5", "--control", f"depth:{hint}", "--control-preprocess", "canny"]
    result = _bench(*common, *controls, "--json", str(out))
    assert result.returncode == 0, result.stderr
    # the artifact is ONNX: the default backend is ONNX Runtime alone (diffusers runs no ControlNet)
    assert "ControlNets: edges x0.8, steps 0-0.5, canny, crop_and_resize; depth x1, steps 0-1, canny" in result.stdout
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["rows"]] == ["onnxruntime", "onnxruntime"]
    assert [c["name"] for c in data["controls"]] == ["edges", "depth"]
    assert data["rows"][0]["config"]["controls"][0] == {
        "name": "edges",
        "scale": 0.8,
        "start": 0.0,
        "end": 0.5,
        "guess_mode": False,
        "preprocess": "canny",
        "resize_mode": "crop_and_resize",
        "soft_weights": False,
    }


def test_bench_control_bad_input_fails_before_any_work(tmp_path, tiny_control_fp32):
    hint = _hint(tmp_path / "hint.png")
    base = ["--size", "64x64", "--steps", "1", "--runs", "1", "--warmup", "0"]
    art = ["--artifacts", str(tiny_control_fp32)]
    cases = [
        ([*base, "--control", f"edges:{hint}"], "no --artifacts was given"),
        ([*base, *art, "--backends", "diffusers,onnxruntime", "--control", f"edges:{hint}"], "sdtrt's backends only"),
        ([*base, *art, "--control", f"canny:{hint}"], "unknown ControlNet 'canny': this artifact has depth, edges"),
        ([*base, *art, "--control", f"edges:{tmp_path / 'missing.png'}"], "missing.png"),
        ([*base, *art, "--control", f"edges:{hint}:-1"], "scale must be >= 0"),
    ]
    for args, message in cases:
        result = _bench(*args, timeout=120)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert "loading" not in result.stderr and "preparing" not in result.stderr  # nothing ran
