"""Memory and switch time of ``sdtrt serve MODELS --max-loaded N`` across model switches.

    python -m sdtrt.benchmarks.serve_models --max-loaded 1 --cycles 6 --json benchmarks/results/serve_models_1.json
    python -m sdtrt.benchmarks.serve_models --max-loaded 1 --ray     # the Ray deployment: /memory is the replica's

Builds two models of one mid-sized architecture (between ``tiny`` and SD 1.5, ~63 M parameters, 254 MB of fp32
ONNX, so one model is plainly visible in the server's RSS) from two weight seeds, saves each as a diffusers folder
and exports it with ``sdtrt export`` into ``--cache`` (reruns skip both). Then starts ``sdtrt serve`` on the
folder of the two, and for ``--cycles`` cycles switches A -> B with ``POST /sdapi/v1/options
{"sd_model_checkpoint": ...}``, each switch followed by one txt2img request. It reads the server's RSS from
``/proc/PID/status`` (VmRSS) right after the switch and after the request, and what ``/sdapi/v1/memory`` reports.
With ``--max-loaded 1`` the memory must come back to one model's level each cycle (the closed model released);
with ``--max-loaded 2`` both models stay open and switches are cheap. With ``--ray`` the engines live in a replica
process: the RSS columns are then the driver's, ``/memory`` (which asks the replica) is the figure to read, and
the count of open models (from the plain server's log) is not shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtrt.benchmarks.records import write_record
from sdtrt.benchmarks.serve_setup import MB, Server, build_models, call, start_server, stop_server, txt2img, vm_rss


@dataclass(frozen=True)
class CycleRow:
    """One switch and the request after it: the server's RSS after the request, and what /memory said."""

    cycle: int
    model: str
    switch_s: float
    first_request_s: float
    rss_switch_mb: float  # right after the switch answered (the new model open, the old one closed if it must be)
    rss_mb: float
    memory_used_mb: float
    loaded: int | None  # from the server's log; None with --ray (the replica logs elsewhere)


def run_cycles(
    server: Server, models: list[str], cycles: int, payload: dict[str, Any], count_loaded: bool = True
) -> list[CycleRow]:
    """Switch to each model in turn ``cycles`` times, one request after each switch; RSS after each request.

    ``loaded`` counts the models the server's log says are open (its "opened" minus its "closed" lines)."""
    rows: list[CycleRow] = []
    for cycle in range(cycles):
        for model in models:
            start = time.perf_counter()
            call(server.url, "/sdapi/v1/options", {"sd_model_checkpoint": model})
            switched = time.perf_counter()
            rss_switch = vm_rss(server.proc.pid) / MB
            status, seconds = txt2img(server.url, {**payload, "seed": cycle})
            if status != 200:
                raise SystemExit(f"txt2img on {model} answered {status}:\n{server.log[-2000:]}")
            used = call(server.url, "/sdapi/v1/memory")["ram"].get("used", float("nan"))
            log = list(server.lines)
            opened = sum(" opened (" in line for line in log) - sum(line.rstrip().endswith(" closed") for line in log)
            loaded = opened if count_loaded else None
            rss = vm_rss(server.proc.pid) / MB
            row = CycleRow(cycle, model, switched - start, seconds, rss_switch, rss, used / MB, loaded)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = "cycle model    switched   RSS MB  /memory loaded  switch s request s"


def format_row(row: CycleRow) -> str:
    """One table line: RSS right after the switch and after the request, /memory's figure, models open, times."""
    loaded = "-" if row.loaded is None else str(row.loaded)
    sizes = f"{row.rss_switch_mb:>8.0f} {row.rss_mb:>8.0f} {row.memory_used_mb:>8.0f} {loaded:>6}"
    return f"{row.cycle:>5} {row.model:<8} {sizes} {row.switch_s:>9.2f} {row.first_request_s:>9.2f}"


def summarize(rows: list[CycleRow], start_rss_mb: float, key: str = "rss_mb") -> dict[str, Any]:
    """Memory after each model's first and last visit, the growth between them, the highest per cycle, and median
    switch and request times. ``key``: the figure to read, ``rss_mb`` (the server process) or ``memory_used_mb``
    (what /memory reports: on Ray, the replica's)."""
    models = sorted({r.model for r in rows})
    mb = {id(r): float(getattr(r, key)) for r in rows}
    first = {m: next(mb[id(r)] for r in rows if r.model == m) for m in models}
    last = {m: next(mb[id(r)] for r in reversed(rows) if r.model == m) for m in models}
    later = rows[len(models) :] or rows  # after each model's first visit
    return {
        "memory": key,
        "start_rss_mb": round(start_rss_mb, 1),
        "first_visit_mb": {m: round(v, 1) for m, v in first.items()},
        "last_visit_mb": {m: round(v, 1) for m, v in last.items()},
        "growth_first_to_last_mb": round(max(last[m] - first[m] for m in models), 1),
        "max_mb": round(max(mb.values()), 1),
        # Per cycle, the highest: flat from cycle to cycle when closed models' memory comes back.
        "cycle_max_mb": [
            round(max(mb[id(r)] for r in rows if r.cycle == c), 1) for c in sorted({r.cycle for r in rows})
        ],
        "switch_median_s": round(statistics.median(r.switch_s for r in later), 3),
        "request_median_s": round(statistics.median(r.first_request_s for r in later), 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loaded", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=4, help="Switch cycles (A then B) after the start.")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sdtrt-serve-models")
    parser.add_argument("--models", type=Path, help="Serve this folder of models instead of building the two.")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="Serve with --ray (RSS: the driver; /memory: replica).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.max_loaded < 1 or args.cycles < 1:
        parser.error(f"--max-loaded and --cycles must be >= 1, got {args.max_loaded} and {args.cycles}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.models or build_models(args.cache)
    ray = ("--ray", "--replicas", "1") if args.ray else ()
    server = start_server(str(folder), 4, ("--max-loaded", str(args.max_loaded), *ray), wait_s=300 if ray else 120)
    try:
        models = [m["model_name"] for m in call(server.url, "/sdapi/v1/sd-models")]
        start_rss = vm_rss(server.proc.pid) / MB
        print(f"serving {', '.join(models)} with --max-loaded {args.max_loaded}; RSS at start {start_rss:.0f} MB")
        print(HEADER)
        payload = {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size}
        rows = run_cycles(server, models, args.cycles, {**payload, "sampler_name": "Euler"}, not args.ray)
    finally:
        stop_server(server)
    summary = summarize(rows, start_rss, "memory_used_mb" if args.ray else "rss_mb")
    print(json.dumps(summary))
    if args.json:
        settings = {"max_loaded": args.max_loaded, "ray": args.ray, "cycles": args.cycles, "models": models, **payload}
        write_record(args.json, "serve_models", settings, [asdict(r) for r in rows], summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
