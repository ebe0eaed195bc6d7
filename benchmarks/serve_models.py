"""Memory and switch time of ``sdtrt serve MODELS --max-loaded N`` across model switches.

    python -m sdtrt.benchmarks.serve_models --max-loaded 1 --cycles 4 --json benchmarks/results/serve_models_1.json

Builds two models of one mid-sized architecture (between ``tiny`` and SD 1.5, about 60 M parameters, ~240 MB in
fp32, so one model is plainly visible in the server's RSS) from two weight seeds, saves each as a diffusers folder
and exports it with ``sdtrt export`` into ``--cache`` (reruns skip both). Then starts ``sdtrt serve`` on the
folder of the two, and for ``--cycles`` cycles switches A -> B -> A ... with ``POST /sdapi/v1/options
{"sd_model_checkpoint": ...}``, each switch followed by one txt2img request. After each request it reads the
server's RSS from ``/proc/PID/status`` (VmRSS) and what ``/sdapi/v1/memory`` reports. With ``--max-loaded 1`` the
RSS must come back to the same level each cycle (the closed model's memory released); with ``--max-loaded 2`` both
models stay open and switches are cheap. Plain server only: with ``--ray`` the engines live in replica processes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtrt.benchmarks.records import write_record
from sdtrt.benchmarks.serve_load import Server, sdtrt_command, start_server, stop_server, txt2img

MB = 1024 * 1024
MODEL_NAMES = ("mid-a", "mid-b")
MODEL_SEEDS = (1, 2)
# Between tiny and SD 1.5: three UNet levels of 128..512 channels with cross-attention, a 4-layer CLIP of width
# 256 (its 49408-token embedding alone is 50 MB), tiny's VAE. ~60 M parameters: big enough to show in RSS,
# small enough to export in a minute or two on two cores.
MID_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 256,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MID_TEXT_CHANGES: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "projection_dim": 256,
}


@dataclass(frozen=True)
class CycleRow:
    """One switch and the request after it: the server's RSS after the request, and what /memory said."""

    cycle: int
    model: str
    switch_s: float
    first_request_s: float
    rss_mb: float
    memory_used_mb: float
    loaded: int


def save_diffusers_folder(folder: Path, seed: int, unet_config: dict[str, Any], text_changes: dict[str, Any]) -> None:
    """A diffusers SD 1.x folder with random weights drawn from ``seed`` (tiny's VAE, sdtrt's CLIP tokenizer)."""
    import diffusers
    import torch
    import transformers

    from sdtrt.runtime.models.presets import TINY_TEXT, TINY_VAE, preset_configs
    from sdtrt.runtime.models.tokenizer import clip_tokenizer, save_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TINY_TEXT, **text_changes}))
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(**TINY_VAE)
    for name, module in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        module.save_pretrained(folder / name, safe_serialization=True)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    save_tokenizer(clip_tokenizer(), folder / "tokenizer" / "tokenizer.json")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = preset_configs("tiny")[3]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_models(
    cache: Path,
    names: tuple[str, ...] = MODEL_NAMES,
    seeds: tuple[int, ...] = MODEL_SEEDS,
    unet_config: dict[str, Any] = MID_UNET,
    text_changes: dict[str, Any] = MID_TEXT_CHANGES,
) -> Path:
    """``cache/models`` with one exported fp32 artifact per name (``sdtrt export`` of a seeded diffusers folder);
    a model whose artifact is already there is not built again."""
    models = cache / "models"
    for name, seed in zip(names, seeds, strict=True):
        out = models / name
        if (out / "manifest.json").is_file():
            continue
        source = cache / "sources" / name
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        save_diffusers_folder(source, seed, unet_config, text_changes)
        components = "text_encoder,unet,vae_decoder"
        args = ["-q", "export", str(source), "--out", str(out), "--precision", "fp32", "--components", components]
        subprocess.run([*sdtrt_command(), *args, "--no-step-cache", "--max-batch", "2"], check=True)
        shutil.rmtree(source)  # the export is what is served; the folder can be made again from the seed
        print(f"{name}: built and exported in {time.perf_counter() - start:.0f} s -> {out}")
    return models


