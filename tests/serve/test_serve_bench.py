"""The serving benchmarks: the request mix alternates models and LoRA tags, targets run in alternation, and short
runs against a real ``sdtrt serve`` over a folder of two models give rows with every request answered."""

from __future__ import annotations

import json
import re

import pytest

from sdtrt.benchmarks import serve_load, serve_models
from sdtrt.benchmarks.serve_load import LoadRow, mix_payloads
from sdtrt.benchmarks.serve_setup import start_server, stop_server

BASE = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "batch_size": 1}


def test_mix_alternates_models_and_every_model_meets_every_lora_set():
    payloads = mix_payloads(BASE, 12, 100, ["alpha", "beta"], ["style:0.8", "ink:1"])
    assert [p["seed"] for p in payloads] == list(range(100, 112))
    models = [p["override_settings"]["sd_model_checkpoint"] for p in payloads]
    assert models == ["alpha", "beta"] * 6
    tags = [re.findall(r"<lora:[^>]*>", p["prompt"]) for p in payloads]
    style, ink = ["<lora:style:0.8>"], ["<lora:ink:1>"]
    assert tags == [[], [], style, style, [], [], ink, ink, [], [], style, style]
    assert all(p["prompt"].startswith("a cat") for p in payloads) and BASE["prompt"] == "a cat"
    plain = mix_payloads(BASE, 3, 0)  # no models, no LoRAs: the single-model benchmark as before
    assert plain == [{**BASE, "seed": s} for s in range(3)]


def test_summary_is_the_median_over_rounds_per_target_and_level():
    def row(target: str, round: int, rps: float) -> LoadRow:
        return LoadRow(2, 4, round, 1.0, rps, rps, 100.0 * rps, 200.0, 64, 64, 1, 1, target, round)

    rows = [row("a", 0, 1.0), row("b", 0, 2.0), row("a", 1, 3.0), row("b", 1, 4.0), row("a", 2, 2.0)]
    summary = serve_load.summarize(rows)
    assert [(s["target"], s["rounds"], s["requests_per_s"], s["failed"]) for s in summary] == [
        ("a", 3, 2.0, 3),
        ("b", 2, 3.0, 1),
    ]
    assert "target" in serve_load.format_table(rows).splitlines()[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--artifacts", "x", "--targets", "plain,gpu"], "--targets takes distinct names out of plain, ray"),
        (["--url", "a=http://h:1", "--url", "a=http://h:2"], "--url names must differ"),
        (["--url", "http://h:1", "--lora", "style"], "--lora takes NAME:WEIGHT"),
        (["--url", "a=h:1"], "expected NAME=http://HOST:PORT"),
        (["--url", "http://h:1", "--concurrency", "1,x"], "--concurrency takes comma-separated client counts"),
        (["--url", "http://h:1", "--rounds", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        serve_load.main(argv)
    assert match in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_bundle):
    from sdtrt.benchmarks.lora_switch import attention_lora
    from sdtrt.runtime.lora.write import save_lora

    root = tmp_path_factory.mktemp("bench-loras")
    save_lora(attention_lora(tiny_bundle.unet, 3), root / "style.safetensors", "diffusers")
    return root


def test_interleaved_mix_against_a_real_server(models_dir, lora_dir, tmp_path):
    server = start_server(str(models_dir), 8, ("--lora-dir", str(lora_dir), "--max-loaded", "2"))
    try:
        out = tmp_path / "load.json"
        argv = ["--url", f"one={server.url}", "--url", f"two={server.url}", "--models", "all", "--lora", "style:0.8"]
        argv += ["--concurrency", "2", "--requests", "4", "--rounds", "2", "--warmup", "0", "--steps", "1"]
        serve_load.main([*argv, "--json", str(out)])
    finally:
        assert stop_server(server) == 0
    record = json.loads(out.read_text())
    assert [(r["target"], r["round"]) for r in record["rows"]] == [("one", 0), ("two", 0), ("one", 1), ("two", 1)]
    assert all(r["failed"] == 0 and r["requests"] == 4 for r in record["rows"])
    assert record["setup"]["models"] == "all" and record["setup"]["loras"] == ["style:0.8"]
    # Both models open (--max-loaded 2), the requests going to each; a LoRA set applied and taken off again.
    assert re.search(r"model beta \[\w+\] opened \(2 of at most 2 open\)", server.log), server.log
    assert " closed" not in server.log.partition("draining:")[0]  # closed only at the end, by the drain


def test_rss_and_switches_across_cycles(models_dir, tmp_path, capsys):
    records = {}
    for n in (1, 2):
        out = tmp_path / f"models{n}.json"
        serve_models.main(["--models", str(models_dir), "--max-loaded", str(n), "--cycles", "2", "--json", str(out)])
        records[n] = json.loads(out.read_text())
    assert "RSS at start" in capsys.readouterr().out
    rows = records[1]["rows"]
    assert [(r["cycle"], r["model"]) for r in rows] == [(0, "alpha"), (0, "beta"), (1, "alpha"), (1, "beta")]
    assert all(r["rss_mb"] > 50 and r["memory_used_mb"] > 50 for r in rows)
    assert [r["loaded"] for r in rows] == [1, 1, 1, 1] and records[1]["settings"]["max_loaded"] == 1
    assert [r["loaded"] for r in records[2]["rows"]] == [1, 2, 2, 2]
    assert len(records[1]["summary"]["cycle_max_mb"]) == 2 and records[1]["summary"]["memory"] == "rss_mb"


def test_models_summary_reads_the_chosen_memory_figure():
    def row(cycle: int, model: str, rss: float, used: float, switch: float) -> serve_models.CycleRow:
        return serve_models.CycleRow(cycle, model, switch, 0.5, rss, rss, used, 1)

    rows = [row(0, "a", 800, 900, 0.0), row(0, "b", 1300, 1200, 3.0), row(1, "a", 1290, 910, 2.0)]
    rows += [row(1, "b", 850, 905, 4.0), row(2, "a", 860, 1000, 3.0), row(2, "b", 855, 905, 3.0)]
    rss = serve_models.summarize(rows, 790.0)
    assert rss["cycle_max_mb"] == [1300, 1290, 860] and rss["max_mb"] == 1300
    assert rss["first_visit_mb"] == {"a": 800, "b": 1300} and rss["growth_first_to_last_mb"] == 60
    assert rss["switch_median_s"] == 3.0 and rss["memory"] == "rss_mb" and rss["start_rss_mb"] == 790
    used = serve_models.summarize(rows, 790.0, "memory_used_mb")
    assert used["cycle_max_mb"] == [1200, 910, 1000] and used["growth_first_to_last_mb"] == 100
