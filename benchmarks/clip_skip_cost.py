"""What the ``clip_skip`` input costs the text encoder: the same CLIP text encoder exported with and without it
(SD 1.5's architecture, 12 layers, seeded random weights), compared on file size and on ONNX Runtime latency.

    python -m sdtrt.benchmarks.clip_skip_cost --runs 30 --json benchmarks/results/clip_skip_cost_cpu.json

The graph with the input stacks every layer's hidden state and gathers one before the final layer norm; the one
without it is what artifacts exported before clip skip have. Each round runs "without", "with, clip skip 1" and
"with, clip skip 2" once, the order rotated each round; the rows give each one's median and p90.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sdtrt.benchmarks.harness import round_order
from sdtrt.benchmarks.report import percentile
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.runtime.clip_skip import text_feeds
from sdtrt.runtime.engine import BackendOptions, get_backend
from sdtrt.runtime.manifest import read_manifest
from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.specs import ModelInfo

CONFIG = Path(__file__).parents[1] / "runtime" / "models" / "configs" / "sd15" / "text_encoder" / "config.json"
VARIANTS = (("without clip_skip", 1), ("with clip_skip, N=1", 1), ("with clip_skip, N=2", 2))


def export_pair(root: Path, precision: str) -> tuple[Path, Path]:
    """The SD 1.5 text encoder exported with and without the ``clip_skip`` input: (with, without)."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.CLIPTextConfig(**json.loads(CONFIG.read_text()))
        encoder = transformers.CLIPTextModel(config).eval().requires_grad_(False)
    tiny = load_preset("tiny")
    model = ModelInfo(text_width=768, pooled_width=768, text_layers=config.num_hidden_layers)
    bundle = ModelBundle(encoder, None, None, tiny.tokenizer, tiny.scheduler_config, model)
    options = ExportOptions(precision=precision, components=("text_encoder",), step_cache=False)
    folders = []
    for layers in (config.num_hidden_layers, 0):
        out = root / f"layers-{layers}"
        export_artifacts(
            dataclasses.replace(bundle, model=dataclasses.replace(model, text_layers=layers)), out, options
        )
        folders.append(out)
    return folders[0], folders[1]


def file_sizes(folder: Path) -> dict[str, Any]:
    """Bytes of the graph file and of its weights, and the number of graph nodes."""
    import onnx

    entry = read_manifest(folder).components["text_encoder"]
    graph = onnx.load(str(folder / entry.file), load_external_data=False)
    data = (folder / entry.data_file).stat().st_size if entry.data_file else 0
    return {"onnx_bytes": (folder / entry.file).stat().st_size, "data_bytes": data, "nodes": len(graph.graph.node)}


def measure(with_input: Path, without: Path, runs: int, warmup: int, batch: int) -> list[dict[str, Any]]:
    """``warmup`` untimed and ``runs`` timed rounds, each variant once per round in rotated order; a row per run."""
    backend, device = get_backend("onnxruntime"), torch.device("cpu")
    ids = torch.randint(1, 49405, (batch, 77), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    engines = []
    for (name, skip), folder in zip(VARIANTS, (without, with_input, with_input), strict=True):
        manifest = read_manifest(folder)
        engine = backend.open_engines(folder, manifest, ["text_encoder"], device, BackendOptions())["text_encoder"]
        engines.append((name, engine, text_feeds(ids, manifest.model, skip)))
    rows = []
    try:
        for r in range(warmup + runs):
            for index in round_order(list(range(len(engines))), r):
                name, engine, feeds = engines[index]
                start = time.perf_counter()
                engine.infer(feeds)
                seconds = time.perf_counter() - start
                if r >= warmup:
                    rows.append({"variant": name, "round": r - warmup, "seconds": seconds, "rows": batch})
    finally:
        for _, engine, _ in engines:
            engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="text rows per call (2: one prompt and its negative)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--json", type=Path, help="write the rows and sizes here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with_input, without = export_pair(Path(tmp), args.precision)
        sizes = {"with clip_skip": file_sizes(with_input), "without clip_skip": file_sizes(without)}
        rows = measure(with_input, without, args.runs, args.warmup, args.batch)
    for kind, size in sizes.items():
        print(
            f"{kind:<22} graph {size['onnx_bytes']:>9,} B  weights {size['data_bytes']:>13,} B  {size['nodes']} nodes"
        )
    for name, _ in VARIANTS:
        times = [row["seconds"] for row in rows if row["variant"] == name]
        print(f"{name:<22} median {statistics.median(times) * 1e3:7.2f} ms  p90 {percentile(times, 0.9) * 1e3:7.2f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sizes": sizes, "rows": rows, "precision": args.precision}, indent=1))


if __name__ == "__main__":
    main()
