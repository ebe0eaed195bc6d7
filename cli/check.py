"""``sdtrt check``: check an artifact or engine folder and print the rows, the report and one verdict line.

What a check means lives in ``sdtrt.export.folder_check``; this command wires in the demo ``shapes`` model's own
report settings and prompt-adherence step when the folder holds that model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

if TYPE_CHECKING:
    from sdtrt.export.folder_check import CheckOutcome, CheckReport


@click.command("check")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the rows as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--reference",
    "references",
    multiple=True,
    type=click.Path(path_type=Path),
    help="int8/fp8 artifacts: the fp32 (and fp16) artifact to compare with; repeatable "
    "(default: the artifact it was calibrated from).",
)
@click.option(
    "--report-json",
    type=click.Path(path_type=Path),
    help="int8/fp8 or shapes artifacts: write the quality or prompt-adherence report here.",
)
@click.option(
    "--prompts",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="shapes artifacts: held-out prompts generated for the prompt-adherence check (0 skips it).",
)
def check_cmd(
    artifacts: Path,
    json_path: Path | None,
    seed: int,
    references: tuple[Path, ...],
    report_json: Path | None,
    prompts: int,
) -> None:
    """Run each ONNX component with ONNX Runtime and compare it with the PyTorch model it came from.

    An int8/fp8 UNet is judged by the quality report instead (per-step error against the float artifacts on
    held-out prompts, and image PSNR): on random inputs outside its calibrated ranges the comparison says little.
    A float artifact of the trained ``shapes`` model also generates held-out prompts and is scored on what its
    images show, next to PyTorch on the same prompts and seeds.

    An engine folder (from ``sdtrt build``) is checked engine by engine instead: TensorRT against ONNX Runtime on
    the ONNX file each engine was built from, at the engine profile's min, opt and max shapes (needs TensorRT and
    an NVIDIA GPU).
    """
    from sdtrt.calibrate.measure import quality_report
    from sdtrt.cli.progress import progress_line
    from sdtrt.export.check import format_table
    from sdtrt.export.folder_check import CheckOptions, check_folder
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.shapes.report import is_shapes, quality_config

    shapes = is_shapes(read_manifest(artifacts).source)
    options = CheckOptions(
        seed=seed,
        quality=partial(
            quality_report, references=references, config=quality_config(prompts) if shapes and prompts else None
        ),
        adherence=shapes_adherence(prompts) if shapes and prompts > 0 else None,
    )
    outcome = check_folder(artifacts, options, notify=lambda note: click.echo(note, err=True), progress=progress_line())
    click.echo(format_table(list(outcome.rows)))
    if json_path:
        json_path.write_text(outcome.rows_json())
    if outcome.report is not None:
        click.echo(format_report_text(outcome))
        if report_json:
            outcome.save_report(report_json)
    if not outcome.passed:
        click.echo(outcome.summary, err=True)
        sys.exit(1)
    click.echo(outcome.summary)


def shapes_adherence(prompts: int) -> Callable[..., CheckReport]:
    """The prompt-adherence step of a float ``shapes`` artifact: ``prompts`` held-out prompts against PyTorch."""
    from sdtrt.shapes.report import adherence_report

    return lambda folder, progress=None: adherence_report(folder, prompts=prompts, progress=progress)


def format_report_text(outcome: CheckOutcome) -> str:
    """The report beside the rows, as lines for a terminal."""
    if outcome.kind == "quantized":
        from sdtrt.calibrate.report import QualityReport, format_report

        return format_report(cast(QualityReport, outcome.report))
    from sdtrt.shapes.report import AdherenceReport, format_adherence

    return format_adherence(cast(AdherenceReport, outcome.report))
