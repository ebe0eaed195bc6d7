"""``sdtrt calibrate``: quantize an artifact's UNet to int8 or fp8 into a new artifact folder."""

from __future__ import annotations

import time
from pathlib import Path

import click

from sdtrt.cli.options import parse_size, split_list


@click.command("calibrate")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["int8", "fp8"]), required=True)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="Prompt file, one per line (default: the built-in set).",
)
@click.option("--samples", type=int, default=32, show_default=True, help="Prompts calibrated on, one trajectory each.")
@click.option("--steps", type=int, default=4, show_default=True, help="UNet calls recorded per trajectory.")
@click.option("--trajectory-steps", type=int, default=20, show_default=True, help="Denoising steps per trajectory.")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Folder to write (default: ARTIFACTS-PRECISION).")
@click.option("--backend", default="onnxruntime", show_default=True, help="Backend that runs the trajectories.")
@click.option("--device", help="cpu or cuda (default: cuda when the backend can use it).")
@click.option("--size", help="WIDTHxHEIGHT in pixels (default: the artifact's tuned size).")
@click.option("--op-types", default="Conv,MatMul,Gemm", show_default=True, help="Op types to quantize.")
@click.option("--save-data", type=click.Path(path_type=Path), help="Also write the calibration data (.npz) here.")
def calibrate_cmd(
    artifacts: Path,
    precision: str,
    prompts_file: Path | None,
    samples: int,
    steps: int,
    trajectory_steps: int,
    out: Path | None,
    backend: str,
    device: str | None,
    size: str | None,
    op_types: str,
    save_data: Path | None,
) -> None:
    """Quantize the UNet of ARTIFACTS to int8 or fp8 (explicit Q/DQ) into a new artifact folder."""
    from sdtrt.calibrate.artifacts import CalibrateRequest, calibrate_artifacts
    from sdtrt.calibrate.capture import CaptureConfig
    from sdtrt.calibrate.quantize import QuantizeConfig
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.shapes.report import calibration_config, is_shapes

    hw = parse_size(size)
    out = out or artifacts.with_name(f"{artifacts.name}-{precision}")
    request = CalibrateRequest(
        capture=CaptureConfig(
            samples=samples,
            steps=steps,
            trajectory_steps=trajectory_steps,
            height=hw[0] if hw else None,
            width=hw[1] if hw else None,
        ),
        quantize=QuantizeConfig(precision, op_types=split_list(op_types)),
        prompts_file=str(prompts_file) if prompts_file else None,
        backend=backend,
        device=device,
        save_data=str(save_data) if save_data else None,
    )
    if is_shapes(read_manifest(artifacts).source):
        request = calibration_config(request)

    def progress(phase: str, done: int, total: int) -> None:
        click.echo(f"\r{phase} {done}/{total}", err=True, nl=done >= total)

    start = time.perf_counter()
    manifest = calibrate_artifacts(artifacts, out, request, progress=progress)
    extra = manifest.components["unet"].extra
    quant, calib = extra["quantization"], extra["calibration"]
    click.echo(f"{precision} UNet written to {out} in {time.perf_counter() - start:.1f} s")
    click.echo(
        f"  {quant['quantized_nodes']} nodes quantized, {len(quant['excluded_nodes'])} kept in "
        f"{quant['unquantized_dtype']}; calibration: {calib['samples']} prompts x {calib['steps']} steps at "
        f"{calib['size']}, data sha256 {calib['data_sha256'][:16]}"
    )
    click.echo(f"  next: sdtrt check {out} --reference {artifacts}")
