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
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=0, help="image side for the check generations (0: smallest)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    from sdtrt.export.onnx_export import ExportOptions, export_artifacts, write_source_artifact
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="sdtrt-lora-switch-") as tmp:
        root = Path(tmp)
        bundle = load_source(args.source)
        profile = default_profile(bundle)
        size = args.size or profile.min_height
        a = save_lora(attention_lora(bundle.unet, 1), root / "a.safetensors", "kohya", unet=bundle.unet)
        b = save_lora(attention_lora(bundle.unet, 2), root / "b.safetensors", "diffusers")
        layers = len(attention_lora(bundle.unet, 1))
        start = time.perf_counter()
        if args.backend == "torch":
            write_source_artifact(bundle, root / "art", profile)
        else:
            export_artifacts(
                bundle,
                root / "art",
                ExportOptions(profile=profile, components=("text_encoder", "unet", "vae_decoder")),
                consume=True,
            )
        print(f"{args.source}: exported in {time.perf_counter() - start:.1f} s; LoRAs of {layers} layers, rank {RANK}")
        del bundle
        rows: list[dict[str, Any]] = []
        with Pipeline.from_artifacts(root / "art", backend=args.backend, device="cpu") as pipe:

            def image() -> torch.Tensor:
                return pipe("a photo of a cat", steps=1, seed=0, height=size, width=size, scheduler="euler").pixels

            base = image()
            plan = [("a", [(a, 1.0)]), ("b", [(b, 0.8)]), ("none", [])] * args.rounds
            for index, (name, loras) in enumerate(plan):
                start = time.perf_counter()
                pipe.set_loras(loras)
                seconds = time.perf_counter() - start
                changed = not torch.equal(image(), base)
                rows.append({"switch": index, "to": name, "seconds": round(seconds, 4), "changed": changed})
                print(
                    f"switch {index:2d} -> {name:<4} {seconds * 1000:9.1f} ms  image {'changed' if changed else 'base'}"
                )
                if changed == (name == "none"):
                    raise SystemExit(f"switch to {name}: the image {'changed' if changed else 'did not change'}")
    warm = [r["seconds"] for r in rows[1:] if r["to"] != "none"]
    summary = {
        "cold_first_switch_s": rows[0]["seconds"],
        "warm_switch_median_s": statistics.median(warm) if warm else None,
        "to_none_median_s": statistics.median(r["seconds"] for r in rows if r["to"] == "none"),
    }
    print(
        f"first switch (reads the base weights) {summary['cold_first_switch_s']:.3f} s; later switches median "
        f"{summary['warm_switch_median_s']:.3f} s; back to none {summary['to_none_median_s']:.3f} s"
    )
    if args.json:
        record = {
            "benchmark": "lora_switch",
            "settings": {
                "source": args.source,
                "backend": args.backend,
                "rank": RANK,
                "layers": layers,
                "rounds": args.rounds,
                "precision": "fp32",
            },  # fmt: skip
            "rows": rows,
            "summary": summary,
            "machine": {"platform": platform.platform(), "processor": platform.machine()},
            "versions": {"torch": torch.__version__},
            "date": datetime.date.today().isoformat(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
