"""The ComfyUI latency benchmark really runs all three routes and records them, interleaved, in its JSON."""

from __future__ import annotations

import json

from sdtrt.benchmarks.comfy_latency import default_workflow, main


def test_default_workflow_is_comfyuis_graph_shape():
    graph = default_workflow("m", "a cat", seed=5, steps=3, width=64, height=64)
    assert {node["class_type"] for node in graph.values()} == {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "SaveImage",
    }
    assert graph["3"]["inputs"]["positive"] == ["6", 0] and graph["3"]["inputs"]["negative"] == ["7", 0]
    assert graph["3"]["inputs"]["seed"] == 5 and graph["5"]["inputs"]["width"] == 64


def test_benchmark_runs_each_route_every_round(tiny_fp32, tmp_path, capsys):
    out = tmp_path / "comfy.json"
    main([str(tiny_fp32), "--rounds", "2", "--warmup", "0", "--steps", "2", "--size", "64", "--json", str(out)])
    record = json.loads(out.read_text())
    assert [row["round"] for row in record["rows"]] == [0, 1]
    for row in record["rows"]:
        assert all(row[route] > 0 for route in ("comfy", "a1111", "inproc"))
    assert set(record["summary"]) == {"comfy", "a1111", "inproc"}
    assert "median_overhead_s" in record["summary"]["comfy"]
    assert "comfy" in capsys.readouterr().out
