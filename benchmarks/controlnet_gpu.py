"""The GPU check's ControlNet row: one random ControlNet per step against none, eager and as one CUDA graph.

    python -m sdtrt.benchmarks.controlnet_gpu --json out/gpu_check/gpu_sd15-random_controlnet.json
    python -m sdtrt.benchmarks.controlnet_gpu --preset tiny --device cpu --size 64 --steps 2 --runs 1   (dry run)

A ControlNet of the preset's architecture is made by ``controlnet_from_unet`` (seeded, non-zero "zero
convolutions"), saved as a diffusers folder and loaded back like a user's, beside a hint image of random strokes.
The torch backend runs the source model, so the folder is a source artifact (``write_source_artifact``: the
manifest and the ControlNet's record, no ONNX files to export). Every configuration is open at once and the runs
interleave (rotating the order each round): torch eager and torch-graph (the whole step, ControlNet included, one
CUDA graph; CUDA only), each with no control and with the ControlNet. Prints the median and p90 end-to-end time of
each, the ControlNet's cost per step, and the PSNR of the captured images against the eager ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PROMPT = "a photo of a cat on a red sofa"


def make_artifact(preset: str, size: int, work: Path) -> Path:
    """A source artifact of ``preset`` with one seeded random ControlNet ``random``; returns its folder."""
    from sdtrt.export.onnx_export import write_source_artifact
    from sdtrt.runtime.models.controlnet import TINY_HINT_CHANNELS, controlnet_from_unet, load_controlnet
    from sdtrt.runtime.models.presets import load_preset
    from sdtrt.runtime.profile import ShapeProfile

    bundle = load_preset(preset)
    channels = {"hint_channels": TINY_HINT_CHANNELS} if preset.startswith("tiny") else {}
    controlnet_from_unet(bundle.unet, seed=0, **channels).save_pretrained(work / "controlnet")
    source = load_controlnet(work / "controlnet")
    write_source_artifact(bundle, work / "artifact", ShapeProfile.static(size, size), [("random", source)])
    return work / "artifact"


def hint_image(size: int) -> Image.Image:
    """White strokes on black, like an edge map."""
    rng = np.random.default_rng(0)
    return Image.fromarray(((rng.random((size, size, 3)) > 0.9) * 255).astype(np.uint8))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every configuration, interleaved, and summarize."""
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.engine import BackendOptions
    from sdtrt.runtime.pipeline import Pipeline

    cuda = torch.device(args.device).type == "cuda"
    controls = {"none": [], "controlnet": [ControlInput("random", hint_image(args.size), resize_mode="just_resize")]}
    call = {"steps": args.steps, "seed": 0, "height": args.size, "width": args.size, "scheduler": "euler_a"}
    with tempfile.TemporaryDirectory(prefix="sdtrt-controlnet-gpu-") as tmp:
        artifact = make_artifact(args.preset, args.size, Path(tmp))
        options = BackendOptions(precision=args.precision)
        pipes = {
            name: Pipeline.from_artifacts(artifact, "torch", args.device, options, cuda_graph=graph)
            for name, graph in (("torch", False), ("torch-graph", True))
            if cuda or not graph
        }
        configs = [(p, c) for p in pipes for c in controls]
        times: dict[str, list[float]] = {f"{p}/{c}": [] for p, c in configs}
        images: dict[str, torch.Tensor] = {}
        for round_ in range(args.warmup + args.runs):
            shift = round_ % len(configs)
            for pipe_name, control in configs[shift:] + configs[:shift]:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                result = pipes[pipe_name](PROMPT, guidance_scale=args.cfg, controls=controls[control], **call)
                if cuda:
                    torch.cuda.synchronize()
                if round_ >= args.warmup:
                    times[f"{pipe_name}/{control}"].append(time.perf_counter() - start)
                images[f"{pipe_name}/{control}"] = result.pixels.float().cpu()
        for pipe in pipes.values():
            pipe.close()
    return summarize(args, times, images, psnr)


def summarize(
    args: argparse.Namespace, times: dict[str, list[float]], images: dict[str, torch.Tensor], psnr: Any
) -> dict[str, Any]:
    """Median and p90 per configuration, the ControlNet's cost per step, and the image checks."""
    rows = {}
    for key, values in times.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        rows[key] = {"median_s": statistics.median(values), "p90_s": p90, "runs": len(values)}
    for key, row in rows.items():
        if key.endswith("/controlnet"):
            base = rows[key.replace("/controlnet", "/none")]["median_s"]
            row["ms_per_step_over_none"] = 1000 * (row["median_s"] - base) / args.steps
    quality = {
        "controlnet_changes_image_db": float(psnr(images["torch/controlnet"], images["torch/none"])),
    }
    if "torch-graph/controlnet" in images:
        quality["graph_vs_eager_with_controlnet_db"] = float(
            psnr(images["torch-graph/controlnet"], images["torch/controlnet"])
        )
    return {"config": vars(args), "rows": rows, "quality": quality}


def print_table(report: dict[str, Any]) -> None:
    """The short table the GPU check prints."""
    args = report["config"]
    print(
        f"{args['preset']} {args['size']}x{args['size']}, {args['steps']} steps, CFG {args['cfg']}, {args['precision']}"
    )
    print(f"{'backend / control':<26} {'median s':>9} {'p90 s':>8} {'ms/step vs none':>16}")
    for key, row in report["rows"].items():
        extra = row.get("ms_per_step_over_none")
        print(
            f"{key:<26} {row['median_s']:9.3f} {row['p90_s']:8.3f} " + (f"{extra:16.2f}" if extra is not None else "")
        )
    for key, value in report["quality"].items():
        print(f"{key}: {value:.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16", choices=["auto", "fp32", "fp16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report, "config": {**report["config"], "json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
