"""Throughput and latency of an A1111-compatible server under concurrent clients.

    python -m sdtrt.benchmarks.serve_load --artifacts ART --json benchmarks/results/serve_load_cpu.json
    python -m sdtrt.benchmarks.serve_load --url http://host:7860          # any server: plain, Ray, A1111 itself

Without ``--url`` it starts ``sdtrt serve ARTIFACTS`` on a free loopback port (``--artifacts tiny`` exports the
tiny preset to a temporary folder first) and stops it with SIGTERM at the end. Each concurrency level runs
``--requests`` txt2img requests spread over that many client threads (stdlib urllib, one request at a time per
client, distinct seeds) after ``--warmup`` requests; a row reports throughput (requests and images per second),
p50/p99 latency, and how many requests were answered other than 200.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def txt2img(url: str, payload: dict[str, Any]) -> tuple[int, float]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def run_level(url: str, concurrency: int, requests: int, payload: dict[str, Any], seed0: int) -> LoadRow:
    """``requests`` requests over ``concurrency`` clients; each request gets its own seed."""
    payloads = [{**payload, "seed": seed0 + i} for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: txt2img(url, p), payloads))
    seconds = time.perf_counter() - start
    latencies = [t for status, t in results if status == 200]
    ok = len(latencies)
    return LoadRow(
        concurrency,
        requests,
        requests - ok,
        seconds,
        ok / seconds,
        ok * payload["batch_size"] / seconds,
        percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        payload["width"],
        payload["height"],
        payload["steps"],
        payload["batch_size"],
    )


def start_server(artifacts: str, queue: int) -> tuple[subprocess.Popen[str], str]:
    sdtrt = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
    if artifacts == "tiny":
        out = Path(tempfile.mkdtemp(prefix="serve-load-")) / "tiny"
        subprocess.run([sdtrt, "-q", "export", "tiny", "--out", str(out), "--precision", "fp32"], check=True)
        artifacts = str(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sdtrt, "serve", artifacts, "--port", str(port), "--queue", str(queue)], text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"sdtrt serve exited with {proc.returncode}") from None
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("sdtrt serve did not become healthy within 120 s")


def format_table(rows: list[LoadRow]) -> str:
    lines = [f"{'clients':>7} {'reqs':>5} {'failed':>6} {'req/s':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8}"]
    for r in rows:
        lines.append(
            f"{r.concurrency:>7} {r.requests:>5} {r.failed:>6} {r.requests_per_s:>7.2f} {r.images_per_s:>7.2f} "
            f"{r.p50_ms:>8.0f} {r.p99_ms:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="A running server, e.g. http://127.0.0.1:7860")
    target.add_argument("--artifacts", help="Start `sdtrt serve` on this artifact folder ('tiny': export it)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="Comma-separated client counts.")
    parser.add_argument("--requests", type=int, default=24, help="Requests per concurrency level.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", dest="json_path", type=Path, help="Write the rows (and the setup) as JSON.")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.artifacts, queue=max(16, max(levels) * 2))
    payload = {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size}
    payload.update(batch_size=args.batch_size, sampler_name="Euler", cfg_scale=7.0)
    try:
        run_level(url, 1, args.warmup, payload, seed0=10**6)
        rows = [run_level(url, c, args.requests, payload, seed0=1000 * c) for c in levels]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    print(format_table(rows))
    if args.json_path:
        setup = {"url": args.url or "local sdtrt serve", "artifacts": args.artifacts, "host": platform.node()}
        setup.update(cpu_count=os.cpu_count(), python=platform.python_version(), machine=platform.machine())
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
