"""What ControlNet inputs cost per denoising step on ONNX Runtime: zero residuals, and one or two ControlNets.

    python -m sdtrt.benchmarks.controlnet_cost --json benchmarks/results/controlnet_cost_sd15_256.json
    python -m sdtrt.benchmarks.controlnet_cost --quick --json /tmp/quick.json   # tiny preset, a few seconds

Exports ``source`` twice at fp32 into a cache folder (once, reused by later runs): a control-ready UNet with two
random ControlNets of the same architecture (``controlnet_from_unet``, seeds 1 and 2), and the plain UNet
(``--plain-unet``). Then both pipelines stay open and four variants run, interleaved in adjacent pairs whose order
alternates round by round (A B C D, B A D C, C D A B, D C B A, ...):

    plain      the plain UNet
    ready-0    the control-ready UNet fed zero residuals (no ControlNet active)
    ready-1    the same with one ControlNet
    ready-2    the same with two ControlNets

Each run is the denoising loop of one text-to-image call (guidance on: UNet batch 2; the text encoded once per
variant beforehand, no VAE decode); its per-step time is its denoise time over its steps. The zero-residual cost
is ``ready-0 - plain`` per round (the median of these paired differences and their IQR), as a share of the plain
UNet's median per-step time; the cost of one or two ControlNets is ``ready-n - ready-0`` per round likewise.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sdtrt.benchmarks.records import write_record

VARIANTS = ("plain", "ready-0", "ready-1", "ready-2")
CONTROLNETS = ("cn1", "cn2")
PROMPT = "a photo of an astronaut riding a horse on mars, detailed, sharp focus"
GUIDANCE = 7.5
# (variant, the one it adds to): zero residuals over the plain UNet, each ControlNet count over none
COMPARISONS = (("ready-0", "plain"), ("ready-1", "ready-0"), ("ready-2", "ready-0"))
THRESHOLD = 0.02  # the zero-residual cost the control-ready default may add: 2 % of the denoise time


@dataclass(frozen=True)
class Settings:
    """What one measurement runs: the model, image side, steps, rounds, and where the exports are kept."""

    source: str
    size: int
    steps: int
    rounds: int
    warmup: int
    cache: Path
    seed: int = 0


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    """The settings and the record's path; ``--quick`` is the tiny preset, small enough for a test."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="sd15-random")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, each one run of every variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdtrt-controlnet-cost"), help="export cache folder")
    parser.add_argument("--quick", action="store_true", help="the tiny preset at 64x64, 2 steps, 3 rounds (a test)")
    parser.add_argument("--json", type=Path, help="write the record here")
    args = parser.parse_args(argv)
    if args.quick:
        args.source, args.size, args.steps, args.rounds, args.warmup = "tiny", 64, 2, 3, 1
    if args.rounds < 1 or args.warmup < 0 or args.steps < 1 or args.size < 8:
        parser.error(
            f"expected --rounds >= 1, --warmup >= 0, --steps >= 1 and --size >= 8, got rounds {args.rounds}, "
            f"warmup {args.warmup}, steps {args.steps}, size {args.size}"
        )
    settings = Settings(args.source, args.size, args.steps, args.rounds, args.warmup, args.cache)
    return settings, args.json


def prepare(source: str, size: int, cache: Path) -> tuple[Path, Path]:
    """The control-ready artifact (with the ControlNets ``cn1`` and ``cn2``) and the plain one, exported under
    ``cache`` unless they are there already (a manifest is written last, so a present one is complete)."""
    root = cache / f"{source}-{size}-fp32"
    ready, plain = root / "ready", root / "plain"
    if (ready / "manifest.json").is_file() and (plain / "manifest.json").is_file():
        return ready, plain
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.runtime.models.controlnet import TINY_HINT_CHANNELS, controlnet_from_unet
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.profile import ShapeProfile
    from sdtrt.runtime.specs import required_components

    bundle = load_source(source)
    profile = ShapeProfile.static(size, size, 1)
    components = required_components(bundle.model)
    if not (ready / "manifest.json").is_file():
        args = []
        for k, name in enumerate(CONTROLNETS, start=1):
            channels = {"hint_channels": TINY_HINT_CHANNELS} if source.startswith("tiny") else {}
            controlnet_from_unet(bundle.unet, seed=k, **channels).save_pretrained(root / name)
            args.append(ControlNetArg(str(root / name), name))
        controlnets = load_controlnets(args, bundle.model)
        export_artifacts(bundle, ready, ExportOptions(profile=profile, components=components), controlnets=controlnets)
    if not (plain / "manifest.json").is_file():
        options = ExportOptions(profile=profile, components=components, control_ready=False)
        export_artifacts(bundle, plain, options)
    return ready, plain


