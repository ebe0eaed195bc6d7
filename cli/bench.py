"""``sdtrt bench``: time a model on several backends side by side and print (and save) the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtrt.cli.control import control_options, read_controls
from sdtrt.cli.options import parse_size, split_list, writable_folder

if TYPE_CHECKING:
    from sdtrt.benchmarks.config import BenchConfig

# benchmarks.config.BACKENDS lists all of them (it imports torch: not at start-up)
DEFAULT_BACKENDS = "diffusers,torch,onnxruntime"


@click.command("bench")
@click.argument("source")
@click.option(
    "--backends",
    help="Comma-separated: diffusers, diffusers-compile, torch, torch-graph, onnxruntime, tensorrt (default: "
    f"{DEFAULT_BACKENDS}; with --control, the backend of the --artifacts folder).",
)
@click.option(
    "--size", help="WIDTHxHEIGHT in pixels (default: the model's native size: 512 for SD 1.5, 1024 for SDXL)."
)
@click.option("--steps", type=int, default=30, show_default=True)
@click.option(
    "--cfg", "guidance", type=float, help="Guidance scale (default: the model's own where it names one, else 7.5)."
)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16"]),  # benchmarks.config.PRECISIONS (imports torch: not at start-up)
    default="auto",
    show_default=True,
    help="auto: what every backend runs alike, fp32 on a CPU and fp16 on CUDA. fp16 on a CPU applies to ONNX "
    "Runtime only (the PyTorch backends run fp32), and the table marks the mixed rows.",
)
@click.option("--scheduler", help="Sampler (default: the one the model's scheduler config names).")
@click.option("--runs", type=int, default=10, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", help="cpu or cuda (default: cuda when available).")
@click.option(
    "--artifacts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Existing artifact or engine folder for the sdtrt backends (default: export one now, untimed).",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Run each backend's runs in one block, one backend open at a time (for models too big to hold twice); "
    "the default opens every backend and interleaves the runs, rotating the order each round.",
)
@click.option(
    "--cache-interval",
    "cache_interval",
    default="1",
    show_default=True,
    help="Step caching: also run every sdtrt backend with a full UNet step every N steps (shallow ones between), "
    "interleaved with its uncached runs, as rows of their own; several as N,M,... (1: uncached only).",
)
@click.option(
    "--cache-schedule",
    default="uniform",
    show_default=True,
    help="Where the full steps of a cached run fall: uniform (every N) or quadratic (DeepCache's, denser early).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the JSON rows here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG chart here.")
@control_options
def bench_cmd(
    source: str,
    backends: str | None,
    size: str | None,
    steps: int,
    guidance: float | None,
    batch: int,
    precision: str,
    scheduler: str | None,
    runs: int,
    warmup: int,
    seed: int,
    device: str | None,
    artifacts: Path | None,
    sequential: bool,
    cache_interval: str,
    cache_schedule: str,
    json_path: Path | None,
    plot_path: Path | None,
    controls: tuple[str, ...],
    preprocess: tuple[str, ...],
    resize: tuple[str, ...],
    canny_low: int,
    canny_high: int,
    guess_mode: bool,
) -> None:
    """Time SOURCE on several backends side by side: same weights, seed and sampler, one process, runs interleaved.

    With --control, the sdtrt backends run the ControlNets of the --artifacts folder in every run."""
    from sdtrt.benchmarks.config import BenchConfig, model_defaults
    from sdtrt.benchmarks.harness import run_benchmark

    control_inputs = read_controls(controls, preprocess, resize, canny_low, canny_high, guess_mode)
    if backends is None:
        backends = artifact_backend(artifacts) if control_inputs and artifacts else DEFAULT_BACKENDS
    defaults = model_defaults(source)
    hw = parse_size(size or f"{defaults.size}x{defaults.size}")
    assert hw is not None
    config = BenchConfig(
        source=source,
        backends=split_list(backends),
        height=hw[0],
        width=hw[1],
        steps=steps,
        guidance=defaults.guidance if guidance is None else guidance,
        batch=batch,
        precision=precision,
        runs=runs,
        warmup=warmup,
        seed=seed,
        scheduler=scheduler or defaults.scheduler,
        device=device,
        artifacts=str(artifacts) if artifacts else None,
        sequential=sequential,
        controls=tuple(control_inputs),
        cache_intervals=parse_intervals(cache_interval),
        cache_schedule=cache_schedule,
    )
    for path, what in ((json_path, "the JSON rows"), (plot_path, "the chart")):
        if path:
            writable_folder(path.parent, what)
    rows = run_benchmark(config, progress=lambda message: click.echo(message, err=True))
    show_results(config, rows, json_path, plot_path)


def parse_intervals(text: str) -> tuple[int, ...]:
    """'3' or '2,3,5' -> the cache intervals; a value that is not a whole number is a one-line ``ConfigError``."""
    from sdtrt.runtime.errors import ConfigError

    values = split_list(text)
    if not values:
        raise ConfigError("--cache-interval needs a whole number >= 1 (or several as N,M,...), got nothing")
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(
            f"--cache-interval must be whole numbers >= 1 (1: no caching), e.g. 3 or 2,3,5; got {text!r}"
        ) from None


def show_results(
    config: BenchConfig, rows: list[dict[str, Any]], json_path: Path | None, plot_path: Path | None
) -> None:
    """Write the JSON rows and the chart where asked, then print the settings line and the summary table."""
    from sdtrt.benchmarks.report import format_table, plot, precision_note, summarize
    from sdtrt.runtime.files import write_text_atomic

    summaries = summarize(rows)
    controls = config.record()["controls"]
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "rows": rows,
            "summary": summaries,
            "mixed_precision": precision_note(summaries) is not None,
            "controls": controls,
        }
        write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")
    setting = (
        f"{config.source} {config.width}x{config.height}, {config.steps} steps, CFG {config.guidance:g}, "
        f"batch {config.batch}"
    )
    if plot_path:
        plot(summaries, plot_path, setting)
    env = rows[0]["env"]
    machine = env.get("gpu") or f"{env['cpu']} ({env['cpus']} cpus)"
    order = "sequential blocks" if config.sequential else "interleaved"
    click.echo(f"{setting}, {config.scheduler}, {config.precision}: {precisions(summaries)}, {machine}, {order}")
    if controls:
        click.echo("ControlNets: " + "; ".join(describe_control(c) for c in controls))
    click.echo(format_table(summaries))


def describe_control(setting: dict[str, Any]) -> str:
    """One control's settings as the table's header line gives them."""
    text = f"{setting['name']} x{setting['scale']:g}, steps {setting['start']:g}-{setting['end']:g}"
    text += f", {setting['preprocess']}, {setting['resize_mode']}"
    return text + (", guess mode" if setting["guess_mode"] else "")


def artifact_backend(folder: Path) -> str:
    """The backend that runs the artifact ``folder``: ONNX Runtime for ONNX files, TensorRT for engines."""
    from sdtrt.runtime.manifest import read_manifest

    kind = read_manifest(folder).kind
    return {"onnx": "onnxruntime", "tensorrt": "tensorrt"}.get(kind, "torch")


def precisions(summaries: list[dict[str, Any]]) -> str:
    """The precision every row ran, or each row's when they differ."""
    found = list(dict.fromkeys(s["precision"] for s in summaries))
    if len(found) == 1:
        return found[0]
    return "mixed (" + ", ".join(f"{s['backend']} {s['precision']}" for s in summaries) + ")"
