"""The GPU check's step-caching rows: cache interval N against 1 (uncached), eager and as CUDA graphs.

    python -m sdtrt.benchmarks.step_cache_gpu --preset sd15-random --size 512 --steps 30 --intervals 1,3 \\
        --json out/gpu_check/gpu_sd15-random_512_30steps_cache3.json
    python -m sdtrt.benchmarks.step_cache_gpu --preset tiny --device cpu --size 64 --steps 4 --runs 1   (dry run)

The torch backend runs the preset's seeded random weights from a source artifact (``write_source_artifact`` with
the shallow UNet: no ONNX files to export). ``--engines DIR`` adds a TensorRT engine folder built beforehand from
the same preset (``sdtrt export`` + ``sdtrt build``) where tensorrt is installed. Every pipeline is open at once and
the configurations (backend x interval) interleave, the order rotating each round. Each row carries its
``cache_interval`` (1 for uncached): median and p90 end-to-end and denoise time, speed-up against interval 1 of
the same backend; the quality block gives the PSNR of each cached image against the same backend's uncached one,
and of the captured images against the eager ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photo of a cat on a red sofa"


def parse_intervals(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> (1, 3); 1 (the uncached baseline) is always included, first."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--intervals expects integers >= 1 like 1,3, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--intervals expects integers >= 1 like 1,3, got {text!r}")
    return tuple(dict.fromkeys([1, *values]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--intervals", type=parse_intervals, default=(1, 3), help="cache intervals, e.g. 1,3")
    parser.add_argument("--schedule", default="uniform", choices=["uniform", "quadratic"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16", choices=["auto", "fp32", "fp16"])
    parser.add_argument("--engines", type=Path, help="a TensorRT engine folder of the same preset (optional)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.steps < 1:
        parser.error(f"--runs must be >= 1, --warmup >= 0, --steps >= 1; got {args.runs}, {args.warmup}, {args.steps}")
    return args


def open_pipelines(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """backend name -> open Pipeline: torch (eager), torch-graph (CUDA only), tensorrt (with ``--engines``)."""
    from sdtrt.export.onnx_export import write_source_artifact
    from sdtrt.runtime.engine import BackendOptions
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.profile import ShapeProfile

    artifact = work / "artifact"
    write_source_artifact(load_preset(args.preset), artifact, ShapeProfile.static(args.size, args.size))
    cuda = torch.device(args.device).type == "cuda"
    options = BackendOptions(precision=args.precision)
    pipes = {
        name: Pipeline.from_artifacts(artifact, "torch", args.device, options, cuda_graph=graph)
        for name, graph in (("torch", False), ("torch-graph", True))
        if cuda or not graph
    }
    if args.engines is not None:
        pipes["tensorrt"] = Pipeline.from_artifacts(args.engines, "tensorrt", args.device)
    return pipes


def rotations(configs: list[tuple[str, int]], rounds: int) -> list[list[tuple[str, int]]]:
    """The order of each round: every configuration once, starting one further along each round."""
    return [configs[r % len(configs) :] + configs[: r % len(configs)] for r in range(rounds)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every (backend, interval), interleaved, and summarize."""
    from sdtrt.runtime.compare import psnr

    cuda = torch.device(args.device).type == "cuda"
    call = {"steps": args.steps, "seed": 0, "height": args.size, "width": args.size, "scheduler": "euler_a"}
    with tempfile.TemporaryDirectory(prefix="sdtrt-step-cache-gpu-") as tmp:
        pipes = open_pipelines(args, Path(tmp))
        configs = [(p, n) for p in pipes for n in args.intervals]
        times: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
        images: dict[tuple[str, int], torch.Tensor] = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for round_, order in enumerate(rotations(configs, args.warmup + args.runs)):
            for name, interval in order:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                result = pipes[name](
                    PROMPT, guidance_scale=args.cfg, cache_interval=interval, cache_schedule=args.schedule, **call
                )
                if cuda:
                    torch.cuda.synchronize()
                if round_ >= args.warmup:
                    times[(name, interval)].append((time.perf_counter() - start, result.times.denoise))
                images[(name, interval)] = result.pixels.float().cpu()
        peak = torch.cuda.max_memory_allocated() if cuda else None
        for pipe in pipes.values():
            pipe.close()
    return summarize(args, times, images, psnr, peak)


def summarize(
    args: argparse.Namespace,
    times: dict[tuple[str, int], list[tuple[float, float]]],
    images: dict[tuple[str, int], torch.Tensor],
    psnr: Any,
    peak: int | None = None,
) -> dict[str, Any]:
    """One JSON row per (backend, interval) with its ``cache_interval``, and the image checks."""
    rows = []
    for (backend, interval), pairs in times.items():
        total = sorted(t for t, _ in pairs)
        denoise = [d for _, d in pairs]
        rows.append(
            {
                "backend": backend,
                "cache_interval": interval,
                "cache_schedule": args.schedule if interval > 1 else None,
                "median_s": statistics.median(total),
                "p90_s": total[min(len(total) - 1, int(0.9 * len(total)))],
                "denoise_median_s": statistics.median(denoise),
                "it_s": args.steps / statistics.median(denoise) if statistics.median(denoise) > 0 else None,
                "runs": len(pairs),
            }
        )
    base = {r["backend"]: r for r in rows if r["cache_interval"] == 1}
    for row in rows:
        row["speedup_vs_uncached"] = base[row["backend"]]["median_s"] / row["median_s"]
        row["denoise_speedup_vs_uncached"] = base[row["backend"]]["denoise_median_s"] / row["denoise_median_s"]
    quality = {}
    for backend, interval in images:
        if interval > 1:
            key = f"{backend}/N{interval}_vs_N1_db"
            quality[key] = float(psnr(images[(backend, interval)], images[(backend, 1)]))
        if backend == "torch-graph":
            quality[f"graph_vs_eager/N{interval}_db"] = float(
                psnr(images[(backend, interval)], images[("torch", interval)])
            )
    return {"benchmark": "step_cache_gpu", "config": vars(args), "rows": rows, "quality": quality, "peak_bytes": peak}


def print_table(report: dict[str, Any]) -> None:
    """The short table the GPU check prints."""
    args = report["config"]
    print(
        f"{args['preset']} {args['size']}x{args['size']}, {args['steps']} steps, CFG {args['cfg']}, {args['precision']}"
    )
    print(f"{'backend':<12} {'N':>3} {'median s':>9} {'p90 s':>8} {'denoise s':>10} {'x vs N=1':>9}")
    for row in report["rows"]:
        print(
            f"{row['backend']:<12} {row['cache_interval']:>3} {row['median_s']:9.3f} {row['p90_s']:8.3f} "
            f"{row['denoise_median_s']:10.3f} {row['speedup_vs_uncached']:9.2f}"
        )
    for key, value in report["quality"].items():
        print(f"{key}: {value:.1f} dB")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in report["config"].items()}
        args.json.write_text(json.dumps({**report, "config": config}, indent=2))


if __name__ == "__main__":
    main()
