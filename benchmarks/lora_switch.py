"""How long switching LoRAs takes on an open pipeline: no re-export, no rebuild.

    python -m sdtrt.benchmarks.lora_switch --source tiny --backend onnxruntime --rounds 5 \
        --json benchmarks/results/lora_switch_tiny.json

Exports ``source`` (fp32, untimed), opens it, writes two rank-16 LoRAs on every UNet attention projection (to_q,
to_k, to_v, to_out.0 of attn1 and attn2), then switches A -> B -> none -> A ... ``rounds`` times, timing each
``set_loras`` call: reading the file (cached after its first use), the deltas, and on ONNX Runtime the new sessions
(the base initializers are read from the ONNX file on the first switch only: that is the "cold" figure). Each
switch is followed by one generation, untimed, that checks the LoRA changed the image and "none" restored it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.benchmarks.records import write_record

RANK = 16
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_lora(unet: Any, seed: int, rank: int = RANK) -> dict[tuple[str, str], Any]:
    """A rank-``rank`` LoRA on every attention projection of ``unet`` (seeded)."""
    from sdtrt.runtime.lora.files import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path, child in unet.named_modules():
        if isinstance(child, torch.nn.Linear) and any(
            path.endswith(f"{a}.{p}") for a in ("attn1", "attn2") for p in PROJECTIONS
        ):
            down = torch.randn((rank, child.weight.shape[1]), generator=generator) * 0.05
            up = torch.randn((child.weight.shape[0], rank), generator=generator) * 0.05
            layers[("unet", path)] = LoraLayer(down, up, alpha=float(rank))
    return layers


@dataclass(frozen=True)
class Setup:
    """The exported artifact, the two LoRA files, how many layers they change, and the check image's side."""

    folder: Path
    lora_a: Path
    lora_b: Path
    layers: int
    size: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=0, help="image side for the check generations (0: smallest)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def prepare(source: str, backend: str, size: int, root: Path) -> Setup:
    """Write the two LoRAs (kohya and diffusers format) and export ``source`` for ``backend`` under ``root``."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts, write_source_artifact
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.sources import load_source

    bundle = load_source(source)
    profile = default_profile(bundle)
    a = save_lora(attention_lora(bundle.unet, 1), root / "a.safetensors", "kohya", unet=bundle.unet)
    b = save_lora(attention_lora(bundle.unet, 2), root / "b.safetensors", "diffusers")
    layers = len(attention_lora(bundle.unet, 1))
    start = time.perf_counter()
    if backend == "torch":
        write_source_artifact(bundle, root / "art", profile)
    else:
        export_artifacts(
            bundle,
            root / "art",
            ExportOptions(profile=profile, components=("text_encoder", "unet", "vae_decoder")),
            consume=True,
        )
    print(f"{source}: exported in {time.perf_counter() - start:.1f} s; LoRAs of {layers} layers, rank {RANK}")
    return Setup(root / "art", a, b, layers, size or profile.min_height)


def switch_rounds(setup: Setup, backend: str, rounds: int) -> list[dict[str, Any]]:
    """Switch A -> B -> none ``rounds`` times on one open pipeline, timing each switch and checking the image."""
    from sdtrt.runtime.pipeline import Pipeline

    rows: list[dict[str, Any]] = []
    with Pipeline.from_artifacts(setup.folder, backend=backend, device="cpu") as pipe:

        def image() -> torch.Tensor:
            size = setup.size
            return pipe("a photo of a cat", steps=1, seed=0, height=size, width=size, scheduler="euler").pixels

        base = image()
        plan = [("a", [(setup.lora_a, 1.0)]), ("b", [(setup.lora_b, 0.8)]), ("none", [])] * rounds
        for index, (name, loras) in enumerate(plan):
            start = time.perf_counter()
            pipe.set_loras(loras)
            seconds = time.perf_counter() - start
            changed = not torch.equal(image(), base)
            rows.append({"switch": index, "to": name, "seconds": round(seconds, 4), "changed": changed})
            print(f"switch {index:2d} -> {name:<4} {seconds * 1000:9.1f} ms  image {'changed' if changed else 'base'}")
            if changed == (name == "none"):
                raise SystemExit(f"switch to {name}: the image {'changed' if changed else 'did not change'}")
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cold first switch, the median of later switches to a LoRA, and the median switch back to none."""
    warm = [r["seconds"] for r in rows[1:] if r["to"] != "none"]
    return {
        "cold_first_switch_s": rows[0]["seconds"],
        "warm_switch_median_s": statistics.median(warm) if warm else None,
        "to_none_median_s": statistics.median(r["seconds"] for r in rows if r["to"] == "none"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdtrt-lora-switch-") as tmp:
        setup = prepare(args.source, args.backend, args.size, Path(tmp))
        rows = switch_rounds(setup, args.backend, args.rounds)
    summary = summarize(rows)
    print(
        f"first switch (reads the base weights) {summary['cold_first_switch_s']:.3f} s; later switches median "
        f"{summary['warm_switch_median_s']:.3f} s; back to none {summary['to_none_median_s']:.3f} s"
    )
    if args.json:
        settings = {
            "source": args.source,
            "backend": args.backend,
            "rank": RANK,
            "layers": setup.layers,
            "rounds": args.rounds,
            "precision": "fp32",
        }
        write_record(args.json, "lora_switch", settings, rows, summary, versions={"torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
