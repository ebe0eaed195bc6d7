"""The benchmark harness: rows complete, summaries consistent with the rows (no timing assertions)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from sdtrt.benchmarks.config import BenchConfig, ModelDefaults, model_defaults
from sdtrt.benchmarks.harness import run_benchmark
from sdtrt.benchmarks.report import STAGES as SEGMENTS
from sdtrt.benchmarks.report import chart_segments, format_table, percentile, plot, summarize
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
    "other_s",
    "peak_memory_bytes",
    "round",
    "position",
    "order",
    "memory_at_start_bytes",
    "peak_added_bytes",
    "loaded_bytes",
    "peak_memory_scope",
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
    # interleaved, the second round rotated to start at the second backend
    assert [r["backend"] for r in rows] == ["onnxruntime", "torch", "diffusers", "torch", "diffusers", "onnxruntime"]
    assert [(r["round"], r["position"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert {(r["order"], r["peak_memory_scope"], r["peak_memory_kind"]) for r in rows} == {
        ("interleaved", "process", "process_rss")
    }
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
    assert any("whole process" in line for line in table)


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
            "other_s": 0.02,
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


STAGES = {"text_encode": 0.001, "denoise": 0.002, "steps": [0.001, 0.001], "vae_decode": 0.001, "total": 0.005}


class FakeRunner:
    """Records each call in a shared log; holds ``hold`` bytes while open and touches ``touch`` bytes per run."""

    precision = "fp32"

    def __init__(self, backend, log, hold=0, touch=0):
        self.backend, self.log, self.touch = backend, log, touch
        self.held = np.ones(hold, dtype=np.uint8) if hold else None

    def run(self, seed, cache_interval=1, cache_schedule="uniform"):
        name = self.backend if cache_interval == 1 else f"{self.backend} N={cache_interval} {cache_schedule}"
        self.log.append(("run", name))
        if self.touch:
            scratch = np.ones(self.touch, dtype=np.uint8)  # every page written: counted in the RSS
            time.sleep(0.08)  # several samples of the 10 ms RSS sampler
            del scratch
        return dict(STAGES)


def fake_opener(log, hold=None, touch=None):
    @contextlib.contextmanager
    def open_runner(backend, config, device, folder):
        assert folder is None and device.type == "cpu"
        log.append(("open", backend))
        runner = FakeRunner(backend, log, (hold or {}).get(backend, 0), (touch or {}).get(backend, 0))
        try:
            yield runner
        finally:
            runner.held = None
            log.append(("close", backend))

    return open_runner


def test_runs_interleave_with_the_order_rotated_each_round():
    log = []
    config = BenchConfig(source="tiny", backends=("diffusers", "torch", "onnxruntime"), runs=4, warmup=2, device="cpu")
    rows = run_benchmark(config, open_runner=fake_opener(log))
    a, b, c = config.backends
    assert log[:3] == [("open", a), ("open", b), ("open", c)]  # everything open before the first run
    assert log[-3:] == [("close", c), ("close", b), ("close", a)]
    warm = [a, b, c, b, c, a]
    timed = [a, b, c, b, c, a, c, a, b, a, b, c]
    assert [name for event, name in log if event == "run"] == warm + timed
    assert [r["backend"] for r in rows] == timed
    assert [(r["round"], r["position"]) for r in rows] == [(k // 3, k % 3) for k in range(12)]
    assert all(r["run"] == r["round"] and r["order"] == "interleaved" for r in rows)
    assert [s["backend"] for s in summarize(rows)] == [a, b, c]  # speed-ups stay against the first backend


def test_sequential_keeps_one_backend_open_at_a_time():
    log = []
    backends = ("torch", "diffusers")
    config = BenchConfig(source="tiny", backends=backends, runs=2, warmup=1, sequential=True, device="cpu")
    rows = run_benchmark(config, open_runner=fake_opener(log))
    blocks = [[("open", b), *[("run", b)] * 3, ("close", b)] for b in backends]
    assert log == blocks[0] + blocks[1]
    assert [(r["backend"], r["round"], r["position"]) for r in rows] == [
        ("torch", 0, 0),
        ("torch", 1, 0),
        ("diffusers", 0, 1),
        ("diffusers", 1, 1),
    ]
    assert {(r["order"], r["peak_memory_scope"]) for r in rows} == {("sequential", "backend")}


def test_memory_figures_stay_per_backend_when_every_backend_is_open():
    mib = 2**20
    log = []
    config = BenchConfig(source="tiny", backends=("torch", "diffusers"), runs=2, warmup=0, device="cpu")
    opener = fake_opener(log, hold={"torch": 96 * mib}, touch={"diffusers": 128 * mib})
    rows = run_benchmark(config, open_runner=opener)
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    diffusers_rows = [r for r in rows if r["backend"] == "diffusers"]
    assert all(r["loaded_bytes"] >= 80 * mib for r in torch_rows)  # opening torch held 96 MiB
    assert all(r["loaded_bytes"] < 32 * mib for r in diffusers_rows)
    assert all(r["peak_added_bytes"] >= 100 * mib for r in diffusers_rows)  # each diffusers run touched 128 MiB
    assert all(r["peak_added_bytes"] < 32 * mib for r in torch_rows)
    for r in rows:  # the process-wide peak includes the 96 MiB torch holds, whichever backend is running
        assert r["peak_memory_scope"] == "process"
        assert r["peak_memory_bytes"] >= r["memory_at_start_bytes"] + r["peak_added_bytes"] - mib
    summary = {s["backend"]: s for s in summarize(rows)}
    assert summary["diffusers"]["peak_added_gib"] >= 100 / 1024 and summary["torch"]["loaded_gib"] >= 80 / 1024


def test_sdxl_bench_runs_every_backend_at_the_model_size(tmp_path):
    """tiny-xl through the same harness: both text encoders exported and run; the default size is its native 128."""
    out = tmp_path / "xl.json"
    result = subprocess.run(
        [SDTRT, "bench", "tiny-xl", "--backends", "onnxruntime,torch,diffusers", "--steps", "2", "--runs", "1",
         "--warmup", "0", "--precision", "fp32", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["backend"] for r in rows) == ["diffusers", "onnxruntime", "torch"]
    assert {(r["config"]["height"], r["config"]["width"]) for r in rows} == {(128, 128)}
    assert all(r["text_encode_s"] > 0 and r["end_to_end_s"] > 0 for r in rows)


def bench(*args):
    """Run ``sdtrt bench`` for real; the JSON record it wrote."""
    return subprocess.run([SDTRT, "bench", *args], capture_output=True, text=True, timeout=600)


def stage_sum(record):
    return sum(record[key] for key, _ in SEGMENTS)


def test_cpu_default_times_every_backend_in_one_precision_and_stages_add_up(tmp_path):
    """No --precision on a CPU: every row fp32 (ONNX Runtime was fp16 against fp32 PyTorch); no mixed mark."""
    out = tmp_path / "rows.json"
    result = bench("tiny", "--backends", "diffusers,torch,onnxruntime", "--size", "64x64", "--steps", "2",
                   "--runs", "3", "--warmup", "0", "--device", "cpu", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {r["precision"] for r in data["rows"]} == {"fp32"}
    assert [s["precision"] for s in data["summary"]] == ["fp32"] * 3
    assert data["mixed_precision"] is False
    assert "mixed precision" not in result.stdout and "*" not in result.stdout
    assert "auto: fp32" in result.stdout.splitlines()[0]
    for row in data["rows"]:  # text + denoise + VAE + other is the whole run
        assert row["other_s"] >= 0 and stage_sum(row) == pytest.approx(row["end_to_end_s"], rel=1e-9)
    for summary in data["summary"]:  # and the chart's bar reaches the median written beside it
        assert sum(seconds for _, seconds in chart_segments(summary)) == pytest.approx(summary["median_s"])


def test_mixed_precision_rows_are_marked(tmp_path):
    def summary(backend, precision):
        return {"backend": backend, "precision": precision, "median_s": 1.0, "p90_s": 1.0, "speedup": 1.0,
                "text_encode_s": 0.1, "denoise_s": 0.7, "vae_decode_s": 0.1, "other_s": 0.1, "other_pct": 10.0,
                "step_median_s": 0.1, "it_per_s": 1.0, "peak_memory_gib": 1.0, "peak_added_gib": 0.0,
                "loaded_gib": 0.0, "floor_fraction": None}  # fmt: skip

    same = [summary("diffusers", "fp32"), summary("onnxruntime", "fp32")]
    assert "mixed" not in format_table(same)
    table = format_table([summary("diffusers", "fp32"), summary("onnxruntime", "fp16")])
    assert any(line.startswith("onnxruntime") and " fp16* " in line for line in table.splitlines())
    assert "mixed precision: onnxruntime fp16 against diffusers fp32" in table
    assert plot([summary("diffusers", "fp32"), summary("onnxruntime", "fp16")], tmp_path / "c.png", "t")


def test_stage_bars_add_up_to_the_median_they_are_labelled_with():
    """Stage by stage medians need not add up to the median run (the chart read ~580 ms against "649 ms")."""

    def row(backend, text, denoise, vae, other):
        total = text + denoise + vae + other
        return {"backend": backend, "precision": "fp32", "end_to_end_s": total, "text_encode_s": text,
                "denoise_s": denoise, "vae_decode_s": vae, "other_s": other, "peak_memory_bytes": 1,
                "it_per_s": 1.0, "images_per_s": 1 / total, "step_median_s": 0.1, "config": {"source": "tiny"},
                "env": {}}  # fmt: skip

    odd = [row("a", 0.05, 0.40, 0.05, 0.10), row("a", 0.20, 0.30, 0.05, 0.05), row("a", 0.05, 0.50, 0.20, 0.01)]
    even = [row("b", 0.05, 0.40, 0.05, 0.10), row("b", 0.20, 0.30, 0.05, 0.05), row("b", 0.05, 0.50, 0.2, 0.01),
            row("b", 0.01, 0.90, 0.01, 0.30)]  # fmt: skip
    for summary in summarize(odd + even):
        assert stage_sum(summary) == pytest.approx(summary["median_s"])
        assert sum(seconds for _, seconds in chart_segments(summary)) == pytest.approx(summary["median_s"])
    assert [label for label, _ in chart_segments(summarize(odd)[0])][-1].startswith("other")


def test_model_defaults_come_from_the_model():
    assert model_defaults("shapes") == ModelDefaults(size=128, scheduler="euler", guidance=2.0)
    assert model_defaults("tiny") == ModelDefaults(size=128, scheduler="euler_a", guidance=7.5)
    assert model_defaults("sdxl-random") == ModelDefaults(size=1024, scheduler="euler", guidance=7.5)


def test_bench_uses_the_model_defaults_unless_told_otherwise(tmp_path):
    """shapes runs euler, CFG 2 at 128 px by default; --size/--cfg/--scheduler override each."""
    base = ["shapes", "--backends", "torch", "--steps", "1", "--runs", "1", "--warmup", "0", "--device", "cpu"]
    out = tmp_path / "defaults.json"
    result = bench(*base, "--json", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads(out.read_text())["rows"][0]["config"]
    assert (config["scheduler"], config["guidance"], config["height"], config["width"]) == ("euler", 2.0, 128, 128)
    assert "shapes 128x128, 1 steps, CFG 2, batch 1, euler," in result.stdout
    out = tmp_path / "told.json"
    result = bench(*base, "--size", "64x64", "--cfg", "3", "--scheduler", "ddim", "--json", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads(out.read_text())["rows"][0]["config"]
    assert (config["scheduler"], config["guidance"], config["height"], config["width"]) == ("ddim", 3.0, 64, 64)


# -- step caching ------------------------------------------------------------------------------------------------


def test_cached_variants_interleave_with_their_backend_on_one_open_runner():
    """Each sdtrt backend runs uncached and at every interval, all rotated in one round; diffusers uncached only."""
    log = []
    config = BenchConfig(source="tiny", backends=("diffusers", "onnxruntime"), runs=3, warmup=1, device="cpu",
                         cache_intervals=(3, 1, 5, 3), cache_schedule="quadratic")  # fmt: skip
    rows = run_benchmark(config, open_runner=fake_opener(log))
    assert [e for e in log if e[0] == "open"] == [("open", "diffusers"), ("open", "onnxruntime")]  # opened once
    d, o, o3, o5 = "diffusers", "onnxruntime", "onnxruntime N=3 quadratic", "onnxruntime N=5 quadratic"
    rounds = [d, o, o3, o5], [o, o3, o5, d], [o3, o5, d, o]
    assert [name for event, name in log if event == "run"] == [d, o, o3, o5, *rounds[0], *rounds[1], *rounds[2]]
    labels = ["diffusers", "onnxruntime", "onnxruntime N=3 quadratic", "onnxruntime N=5 quadratic"]
    assert [r["label"] for r in rows] == [labels[k % 4] for r in range(3) for k in range(r, r + 4)]
    assert [(r["backend"], r["cache_interval"], r["cache_schedule"]) for r in rows[:4]] == [
        ("diffusers", 1, None), ("onnxruntime", 1, None), ("onnxruntime", 3, "quadratic"),
        ("onnxruntime", 5, "quadratic"),
    ]  # fmt: skip
    summary = summarize(rows)
    assert [s["label"] for s in summary] == labels
    assert [s["denoise_vs_uncached"] for s in summary] == [None, None, 1.0, 1.0]  # the fake's stages are equal
    assert [s["denoise_vs_uncached_per_round"] for s in summary] == [None, None, 1.0, 1.0]


def test_sequential_interleaves_a_backends_variants_within_its_block():
    log = []
    config = BenchConfig(source="tiny", backends=("torch", "diffusers"), runs=2, warmup=1, sequential=True,
                         device="cpu", cache_intervals=(2,))  # fmt: skip
    rows = run_benchmark(config, open_runner=fake_opener(log))
    t, t2, d = "torch", "torch N=2 uniform", "diffusers"
    assert log == [("open", t), ("run", t), ("run", t2), ("run", t), ("run", t2), ("run", t2), ("run", t),
                   ("close", t), ("open", d), ("run", d), ("run", d), ("run", d), ("close", d)]  # fmt: skip
    assert [(r["label"], r["round"], r["position"]) for r in rows] == [
        ("torch", 0, 0), ("torch N=2", 0, 1), ("torch N=2", 1, 1), ("torch", 1, 0), ("diffusers", 0, 2),
        ("diffusers", 1, 2),
    ]  # fmt: skip


def test_bench_cli_times_each_sdtrt_backend_cached_and_uncached(tmp_path):
    """The real command on the tiny preset: a row per (backend, interval), each with its cache_interval."""
    out = tmp_path / "cached.json"
    result = bench("tiny", "--backends", "onnxruntime,torch,diffusers", "--size", "64x64", "--steps", "4", "--runs",
                   "2", "--warmup", "0", "--device", "cpu", "--cache-interval", "3", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    order = ["onnxruntime", "onnxruntime N=3", "torch", "torch N=3", "diffusers"]
    assert [r["label"] for r in rows] == order + order[1:] + order[:1]  # round 2 rotated by one
    for row in rows:
        cached = row["label"].endswith("N=3")
        assert row["cache_interval"] == (3 if cached else 1)
        assert row["cache_schedule"] == ("uniform" if cached else None)
        assert row["config"]["cache_intervals"] == [3] and row["config"]["cache_schedule"] == "uniform"
        assert row["denoise_s"] > 0 and row["it_per_s"] == pytest.approx(4 / row["denoise_s"])
        assert stage_sum(row) == pytest.approx(row["end_to_end_s"], rel=1e-9)
        assert row["full_steps"] == (2 if cached else 4)  # steps 0 and 3 of 4 run the full UNet
        if cached:  # the full and the shallow steps' times are both recorded
            assert row["full_step_median_s"] > 0 and row["shallow_step_median_s"] > 0
    summary = {s["label"]: s for s in data["summary"]}
    for backend in ("onnxruntime", "torch"):
        cached, plain = summary[f"{backend} N=3"], summary[backend]
        assert cached["cache_interval"] == 3 and plain["cache_interval"] == 1
        assert cached["full_step_median_s"] > 0 and cached["shallow_step_median_s"] > 0
        assert plain["full_step_median_s"] is None and plain["shallow_step_median_s"] is None
        assert cached["denoise_vs_uncached"] == pytest.approx(cached["denoise_median_s"] / plain["denoise_median_s"])
        same_round = {r["round"]: r["denoise_s"] for r in rows if r["label"] == backend}
        ratios = [r["denoise_s"] / same_round[r["round"]] for r in rows if r["label"] == f"{backend} N=3"]
        assert cached["denoise_vs_uncached_per_round"] == pytest.approx(percentile(ratios, 0.5))
    table = result.stdout.splitlines()
    assert any(line.startswith("onnxruntime N=3 ") and "fp32" in line for line in table)
    assert any(line.startswith("onnxruntime N=3: denoise ") and "2 full UNet steps, step median full" in line
               for line in table)  # fmt: skip
    assert sum(line.startswith("diffusers") for line in table) == 1  # the baseline runs uncached only


def no_shallow_artifact(folder):
    """A tiny torch-backend artifact exported without step caching (no ``unet_shallow``)."""
    from sdtrt.export.onnx_export import write_source_artifact
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.profile import ShapeProfile

    write_source_artifact(load_preset("tiny"), folder, ShapeProfile.static(64, 64, 1), step_cache=False)
    return folder


NO_CACHING = "(1 runs every step in full: no caching), got"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-interval", "0"], f"cache interval must be an integer >= 1 {NO_CACHING} 0"),
        (["--cache-interval", "-2"], f"cache interval must be an integer >= 1 {NO_CACHING} -2"),
        (["--cache-interval", "3,x"], "--cache-interval must be whole numbers >= 1 (1: no caching), e.g. 3 or 2,3,5"),
        (["--cache-schedule", "cubic"], "cache schedule must be one of uniform, quadratic, got 'cubic'"),
        (["--cache-interval", "3", "--backends", "diffusers"], "none was asked for (got diffusers); add one to"),
        (["--cache-interval", "3", "--backends", "torch", "--artifacts", "NO_SHALLOW"],
         "--cache-interval 3 needs the shallow UNet, which --artifacts NO_SHALLOW lacks; re-export the model with"),
    ],
)  # fmt: skip
def test_bad_cache_settings_are_one_line_errors_before_any_run(tmp_path, args, message):
    if "NO_SHALLOW" in args:
        folder = str(no_shallow_artifact(tmp_path / "plain"))
        args, message = [folder if a == "NO_SHALLOW" else a for a in args], message.replace("NO_SHALLOW", folder)
    result = bench("tiny", "--size", "64x64", "--steps", "2", "--runs", "1", "--warmup", "0", "--device", "cpu", *args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not result.stdout