def vm_rss(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if found is None:
        raise SystemExit(f"/proc/{pid}/status has no VmRSS line: is {pid} a live process on Linux?")
    return int(found.group(1)) * 1024


def call(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) ``url + path`` and return the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_cycles(server: Server, models: list[str], cycles: int, payload: dict[str, Any]) -> list[CycleRow]:
    """Switch to each model in turn ``cycles`` times, one request after each switch; RSS after each request.

    ``loaded`` counts the models the server's log says are open (its "opened" minus its "closed" lines)."""
    rows: list[CycleRow] = []
    for cycle in range(cycles):
        for model in models:
            start = time.perf_counter()
            call(server.url, "/sdapi/v1/options", {"sd_model_checkpoint": model})
            switched = time.perf_counter()
            status, seconds = txt2img(server.url, {**payload, "seed": cycle})
            if status != 200:
                raise SystemExit(f"txt2img on {model} answered {status}:\n{server.log[-2000:]}")
            used = call(server.url, "/sdapi/v1/memory")["ram"].get("used", float("nan"))
            log = list(server.lines)
            loaded = sum(" opened (" in line for line in log) - sum(line.rstrip().endswith(" closed") for line in log)
            rss = vm_rss(server.proc.pid) / MB
            row = CycleRow(cycle, model, switched - start, seconds, rss, used / MB, loaded)
            rows.append(row)
            print(
                f"{row.cycle:>5} {row.model:<8} {row.rss_mb:>8.0f} {row.memory_used_mb:>8.0f} {row.loaded:>6} "
                f"{row.switch_s:>9.2f} {row.first_request_s:>9.2f}",
                flush=True,
            )
    return rows


def summarize(rows: list[CycleRow], start_rss_mb: float) -> dict[str, Any]:
    """RSS after each model's first and last visit, the growth between them, and median switch times."""
    models = sorted({r.model for r in rows})
    first = {m: next(r.rss_mb for r in rows if r.model == m) for m in models}
    last = {m: next(r.rss_mb for r in reversed(rows) if r.model == m) for m in models}
    later = [r.switch_s for r in rows[len(models) :]] or [r.switch_s for r in rows]
    return {
        "start_rss_mb": round(start_rss_mb, 1),
        "rss_first_visit_mb": {m: round(v, 1) for m, v in first.items()},
        "rss_last_visit_mb": {m: round(v, 1) for m, v in last.items()},
        "growth_first_to_last_mb": round(max(last[m] - first[m] for m in models), 1),
        "rss_max_mb": round(max(r.rss_mb for r in rows), 1),
        # Per cycle, the highest RSS: flat from cycle to cycle when closed models' memory comes back.
        "rss_cycle_max_mb": [
            round(max(r.rss_mb for r in rows if r.cycle == c), 1) for c in sorted({r.cycle for r in rows})
        ],
        "switch_median_s": round(statistics.median(later), 3),
        "request_median_s": round(statistics.median(r.first_request_s for r in rows[len(models) :] or rows), 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loaded", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=4, help="Switch cycles (A then B) after the start.")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sdtrt-serve-models")
    parser.add_argument("--models", type=Path, help="Serve this folder of models instead of building the two.")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.max_loaded < 1 or args.cycles < 1:
        parser.error(f"--max-loaded and --cycles must be >= 1, got {args.max_loaded} and {args.cycles}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.models or build_models(args.cache)
    server = start_server(str(folder), queue=4, extra=("--max-loaded", str(args.max_loaded)))
    try:
        models = [m["model_name"] for m in call(server.url, "/sdapi/v1/sd-models")]
        start_rss = vm_rss(server.proc.pid) / MB
        print(f"serving {', '.join(models)} with --max-loaded {args.max_loaded}; RSS at start {start_rss:.0f} MB")
        print(f"{'cycle':>5} {'model':<8} {'RSS MB':>8} {'/memory':>8} {'loaded':>6} {'switch s':>9} {'request s':>9}")
        payload = {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size}
        rows = run_cycles(server, models, args.cycles, {**payload, "sampler_name": "Euler"})
    finally:
        stop_server(server)
    summary = summarize(rows, start_rss)
    print(json.dumps(summary))
    if args.json:
        settings = {"max_loaded": args.max_loaded, "cycles": args.cycles, "models": models, **payload}
        write_record(args.json, "serve_models", settings, [asdict(r) for r in rows], summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
