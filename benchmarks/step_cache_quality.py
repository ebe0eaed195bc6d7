"""What step caching costs in quality on the ``shapes`` model: prompt accuracy and image PSNR against uncached.

    python -m sdtrt.benchmarks.step_cache_quality --out out/step-cache-quality [--count 16] [--json FILE]

Three parts, all on ONNX Runtime (CPU), on the held-out prompts and seeds of ``shapes.evaluate`` (prompt ``i``
from seed ``1000 + i``), so every cached row is image-for-image comparable with its uncached row:

    grid      per precision and step count: uncached (N = 1), then every interval and schedule; accuracy per
              aspect and PSNR against the uncached images (artifact exported at the default skip branch)
    branches  one artifact per skip branch, N = 3: the time of a full and of a shallow step and the quality,
              to choose the default branch by measurement
    control   the ``shapes-outline`` ControlNet uncached and cached (its residuals are not recomputed on shallow
              steps): the control score of ``shapes.control_score`` and the PSNR between the two
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INTERVALS = (2, 3, 5)
BRANCH_INTERVAL = 3
CONTROL_NAME = "outline"


@dataclass(frozen=True)
class QualityConfig:
    """What to measure. ``branches`` None: every skip branch the model has; empty: skip that part."""

    out: Path
    model: str = "shapes"
    count: int = 16
    steps: tuple[int, ...] = (20, 50)
    precisions: tuple[str, ...] = ("fp32", "fp16")
    intervals: tuple[int, ...] = INTERVALS
    schedules: tuple[str, ...] = ("uniform", "quadratic")
    branches: tuple[int, ...] | None = None
    branch_steps: int = 20
    control_count: int = 0  # held-out (prompt, hint) pairs for the ControlNet part; 0 skips it
    guidance: float = 2.0

    def __post_init__(self) -> None:
        from sdtrt.runtime.cache_plan import check_cache_args

        if self.count < 1 or self.control_count < 0 or any(s < 2 for s in (*self.steps, self.branch_steps)):
            raise ValueError(
                f"count must be >= 1, control_count >= 0 and steps >= 2, got {self.count}, {self.control_count}, "
                f"{self.steps}"
            )
        for interval in self.intervals:
            for schedule in self.schedules:
                check_cache_args(interval, schedule)
        bad = [p for p in self.precisions if p not in ("fp32", "fp16")]
        if bad:
            raise ValueError(f"precisions must be fp32 or fp16, got {bad}")


@dataclass
class Run:
    """The images of one setting and, per image, the seconds of its full and of its shallow steps."""

    images: list[Any] = field(default_factory=list)
    full_s: list[float] = field(default_factory=list)
    shallow_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def step_ms(self) -> dict[str, float | None]:
        """Median milliseconds of a full and of a shallow step (None when there was none)."""

        def median(values: list[float]) -> float | None:
            return round(1000 * statistics.median(values), 2) if values else None

        return {"full_step_ms": median(self.full_s), "shallow_step_ms": median(self.shallow_s)}


def export_shapes(config: QualityConfig, precision: str, branch: int | None = None, control: bool = False) -> Path:
    """The model's artifact at ``precision``, step cache at ``branch`` (None: the default), optionally with the
    shipped outline ControlNet; exported once into ``config.out`` and reused."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.specs import DEFAULT_CACHE_BRANCH

    branch = DEFAULT_CACHE_BRANCH if branch is None else branch
    folder = config.out / f"{config.model}-{precision}-branch{branch}{'-control' if control else ''}"
    if (folder / "manifest.json").is_file():
        return folder
    bundle = load_source(config.model)
    controlnets: list[Any] = []
    if control:
        from sdtrt.export.controlnet import ControlNetArg, load_controlnets

        controlnets = load_controlnets([ControlNetArg("shapes-outline")], bundle.model)
    options = ExportOptions(profile=default_profile(bundle), precision=precision, cache_branch=branch)
    log.info("exporting %s", folder.name)
    export_artifacts(bundle, folder, options, controlnets=controlnets)
    return folder


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    interval: int,
    schedule: str,
    guidance: float = 2.0,
    controls: Sequence[Any] = (),
) -> Run:
    """One image per prompt with ``pipe`` at this cache setting (empty negative prompt, as shapes is evaluated);
    ``controls``, when given, holds one ``ControlInput`` per prompt."""
    from sdtrt.runtime.cache_plan import full_steps
    from sdtrt.shapes import data

    plan = full_steps(steps, 0, interval, schedule)
    run = Run()
    start = time.perf_counter()
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        result = pipe(
            prompt,
            negative_prompt="",
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            height=data.IMAGE_SIZE,
            width=data.IMAGE_SIZE,
            scheduler="euler",
            controls=[controls[i]] if controls else [],
            cache_interval=interval,
            cache_schedule=schedule,
        )
        run.images.append(result.images[0])
        run.full_s += [t for t, full in zip(result.times.steps, plan, strict=True) if full]
        run.shallow_s += [t for t, full in zip(result.times.steps, plan, strict=True) if not full]
    run.seconds = round(time.perf_counter() - start, 1)
    return run


