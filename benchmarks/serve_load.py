"""Throughput and latency of A1111-compatible servers under concurrent clients, compared within one run.

    python -m sdtrt.benchmarks.serve_load --artifacts ART --json benchmarks/results/serve_load_cpu.json
    python -m sdtrt.benchmarks.serve_load --url http://host:7860          # any server: plain, Ray, A1111 itself
    python -m sdtrt.benchmarks.serve_load --artifacts two-tiny --targets plain,ray --max-loaded 2 --rounds 3
    python -m sdtrt.benchmarks.serve_load --url plain=http://a:7860 --url ray=http://b:8000 --models all \
        --lora style:0.8

Without ``--url`` it starts ``sdtrt serve ARTIFACTS`` on a free loopback port for each of ``--targets`` (``plain``,
``ray``: with ``--ray``), and stops each with SIGTERM at the end. ``--artifacts tiny`` exports the tiny preset to a
temporary folder first; ``--artifacts two-tiny`` builds a folder of two tiny models (other weights each) and a LoRA
``style`` for them, serves it with ``--lora-dir``, and mixes both in (as ``--models all --lora style:0.8``).

Each concurrency level runs ``--requests`` txt2img requests spread over that many client threads (stdlib urllib,
one request at a time per client, distinct seeds) after ``--warmup`` requests per target. With several targets the
levels run ``--rounds`` times, the targets in alternation (A B A B) on the same requests, so they are compared
under the same machine load. The mix: request i names model ``i mod M`` of ``--models`` in
``override_settings.sd_model_checkpoint``, and every other group of M requests carries the next ``--lora`` tag in
its prompt (no tag, tag 1, no tag, tag 2, ...), so every model meets every LoRA set, and each request changes its
model's LoRA set (the worst case for LoRA switching). Warm-up sends at least one request per model. A row reports
throughput
(requests and images per second), p50/p99 latency, and how many requests were answered other than 200.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtrt.benchmarks.serve_setup import Server, sdtrt_command, start_server, stop_server, two_tiny, txt2img

TARGET_KINDS = ("plain", "ray")


@dataclass(frozen=True)
class LoadRow:
    concurrency: int
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    width: int
    height: int
    steps: int
    batch_size: int
    target: str = "target"
    round: int = 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def mix_payloads(
    payload: dict[str, Any],
    count: int,
    seed0: int,
    models: Sequence[str] = (),
    loras: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """``count`` requests from ``payload`` with seeds ``seed0 + i``: request i on model ``models[i % M]`` (via
    ``override_settings``) and, in every other group of M requests, the next of ``loras`` (``NAME:WEIGHT``) as a
    ``<lora:NAME:WEIGHT>`` tag in its prompt."""
    group = max(1, len(models))
    out = []
    for i in range(count):
        item = {**payload, "seed": seed0 + i}
        if models:
            item["override_settings"] = {"sd_model_checkpoint": models[i % group]}
        turn = i // group
        if loras and turn % 2 == 1:
            item["prompt"] = f"{payload['prompt']} <lora:{loras[(turn // 2) % len(loras)]}>"
        out.append(item)
    return out


def run_level(
    url: str, concurrency: int, payloads: list[dict[str, Any]], target: str = "target", round: int = 0
) -> LoadRow:
    """``payloads`` sent over ``concurrency`` clients at once; one row of throughput and latency."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: txt2img(url, p), payloads))
    seconds = time.perf_counter() - start
    latencies = [t for status, t in results if status == 200]
    ok, first = len(latencies), payloads[0]
    return LoadRow(
        concurrency,
        len(payloads),
        len(payloads) - ok,
        seconds,
        ok / seconds,
        ok * first["batch_size"] / seconds,
        percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        first["width"],
        first["height"],
        first["steps"],
        first["batch_size"],
        target,
        round,
    )


def format_table(rows: list[LoadRow], many: bool | None = None) -> str:
    """One line per row; the target and round columns only when there are several (or ``many``)."""
    if many is None:
        many = len({r.target for r in rows}) > 1 or len({r.round for r in rows}) > 1
    head = f"{'target':<8} {'round':>5} " if many else ""
    lines = [head + f"{'clients':>7} {'reqs':>5} {'failed':>6} {'req/s':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8}"]
    for r in rows:
        lead = f"{r.target:<8} {r.round:>5} " if many else ""
        lines.append(
            lead + f"{r.concurrency:>7} {r.requests:>5} {r.failed:>6} {r.requests_per_s:>7.2f} "
            f"{r.images_per_s:>7.2f} {r.p50_ms:>8.0f} {r.p99_ms:>8.0f}"
        )
    return "\n".join(lines)


def summarize(rows: list[LoadRow]) -> list[dict[str, Any]]:
    """Per target and concurrency: the median over rounds of req/s, p50 and p99, and the failures summed."""
    out = []
    for target in dict.fromkeys(r.target for r in rows):
        for level in dict.fromkeys(r.concurrency for r in rows):
            group = [r for r in rows if r.target == target and r.concurrency == level]
            out.append(
                {
                    "target": target,
                    "concurrency": level,
                    "rounds": len(group),
                    "failed": sum(r.failed for r in group),
                    "requests_per_s": round(statistics.median(r.requests_per_s for r in group), 3),
                    "p50_ms": round(statistics.median(r.p50_ms for r in group), 1),
                    "p99_ms": round(statistics.median(r.p99_ms for r in group), 1),
                }
            )
    return out


