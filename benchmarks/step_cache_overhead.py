"""What exporting with step caching costs a run that does not cache: the same model exported with and without it
(the UNet with and without its extra ``cache_feature`` output), run uncached side by side, interleaved.

    python -m sdtrt.benchmarks.step_cache_overhead WITH_FOLDER WITHOUT_FOLDER --steps 10 --runs 5 \\
        --json benchmarks/results/step_cache_overhead_cpu.json

Both folders must hold the same model at the same profile (``sdtrt export --step-cache`` and ``--no-step-cache``).
Each round runs both once, the order rotated each round, as ``sdtrt bench`` does; the table gives each folder's
median denoise and end-to-end time and the ratio with/without.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdtrt.benchmarks.config import BenchConfig
from sdtrt.benchmarks.harness import round_order
from sdtrt.benchmarks.records import write_record
from sdtrt.benchmarks.report import percentile
from sdtrt.benchmarks.runners import SdtrtRunner
from sdtrt.runtime.errors import ConfigError, SdtrtError
from sdtrt.runtime.manifest import read_manifest

KINDS = ("with step cache", "without")


def check_pair(with_cache: Path, without: Path) -> None:
    """``ConfigError`` unless ``with_cache`` has the shallow UNet, ``without`` has not, and the rest matches."""
    a, b = read_manifest(with_cache), read_manifest(without)
    if not a.model.step_cache or b.model.step_cache:
        raise ConfigError(
            f"expected {with_cache} exported with step caching and {without} without; found step caching "
            f"{a.model.step_cache} and {b.model.step_cache}: export them with --step-cache and --no-step-cache"
        )
    if (a.precision, a.profile, a.kind) != (b.precision, b.profile, b.kind):
        raise ConfigError(
            f"the two folders must differ only in step caching; found {a.precision}/{a.kind} {a.profile} against "
            f"{b.precision}/{b.kind} {b.profile}: export both with the same --precision and profile"
        )


def measure(folders: Sequence[Path], config: BenchConfig) -> list[dict[str, Any]]:
    """``config.warmup`` untimed and ``config.runs`` timed rounds of one uncached run per folder; a row per run."""
    rows = []
    device = torch.device("cpu")
    with contextlib.ExitStack() as stack:
        runners = [SdtrtRunner("onnxruntime", config, device, folder) for folder in folders]
        for runner in runners:
            stack.callback(runner.close)
        order = list(range(len(folders)))
        for k in range(config.warmup):
            for index in round_order(order, k):
                runners[index].run(config.seed)
        for r in range(config.runs):
            for position, index in enumerate(round_order(order, r)):
                stages = runners[index].run(config.seed)
                rows.append({
                    "artifact": KINDS[index], "folder": str(folders[index]), "round": r, "position": position,
                    "cache_interval": 1, "denoise_s": stages["denoise"], "end_to_end_s": stages["total"],
                })  # fmt: skip
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median denoise and end-to-end per folder, and with / without."""
    keys = ("denoise_s", "end_to_end_s")
    medians = {
        kind: {k: percentile([r[k] for r in rows if r["artifact"] == kind], 0.5) for k in keys} for kind in KINDS
    }
    ratio = {key: medians[KINDS[0]][key] / medians[KINDS[1]][key] for key in keys}
    by_round = {(r["artifact"], r["round"]): r["denoise_s"] for r in rows}
    rounds = sorted({r["round"] for r in rows})
    per_round = [by_round[(KINDS[0], k)] / by_round[(KINDS[1], k)] for k in rounds]
    return {"medians": medians, "with_over_without": ratio, "denoise_per_round": per_round}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("with_cache", type=Path, help="artifact folder exported with step caching")
    parser.add_argument("without", type=Path, help="the same model exported without")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        check_pair(args.with_cache, args.without)
        profile = read_manifest(args.with_cache).profile
        config = BenchConfig(source=str(args.with_cache), backends=("onnxruntime",), height=profile.opt_height,
                             width=profile.opt_width, steps=args.steps, guidance=args.cfg, runs=args.runs,
                             warmup=args.warmup, scheduler=args.scheduler, device="cpu")  # fmt: skip
        rows = measure((args.with_cache, args.without), config)
    except SdtrtError as error:
        raise SystemExit(f"error: {error}") from None
    summary = summarize(rows)
    print(f"{config.width}x{config.height}, {config.steps} steps, CFG {config.guidance:g}, {config.runs} rounds")
    for kind in KINDS:
        m = summary["medians"][kind]
        print(f"{kind:<16} denoise {m['denoise_s'] * 1e3:8.0f} ms   end-to-end {m['end_to_end_s'] * 1e3:8.0f} ms")
    ratio = summary["with_over_without"]
    rounds = ", ".join(f"{v:.3f}" for v in summary["denoise_per_round"])
    print(f"with / without: denoise {ratio['denoise_s']:.3f}x (per round {rounds}), end-to-end "
          f"{ratio['end_to_end_s']:.3f}x")  # fmt: skip
    if args.json:
        write_record(args.json, "step_cache_overhead", config.record(), rows, summary)


if __name__ == "__main__":
    main()