def hint_image(size: int) -> Image.Image:
    """A white ring on black: an edge map like a canny hint (its content does not change the time)."""
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white", width=2)
    return image


def round_order(r: int) -> list[str]:
    """Round ``r``'s order: the pairs (plain, ready-0) and (ready-1, ready-2) adjacent, each pair's order flipped
    every round and the pairs swapped every other round, so neither side of a pair always runs first."""
    first, second = [VARIANTS[0], VARIANTS[1]], [VARIANTS[2], VARIANTS[3]]
    if r % 2:
        first, second = first[::-1], second[::-1]
    return first + second if r % 4 < 2 else second + first


class DenoiseRun:
    """One variant's denoising loop alone: the request and its text encoded once, then only the steps timed
    (text encoding and VAE decoding are the same for every variant and would only add noise)."""

    def __init__(self, pipe: Any, settings: Settings, controls: Sequence[Any]) -> None:
        from sdtrt.runtime.request import make_request

        self.pipe, self.steps = pipe, settings.steps
        self.req = make_request(
            pipe.manifest,
            pipe.default_scheduler,
            pipe.engines,
            PROMPT,
            "",
            steps=settings.steps,
            guidance_scale=GUIDANCE,
            seed=settings.seed,
            height=settings.size,
            width=settings.size,
            scheduler=None,
            num_images=1,
            image=None,
            strength=1.0,
        )
        pipe.check_controls(controls)
        self.text, self.pooled = pipe.encode_text(self.req)
        self.controls = [(c, c.hint(settings.size, settings.size)) for c in controls]

    def run(self) -> Any:
        """Set up the starting latents and hints (untimed), run the steps; the call's ``StageTimes``."""
        from sdtrt.runtime.timing import StageTimes

        times = StageTimes()
        denoiser = self.pipe.prepare_latents(self.req, self.text, self.pooled, None, None, self.controls)
        self.pipe.denoise(denoiser, self.req, times=times)
        return times