def parse_url(value: str) -> tuple[str, str]:
    """``NAME=URL`` or ``URL`` (named ``target``)."""
    name, sep, url = value.partition("=")
    if not sep:
        return "target", value
    if not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"expected NAME=http://HOST:PORT or http://HOST:PORT, got {value!r}")
    return name, url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", action="append", type=parse_url, help="[NAME=]URL of a running server; repeatable")
    target.add_argument("--artifacts", help="Start `sdtrt serve` on this folder ('tiny', 'two-tiny': built here)")
    parser.add_argument("--targets", default="plain", help="With --artifacts: servers to start (plain, ray).")
    parser.add_argument("--max-loaded", type=int, help="With --artifacts: sdtrt serve --max-loaded N.")
    parser.add_argument("--lora-dir", type=Path, help="With --artifacts: sdtrt serve --lora-dir DIR.")
    parser.add_argument("--models", default="", help="Checkpoints to alternate (comma-separated, or 'all').")
    parser.add_argument("--lora", action="append", default=[], help="NAME:WEIGHT tag for the mix; repeatable.")
    parser.add_argument("--concurrency", default="1,2,4,8", help="Comma-separated client counts.")
    parser.add_argument("--requests", type=int, default=24, help="Requests per concurrency level.")
    parser.add_argument("--rounds", type=int, default=1, help="Rounds per level, targets in alternation.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", dest="json_path", type=Path, help="Write the rows (and the setup) as JSON.")
    args = parser.parse_args(argv)
    kinds = args.targets.split(",")
    if args.artifacts and (not kinds or any(k not in TARGET_KINDS for k in kinds) or len(set(kinds)) < len(kinds)):
        parser.error(f"--targets takes distinct names out of {', '.join(TARGET_KINDS)}, got {args.targets!r}")
    if args.url and len({name for name, _ in args.url}) < len(args.url):
        parser.error("--url names must differ: give each NAME=URL its own NAME")
    if any(":" not in tag for tag in args.lora):
        parser.error(f"--lora takes NAME:WEIGHT (e.g. style:0.8), got {args.lora}")
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency takes comma-separated client counts (e.g. 1,2,4), got {args.concurrency!r}")
    if min(args.levels) < 1 or args.rounds < 1 or args.requests < 1:
        parser.error(
            f"--concurrency, --rounds and --requests must be >= 1, got {args.concurrency}, {args.rounds}, "
            f"{args.requests}"
        )
    return args


def launch(args: argparse.Namespace, levels: list[int], tmp: Path) -> dict[str, Server]:
    """Start one server per ``--targets`` kind on ``--artifacts`` (building 'tiny' or 'two-tiny' first)."""
    artifacts, lora_dir = args.artifacts, args.lora_dir
    if artifacts == "tiny":
        subprocess.run(
            [*sdtrt_command(), "-q", "export", "tiny", "--out", str(tmp / "tiny"), "--precision", "fp32"], check=True
        )
        artifacts = str(tmp / "tiny")
    elif artifacts == "two-tiny":
        models, lora_dir = two_tiny(tmp)
        artifacts = str(models)
        args.models = args.models or "all"
        args.lora = args.lora or ["style:0.8"]
    extra: tuple[str, ...] = ()
    if args.max_loaded:
        extra += ("--max-loaded", str(args.max_loaded))
    if lora_dir:
        extra += ("--lora-dir", str(lora_dir))
    servers: dict[str, Server] = {}
    queue = max(16, max(levels) * 2)
    try:
        for kind in args.targets.split(","):
            ray = ("--ray", "--cpus-per-replica", "1") if kind == "ray" else ()
            servers[kind] = start_server(artifacts, queue, extra + ray, wait_s=300 if ray else 120)
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers


def checkpoint_names(url: str, models: str) -> list[str]:
    """``--models`` as a list; 'all': every model the server at ``url`` lists."""
    if models != "all":
        return [m for m in models.split(",") if m]
    with urllib.request.urlopen(url + "/sdapi/v1/sd-models", timeout=30) as r:
        return [m["model_name"] for m in json.loads(r.read())]


def measure(targets: dict[str, str], levels: list[int], args: argparse.Namespace) -> list[LoadRow]:
    """Warm each target up, then every level ``--rounds`` times, the targets in alternation on the same mix."""
    payload = {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size}
    payload.update(batch_size=args.batch_size, sampler_name="Euler", cfg_scale=7.0)
    models = checkpoint_names(next(iter(targets.values())), args.models)
    for url in targets.values():
        run_level(url, 1, mix_payloads(payload, max(args.warmup, len(models)), 10**6, models, args.lora))
    rows = []
    for level in levels:
        for round in range(args.rounds):
            payloads = mix_payloads(payload, args.requests, 1000 * level + 100 * round, models, args.lora)
            for name, url in targets.items():
                rows.append(run_level(url, level, payloads, name, round))
                print(format_table(rows[-1:], many=True).splitlines()[1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = args.levels
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.url:
            targets = dict(args.url)
        else:
            servers = launch(args, levels, Path(tmp))
            targets = {name: server.url for name, server in servers.items()}
        try:
            rows = measure(targets, levels, args)
        finally:
            for server in servers.values():
                stop_server(server)
    print(format_table(rows))
    summary = summarize(rows)
    if len(targets) > 1 or args.rounds > 1:
        print(json.dumps(summary, indent=1))
    if args.json_path:
        setup = {"targets": {k: v if args.url else "local sdtrt serve" for k, v in targets.items()}}
        setup.update(artifacts=args.artifacts, host=platform.node(), max_loaded=args.max_loaded, rounds=args.rounds)
        setup.update(models=args.models, loras=args.lora, requests=args.requests, warmup=args.warmup)
        setup.update(cpu_count=os.cpu_count(), python=platform.python_version(), machine=platform.machine())
        record = {"setup": setup, "rows": [asdict(r) for r in rows], "summary": summary}
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