def settings_of(config: QualityConfig) -> list[tuple[int, str]]:
    """(interval, schedule) of every grid row at one step count: uncached first."""
    return [(1, "uniform")] + [(n, s) for n in config.intervals for s in config.schedules]


def quality_row(run: Run, reference: Run | None, prompts: Sequence[str], **keys: Any) -> dict[str, Any]:
    """One JSON row: ``keys``, accuracy per aspect, PSNR against ``reference`` (None for the reference itself),
    the median full and shallow step and the seconds taken."""
    from sdtrt.shapes import score
    from sdtrt.shapes.evaluate import image_psnr

    row = dict(keys)
    row["accuracy"] = score.accuracy(run.images, list(prompts))
    row["psnr_db"] = None if reference is None else round(image_psnr(run.images, reference.images), 2)
    return row | run.step_ms() | {"seconds": run.seconds}


def measure_grid(config: QualityConfig) -> list[dict[str, Any]]:
    """Every precision x step count x (interval, schedule) on the default branch's artifact."""
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.shapes.evaluate import IMAGE_SEED, prompts

    captions = prompts(config.count)
    seeds = [IMAGE_SEED + i for i in range(config.count)]
    rows = []
    for precision in config.precisions:
        folder = export_shapes(config, precision)
        with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu") as pipe:
            for steps in config.steps:
                reference = None
                for interval, schedule in settings_of(config):
                    run = generate(pipe, captions, seeds, steps, interval, schedule, guidance=config.guidance)
                    keys = {"part": "grid", "precision": precision, "steps": steps}
                    rows.append(quality_row(run, reference, captions, **keys, interval=interval, schedule=schedule))
                    log.info("%s", _line(rows[-1]))
                    reference = reference or run
    return rows


def measure_branches(config: QualityConfig) -> list[dict[str, Any]]:
    """Per skip branch (fp32): uncached and N = 3 uniform, interleaved prompt by prompt so the step times compare."""
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.models.step_cache import skip_count
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.shapes.evaluate import IMAGE_SEED, prompts

    branches = config.branches
    if branches is None:
        branches = tuple(range(skip_count(load_source(config.model).unet)))
    captions = prompts(config.count)
    rows = []
    for branch in branches:
        folder = export_shapes(config, "fp32", branch)
        full, cached = Run(), Run()
        with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu") as pipe:
            for i, caption in enumerate(captions):
                for run, interval in ((full, 1), (cached, BRANCH_INTERVAL)):
                    one = generate(
                        pipe, [caption], [IMAGE_SEED + i], config.branch_steps, interval, "uniform", config.guidance
                    )
                    run.images += one.images
                    run.full_s += one.full_s
                    run.shallow_s += one.shallow_s
                    run.seconds += one.seconds
        keys = {"part": "branches", "precision": "fp32", "steps": config.branch_steps, "branch": branch}
        row = quality_row(cached, full, captions, **keys, interval=BRANCH_INTERVAL, schedule="uniform")
        row["uncached_full_step_ms"] = full.step_ms()["full_step_ms"]
        row["uncached_accuracy_all"] = quality_row(full, None, captions)["accuracy"]["all"]
        rows.append(row)
        log.info("%s", _line(row))
    return rows


def measure_control(config: QualityConfig) -> list[dict[str, Any]]:
    """The outline ControlNet at scale 1 (fp32, 20 steps), uncached and at each interval (uniform)."""
    from PIL import Image

    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.shapes import control_data
    from sdtrt.shapes.control_score import control_accuracy
    from sdtrt.shapes.evaluate import image_psnr
    from sdtrt.shapes.evaluate_control import GUIDANCE, IMAGE_SEED, STEPS

    examples = control_data.eval_examples(config.control_count)
    captions = [e.caption for e in examples]
    seeds = [IMAGE_SEED + i for i in range(len(examples))]
    hints = [Image.fromarray(control_data.hint_of(e.scene)) for e in examples]
    controls = [ControlInput(CONTROL_NAME, h, scale=1.0, resize_mode="just_resize") for h in hints]
    rows: list[dict[str, Any]] = []
    reference = None
    with Pipeline.from_artifacts(export_shapes(config, "fp32", control=True), backend="onnxruntime") as pipe:
        for interval in (1, *config.intervals):
            run = generate(pipe, captions, seeds, STEPS, interval, "uniform", controls=controls, guidance=GUIDANCE)
            row: dict[str, Any] = {"part": "control", "precision": "fp32", "steps": STEPS, "interval": interval}
            row["control"] = control_accuracy(run.images, examples)
            row["psnr_db"] = None if reference is None else round(image_psnr(run.images, reference.images), 2)
            rows.append(row | run.step_ms() | {"seconds": run.seconds})
            log.info("control N=%d: %s", interval, row["control"])
            reference = reference or run
    return rows