def measure(
    settings: Settings, ready: Path, plain: Path, say: Any = print, on_round: Any = None
) -> list[dict[str, Any]]:
    """Open both artifacts on ONNX Runtime and time every variant ``settings.rounds`` times, interleaved;
    ``on_round(rows)`` after each timed round (a long run keeps what it measured if it is stopped)."""
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.pipeline import Pipeline

    hint = hint_image(settings.size)
    rows: list[dict[str, Any]] = []
    with (
        Pipeline.from_artifacts(ready, backend="onnxruntime") as ready_pipe,
        Pipeline.from_artifacts(plain, backend="onnxruntime") as plain_pipe,
    ):
        runs = {"plain": DenoiseRun(plain_pipe, settings, [])}
        for n in range(3):
            controls = [ControlInput(name, hint) for name in CONTROLNETS[:n]]
            runs[f"ready-{n}"] = DenoiseRun(ready_pipe, settings, controls)
        for r in range(-settings.warmup, settings.rounds):
            for position, variant in enumerate(round_order(r)):
                times = runs[variant].run()
                step_ms = 1000 * times.denoise / settings.steps
                label = "warm-up" if r < 0 else f"round {r + 1}/{settings.rounds}"
                say(f"{label} {variant:<8} {step_ms:8.1f} ms/step")
                if r >= 0:
                    row = {"variant": variant, "round": r, "position": position, "step_ms": step_ms}
                    rows.append(row | {"steps_ms": [1000 * s for s in times.steps], "denoise_s": times.denoise})
            if r >= 0 and on_round is not None:
                on_round(rows)
    return rows


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles, linear interpolation."""
    q = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per variant the median per-step ms, IQR and fastest run; the cost of each variant over the one it adds to,
    from the rounds' paired differences in ms and in % of the pair's base (the % is robust to the load of a
    shared machine changing between rounds); and the decision the zero-residual cost supports."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["variant"]] = row["step_ms"]
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        times = [row["step_ms"] for row in rows if row["variant"] == variant]
        q1, median, q3 = quartiles(times)
        variants[variant] = {
            "runs": len(times),
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "fastest_ms": min(times),
        }
    costs = {f"{v} - {a}": paired_cost(by_round, v, a) for v, a in COMPARISONS}
    zero = costs["ready-0 - plain"]
    within = zero["median_pct"] <= 100 * THRESHOLD
    return {
        "variants": variants,
        "costs": costs,
        "zero_residual_pct": zero["median_pct"],
        "decision": "control-ready by default" if within else "plain UNet by default, control-ready on request",
        "threshold_pct": 100 * THRESHOLD,
    }


def paired_cost(by_round: dict[int, dict[str, float]], variant: str, against: str) -> dict[str, Any]:
    """``variant - against`` over the rounds that ran both: quartiles in ms and in % of ``against``."""
    pairs = [(t[variant], t[against]) for t in by_round.values() if variant in t and against in t]
    q1, median, q3 = quartiles([a - b for a, b in pairs])
    p1, pct, p3 = quartiles([100 * (a - b) / b for a, b in pairs])
    return {
        "pairs": len(pairs),
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "median_pct": pct,
        "q1_pct": p1,
        "q3_pct": p3,
        "positive_pairs": sum(a > b for a, b in pairs),
    }


def format_table(summary: dict[str, Any]) -> str:
    """The per-variant and per-difference tables as text."""
    lines = [f"{'variant':<10} {'runs':>4} {'median ms/step':>15} {'IQR':>19} {'fastest':>9}"]
    for variant, v in summary["variants"].items():
        lines.append(
            f"{variant:<10} {v['runs']:>4} {v['median_ms']:>15.1f} {v['q1_ms']:>9.1f}-{v['q3_ms']:<9.1f} "
            f"{v['fastest_ms']:>9.1f}"
        )
    lines.append("")
    lines.append(
        f"{'paired difference':<18} {'pairs':>5} {'median ms':>10} {'IQR ms':>19} {'median %':>9} {'IQR %':>15} "
        f"{'> 0':>4}"
    )
    for name, c in summary["costs"].items():
        lines.append(
            f"{name:<18} {c['pairs']:>5} {c['median_ms']:>10.1f} {c['q1_ms']:>9.1f}-{c['q3_ms']:<9.1f} "
            f"{c['median_pct']:>8.1f}% {c['q1_pct']:>6.1f}-{c['q3_pct']:<6.1f}% {c['positive_pairs']:>4}"
        )
    lines.append("")
    lines.append(
        f"zero residuals cost {summary['zero_residual_pct']:.1f} % of the plain UNet's step (median of the paired "
        f"rounds; limit {summary['threshold_pct']:g} %): {summary['decision']}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    settings, json_path = parse_args(argv)
    start = time.perf_counter()
    ready, plain = prepare(settings.source, settings.size, settings.cache)
    print(f"artifacts ready in {time.perf_counter() - start:.0f} s: {ready}, {plain}", flush=True)
    record_settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()}
    record_settings.update(guidance=GUIDANCE, precision="fp32", backend="onnxruntime", variants=list(VARIANTS))

    def save(rows: list[dict[str, Any]]) -> None:
        if json_path:
            done = len(rows) // len(VARIANTS)
            extra = {"rounds_done": done, "cpus": len(os.sched_getaffinity(0))}
            write_record(json_path, "controlnet_cost", record_settings, rows, summarize(rows), **extra)

    rows = measure(settings, ready, plain, say=lambda line: print(line, flush=True), on_round=save)
    print(
        f"{settings.source} {settings.size}x{settings.size}, {settings.steps} steps, CFG {GUIDANCE:g} (UNet batch 2), "
        f"fp32, onnxruntime, {settings.rounds} rounds interleaved"
    )
    print(format_table(summarize(rows)))
    if json_path:
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
