"""SDXL on the CPU: sdtrt's runtime (torch backend) against diffusers' StableDiffusionXLPipeline, same weights.

    python -m sdtrt.benchmarks.sdxl_cpu --source sdxl-random --size 256 --steps 2 --rounds 2 \
        --json benchmarks/results/sdxl_cpu.json

One fp32 SDXL takes about 14 GB, so the two cannot be held at once on a 24 GB machine: each run is its own
process, and the runs alternate (diffusers, sdtrt, sdtrt, diffusers, ...: the order rotates each round), so slow
phases of a shared machine do not fall on one side. Every run loads the model (seeded: the same weights each time),
generates once untimed (warm-up), then once timed at the same settings, and saves its pixels; the parent reports
each side's times and the PSNR between the images of the two sides from the same seed: the end-to-end parity of
the real architecture.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtrt.benchmarks.records import write_record
from sdtrt.runtime.compare import psnr

SIDES = ("diffusers", "sdtrt-torch")
PROMPT = "a photo of an astronaut riding a horse on mars, detailed, sharp focus"


def _generator(side: str, source: str, size: int, steps: int, guidance: float, seed: int) -> Callable[[], Any]:
    """A function that generates one image on ``side`` (the model is loaded once, here)."""
    import torch

    from sdtrt.runtime.models.sources import load_source

    bundle = load_source(source)
    if side == "diffusers":
        from sdtrt.runtime.models.reference import diffusers_pipeline

        pipe = diffusers_pipeline(bundle, "euler")

        def run_diffusers() -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generator, output_type="pt")  # fmt: skip
            return out.images.float()

        return run_diffusers

    from sdtrt.export.onnx_export import write_source_artifact
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.profile import ShapeProfile

    folder = Path(tempfile.mkdtemp(prefix="sdtrt-sdxl-cpu-")) / "torch"
    write_source_artifact(bundle, folder, ShapeProfile.static(size, size))
    del bundle  # the torch backend loads its own copy from the manifest's source: never two at once
    gc.collect()
    sdtrt = Pipeline.from_artifacts(folder, backend="torch", device="cpu")

    def run_sdtrt() -> torch.Tensor:
        result = sdtrt(PROMPT, steps=steps, guidance_scale=guidance, seed=seed, height=size, width=size,
                       scheduler="euler")  # fmt: skip
        return result.pixels

    return run_sdtrt


def run_side(side: str, source: str, size: int, steps: int, guidance: float, seed: int, out: Path) -> dict[str, Any]:
    """In this process: load, warm up, time one generation, save the pixels to ``out`` (.npy)."""
    import numpy as np

    start = time.perf_counter()
    generate = _generator(side, source, size, steps, guidance, seed)
    loaded = time.perf_counter() - start
    generate()  # warm-up
    start = time.perf_counter()
    pixels = generate()
    seconds = time.perf_counter() - start
    np.save(out, pixels.numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"side": side, "load_s": round(loaded, 2), "generate_s": round(seconds, 3), "peak_rss_gib": peak / 2**30}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="sdxl-random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--pixels", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size <= 0 or args.steps < 1 or args.rounds < 1:
        parser.error(f"--size, --steps and --rounds must be positive, got {args.size}, {args.steps}, {args.rounds}")
    return args


def run_child(side: str, args: argparse.Namespace, pixels: Path) -> dict[str, Any]:
    """Run one side in its own process (``--side``); its row."""
    command = [sys.executable, "-m", "sdtrt.benchmarks.sdxl_cpu", "--side", side, "--pixels", str(pixels)]
    command += ["--source", args.source, "--size", str(args.size), "--steps", str(args.steps)]
    command += ["--cfg", str(args.cfg), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every round: both sides in alternating order, then the PSNR between their images."""
    import numpy as np

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdtrt-sdxl-cpu-") as tmp:
        for round_index in range(args.rounds):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for side in order:
                row = run_child(side, args, Path(tmp) / f"{side}-{round_index}.npy") | {"round": round_index}
                rows.append(row)
                print(f"round {round_index} {side:<12} load {row['load_s']:7.1f} s  generate {row['generate_s']:7.2f} s"
                      f"  peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
            a, b = (np.load(Path(tmp) / f"{side}-{round_index}.npy") for side in SIDES)
            rows.append({"round": round_index, "psnr_db": psnr(a, b)})
            print(f"round {round_index} sdtrt-torch vs diffusers image PSNR {psnr(a, b):.1f} dB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        row = run_side(args.side, args.source, args.size, args.steps, args.cfg, args.seed, args.pixels)
        print(json.dumps(row))
        return 0
    rows = run_rounds(args)
    times = {s: sorted(r["generate_s"] for r in rows if r.get("side") == s) for s in SIDES}
    summary = {s: {"median_s": t[len(t) // 2], "min_s": t[0]} for s, t in times.items()}
    ratio = summary["sdtrt-torch"]["median_s"] / summary["diffusers"]["median_s"]
    print(f"median generate: diffusers {summary['diffusers']['median_s']:.2f} s, sdtrt torch "
          f"{summary['sdtrt-torch']['median_s']:.2f} s ({ratio:.2f}x the time)")  # fmt: skip
    if args.json:
        settings = {
            "source": args.source,
            "size": args.size,
            "steps": args.steps,
            "cfg": args.cfg,
            "seed": args.seed,
            "sampler": "euler",
            "precision": "fp32",
            "prompt": PROMPT,
        }
        write_record(args.json, "sdxl_cpu", settings, rows, summary, ratio=ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