def measure(config: QualityConfig) -> list[dict[str, Any]]:
    """Every row of the three parts (grid, branches, control) that ``config`` asks for."""
    config.out.mkdir(parents=True, exist_ok=True)
    rows = measure_grid(config)
    if config.branches != ():
        rows += measure_branches(config)
    if config.control_count:
        rows += measure_control(config)
    return rows


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _line(row: dict[str, Any]) -> str:
    acc = row["accuracy"]
    psnr = "reference" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB"
    where = f"branch {row['branch']} " if "branch" in row else ""
    return (
        f"{row['precision']} {row['steps']} steps {where}N={row['interval']} {row['schedule']}: background "
        f"{_pct(acc['background'])} colour {_pct(acc['colour'])} class {_pct(acc['shape'])} all {_pct(acc['all'])}, "
        f"PSNR {psnr}, full/shallow step {row['full_step_ms']}/{row['shallow_step_ms']} ms"
    )


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of the rows: the grid, the branches and the ControlNet."""
    out = [
        "| precision | steps | N | schedule | background | colour | class | all | PSNR vs uncached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "grid"):
        a, psnr = r["accuracy"], "reference" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} dB"
        schedule = "(uncached)" if r["interval"] == 1 else r["schedule"]
        cells = [r["precision"], r["steps"], r["interval"], schedule]
        cells += [_pct(a[k]) for k in ("background", "colour", "shape", "all")] + [psnr]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    branches = [r for r in rows if r["part"] == "branches"]
    if branches:
        out += ["", "| branch | full step | shallow step | shallow / full | all (N=3) | all (N=1) | PSNR vs uncached |"]
        out.append("|---|---|---|---|---|---|---|")
        for r in branches:
            ratio = r["shallow_step_ms"] / r["uncached_full_step_ms"] if r["shallow_step_ms"] else float("nan")
            cells = [r["branch"], f"{r['uncached_full_step_ms']:.1f} ms", f"{r['shallow_step_ms']:.1f} ms"]
            cells += [f"{ratio:.2f}", _pct(r["accuracy"]["all"]), _pct(r["uncached_accuracy_all"])]
            out.append("| " + " | ".join(str(c) for c in cells + [f"{r['psnr_db']:.1f} dB"]) + " |")
    control = [r for r in rows if r["part"] == "control"]
    if control:
        out += [
            "",
            "| ControlNet, N | centroid within 8 px | mean IoU | colours | PSNR vs uncached |",
            "|---|---|---|---|---|",
        ]
        for r in control:
            c, psnr = r["control"], "reference" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} dB"
            cells = [r["interval"], _pct(c["centroid_within_8px"]), f"{c['mean_iou']:.3f}", _pct(c["colours"]), psnr]
            out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(out)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse(argv: Sequence[str] | None) -> tuple[QualityConfig, argparse.Namespace]:
    """The command line as a ``QualityConfig`` (exit 2 with one line on a bad setting) and the parsed arguments."""
    from sdtrt.runtime.errors import SdtrtError

    parser = argparse.ArgumentParser(
        prog="python -m sdtrt.benchmarks.step_cache_quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("out/step-cache-quality"), help="folder for the artifacts")
    parser.add_argument("--model", default="shapes", help="preset or folder (default: %(default)s)")
    parser.add_argument("--count", type=int, default=16, help="held-out prompts per row (default: %(default)s)")
    parser.add_argument("--steps", default="20,50", help="step counts, comma-separated (default: %(default)s)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--intervals", default="2,3,5", help="cache intervals > 1 (1 is always run)")
    parser.add_argument("--branches", default="all", help="skip branches to compare: all, none or e.g. 0,2,4")
    parser.add_argument("--branch-steps", type=int, default=20, help="steps of the branch comparison")
    parser.add_argument("--control-count", type=int, default=0, help="ControlNet pairs (0: skip that part)")
    parser.add_argument("--json", type=Path, help="write the rows and the run's metadata here")
    args = parser.parse_args(argv)
    try:
        branches = {"all": None, "none": ()}.get(args.branches, None)
        if args.branches not in ("all", "none"):
            branches = _ints(args.branches)
        config = QualityConfig(
            out=args.out,
            model=args.model,
            count=args.count,
            steps=_ints(args.steps),
            precisions=tuple(p for p in args.precisions.split(",") if p),
            intervals=_ints(args.intervals),
            branches=branches,
            branch_steps=args.branch_steps,
            control_count=args.control_count,
        )
    except (ValueError, SdtrtError) as exc:
        parser.error(str(exc))
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    rows = measure(config)
    meta = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m sdtrt.benchmarks.step_cache_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(format_tables(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
