"""The ``sdtrt`` command line. Each command: options -> config dataclass -> one library call -> printed result."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from sdtrt.runtime.errors import SdtrtError

log = logging.getLogger("sdtrt")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '768x512' (width x height) -> (512, 768) as (height, width)."""
    if text is None:
        return None
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise click.BadParameter(f"expected N or WIDTHxHEIGHT in pixels (e.g. 512 or 768x512), got {text!r}") from None


class SdtrtGroup(click.Group):
    """Turns library errors into one line on stderr and exit code 1 (a traceback only with -v)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SdtrtError as exc:
            if logging.getLogger().level <= logging.DEBUG:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=SdtrtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output; -vv shows debug logs and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="sdtrt")
def main(verbose: int, quiet: bool) -> None:
    """Export Stable Diffusion to ONNX / TensorRT and run it fast."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    if verbose < 2:
        for noisy in ("polygraphy", "onnx_graphsurgeon", "diffusers", "transformers", "torch"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if level > logging.DEBUG:
        import warnings

        warnings.filterwarnings("ignore")


@main.command("export")
@click.argument("source")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True)
@click.option(
    "--components",
    default="text_encoder,unet,vae_decoder,vae_encoder",
    show_default=True,
    help="Comma-separated components to export.",
)
@click.option("--min-size", help="Smallest image size, N or WxH pixels (default: model dependent).")
@click.option("--opt-size", help="Size engines are tuned for, N or WxH.")
@click.option("--max-size", help="Largest image size, N or WxH.")
@click.option("--max-batch", type=int, default=4, show_default=True, help="Most images per call.")
@click.option(
    "--max-prompt-windows",
    type=int,
    default=1,
    show_default=True,
    help="75-token prompt windows engines accept (long prompts).",
)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option(
    "--config-dir",
    "config_dir",
    type=click.Path(path_type=Path),
    help="diffusers-layout config folder for a single-file checkpoint (default: SD 1.5).",
)
@click.option("--allow-pickle", is_flag=True, help="Load pickle checkpoints (.ckpt/.bin/.pt): they can run code.")
def export_cmd(
    source: str,
    out: Path,
    precision: str,
    components: str,
    min_size: str | None,
    opt_size: str | None,
    max_size: str | None,
    max_batch: int,
    max_prompt_windows: int,
    opset: int,
    config_dir: Path | None,
    allow_pickle: bool,
) -> None:
    """Export SOURCE (a preset, a diffusers folder or a .safetensors checkpoint) to an ONNX artifact folder."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile, make_profile
    from sdtrt.runtime.models.sources import load_source

    start = time.perf_counter()
    click.echo(f"loading {source} ...", err=True)
    bundle = load_source(source, allow_pickle=allow_pickle, config_dir=config_dir)
    base = default_profile(bundle)
    profile = make_profile(
        base, parse_size(min_size), parse_size(opt_size), parse_size(max_size), max_batch, max_prompt_windows
    )
    options = ExportOptions(
        profile=profile,
        precision=precision,
        components=tuple(c.strip() for c in components.split(",") if c.strip()),
        opset=opset,
    )

    def progress(name: str, index: int, total: int, seconds: float) -> None:
        if seconds < 0:
            click.echo(f"[{index + 1}/{total}] exporting {name} ({precision}) ...", err=True)
        else:
            click.echo(f"[{index + 1}/{total}] {name} done in {seconds:.1f} s", err=True)

    manifest = export_artifacts(bundle, out, options, progress=progress, consume=True)
    click.echo(f"exported {bundle.source['description']} to {out} in {time.perf_counter() - start:.1f} s")
    click.echo(f"  profile {profile.id}, precision {precision}")
    for entry in manifest.components.values():
        files = [entry.file] + ([entry.data_file] if entry.data_file else [])
        size = sum((out / f).stat().st_size for f in files)
        click.echo(f"  {entry.file:<20} {size / 2**20:9.1f} MiB")


@main.command("check")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the rows as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
def check_cmd(artifacts: Path, json_path: Path | None, seed: int) -> None:
    """Run each ONNX component with ONNX Runtime and compare it with the PyTorch model it came from."""
    from dataclasses import asdict

    from sdtrt.export.check import check_artifacts, format_table

    rows = check_artifacts(artifacts, seed=seed)
    click.echo(format_table(rows))
    if json_path:
        json_path.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in rows], indent=2))
    failed = [r for r in rows if not r.passed]
    if failed:
        click.echo(f"{len(failed)} of {len(rows)} checks failed", err=True)
        sys.exit(1)
    click.echo(f"all {len(rows)} checks passed")


if __name__ == "__main__":
    main()
