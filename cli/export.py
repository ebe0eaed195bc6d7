"""``sdtrt export`` and ``sdtrt build``: a model source to an ONNX artifact folder, and that to TensorRT engines."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sdtrt.export.build import ProfileRequest
    from sdtrt.export.controlnet import ControlNetArg
    from sdtrt.runtime.manifest import Manifest
    from sdtrt.runtime.profile import ShapeProfile

from sdtrt.cli.options import parse_size, split_list
from sdtrt.runtime.specs import DEFAULT_CACHE_BRANCH


@click.command("export")
@click.argument("source")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    metavar="[NAME=]PATH",
    help="A ControlNet to export with the model (diffusers folder, .safetensors in diffusers or original layout, "
    "or a shipped one such as shapes-outline), named NAME or after its folder/file; repeatable.",
)
@click.option(
    "--into",
    type=click.Path(path_type=Path),
    help="Add the ControlNet SOURCE ([NAME=]PATH) to this existing ONNX artifact; its UNet is not re-exported.",
)
@click.option(
    "--controlnet-config",
    type=click.Path(path_type=Path),
    help="Single-file ControlNets whose architecture is not their family's standard one: a folder with their "
    "diffusers config.json (or a shipped one: controlnet-sd15, controlnet-sd21, controlnet-sdxl).",
)
@click.option(
    "--plain-unet",
    is_flag=True,
    help="Export a UNet without ControlNet inputs (by default the UNet takes them, zeros when none runs).",
)
@click.option(
    "--step-cache/--no-step-cache",
    default=True,
    show_default=True,
    help="Also export the shallow UNet (unet_shallow) that step caching (--cache-interval) runs between full "
    "steps, and the feature it needs as a second UNet output.",
)
@click.option(
    "--cache-branch",
    type=int,
    default=DEFAULT_CACHE_BRANCH,
    show_default=True,
    help="Skip branch of the shallow UNet: it recomputes the first K+1 skip connections (DeepCache's branch id "
    "for SD 1.x/2.x and SDXL); 0 caches the most and is the fastest.",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True)
@click.option(
    "--components",
    help="Comma-separated components to export (default: all the model has: text_encoder[,text_encoder_2],"
    "unet,vae_decoder,vae_encoder).",
)
@click.option(
    "--vae-precision",
    type=click.Choice(["auto", "fp32", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: as --precision, except SDXL's VAE (it overflows in fp16) stays fp32 unless its config marks it "
    "fp16-safe (force_upcast false, as the fp16-fix VAE does).",
)
@click.option("--min-size", help="Smallest image size, N or WxH pixels (default: model dependent).")
@click.option("--opt-size", help="Size engines are tuned for, N or WxH.")
@click.option("--max-size", help="Largest image size, N or WxH.")
@click.option("--max-batch", type=int, default=4, show_default=True, help="Most images per call.")
@click.option(
    "--max-prompt-windows",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="75-token prompt windows engines accept (long prompts); tokens beyond are dropped with a warning.",
)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option(
    "--config-dir",
    "config_dir",
    type=click.Path(path_type=Path),
    help="Single-file checkpoints: a shipped config (sd15, sdxl, sdxl-turbo) or a diffusers-layout config "
    "folder (default: sd15, or sdxl for SDXL checkpoints).",
)
@click.option("--allow-pickle", is_flag=True, help="Load pickle checkpoints (.ckpt/.bin/.pt): they can run code.")
def export_cmd(
    source: str,
    out: Path,
    precision: str,
    components: str | None,
    vae_precision: str,
    min_size: str | None,
    opt_size: str | None,
    max_size: str | None,
    max_batch: int,
    max_prompt_windows: int,
    opset: int,
    config_dir: Path | None,
    allow_pickle: bool,
    controlnets: tuple[str, ...],
    into: Path | None,
    controlnet_config: Path | None,
    plain_unet: bool,
    step_cache: bool,
    cache_branch: int,
) -> None:
    """Export SOURCE (a preset, a diffusers folder or a .safetensors checkpoint) to an ONNX artifact folder;
    with --into, add the ControlNet SOURCE to an existing artifact."""
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile, make_profile, outside_size_range
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.specs import COMPONENTS

    start = time.perf_counter()
    check_destination(out, into, controlnets, plain_unet)
    if into is not None:
        add_into(into, ControlNetArg.parse(source), allow_pickle, controlnet_config)
        return
    assert out is not None
    click.echo(f"loading {source} ...", err=True)
    bundle = load_source(source, allow_pickle=allow_pickle, config_dir=config_dir)
    args = [ControlNetArg.parse(c) for c in controlnets]
    extra = load_controlnets(args, bundle.model, allow_pickle=allow_pickle, config_dir=controlnet_config)
    base = default_profile(bundle)
    profile = make_profile(
        base, parse_size(min_size), parse_size(opt_size), parse_size(max_size), max_batch, max_prompt_windows
    )
    warning = outside_size_range(bundle, profile)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    options = ExportOptions(
        profile=profile,
        precision=precision,
        components=split_list(components) if components else COMPONENTS,
        opset=opset,
        vae_precision=vae_precision,
        control_ready=not plain_unet,
        step_cache=step_cache,
        cache_branch=cache_branch,
    )

    manifest = export_artifacts(
        bundle, out, options, progress=partial(step_line, precision), consume=True, controlnets=extra
    )
    click.echo(f"exported {bundle.source['description']} to {out} in {time.perf_counter() - start:.1f} s")
    click.echo(f"  profile {profile.id}, precision {precision}")
    for entry in manifest.components.values():
        files = [entry.file] + ([entry.data_file] if entry.data_file else [])
        size = sum((out / f).stat().st_size for f in files)
        click.echo(f"  {entry.file:<20} {size / 2**20:9.1f} MiB  {entry.precision}")


def step_line(precision: str, name: str, index: int, total: int, seconds: float) -> None:
    """Export progress on stderr: a line as each component starts and one as it ends."""
    if seconds < 0:
        click.echo(f"[{index + 1}/{total}] exporting {name} ({precision}) ...", err=True)
    else:
        click.echo(f"[{index + 1}/{total}] {name} done in {seconds:.1f} s", err=True)


def check_destination(out: Path | None, into: Path | None, controlnets: tuple[str, ...], plain_unet: bool) -> None:
    """Usage errors of the --out / --into / --controlnet / --plain-unet combination."""
    if into is not None and (out is not None or controlnets):
        raise click.UsageError("--into adds the ControlNet SOURCE to an artifact: leave out --out and --controlnet")
    if into is None and out is None:
        raise click.UsageError("give --out FOLDER (a new artifact) or --into FOLDER (add a ControlNet to one)")
    if plain_unet and controlnets:
        raise click.UsageError("ControlNets need a UNet that takes their residuals: leave out --plain-unet")


def add_into(folder: Path, controlnet: ControlNetArg, allow_pickle: bool, config_dir: Path | None) -> None:
    """``sdtrt export CONTROLNET --into FOLDER``."""
    from sdtrt.export.controlnet import add_controlnets

    start = time.perf_counter()

    def progress(name: str, index: int, total: int, seconds: float) -> None:
        if seconds < 0:
            click.echo(f"exporting {name} ...", err=True)

    before = set(read_names(folder))
    manifest = add_controlnets(
        folder, [controlnet], allow_pickle=allow_pickle, config_dir=config_dir, progress=progress
    )
    for name, component in manifest.controlnets.items():
        if name not in before:
            entry = manifest.components[component]
            click.echo(
                f"added ControlNet {name} ({entry.file}, {entry.precision}) to {folder} in "
                f"{time.perf_counter() - start:.1f} s"
            )


def read_names(folder: Path) -> list[str]:
    from sdtrt.runtime.manifest import read_manifest

    return list(read_manifest(folder).controlnets)


@click.command("build")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write.")
@click.option("--static", "static_size", help="One image size, N or WxH: the fastest engines, for that size only.")
@click.option("--dynamic", is_flag=True, help="A range of sizes from --min-size/--opt-size/--max-size.")
@click.option("--min-size", help="Smallest image size, N or WxH (default: the artifact's).")
@click.option("--opt-size", help="Size the engines are tuned for, N or WxH.")
@click.option("--max-size", help="Largest image size, N or WxH.")
@click.option("--batch", type=int, help="Images per call, one value (min = opt = max).")
@click.option("--min-batch", type=int, help="Fewest images per call (default: the artifact's).")
@click.option("--opt-batch", type=int, help="Images per call the engines are tuned for.")
@click.option("--max-batch", type=int, help="Most images per call.")
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kernel timing file, read if present and updated: speeds up later builds on this GPU.",
)
@click.option("--opt-level", type=int, default=3, show_default=True, help="Builder optimization level, 0-5.")
@click.option("--refittable", is_flag=True, help="Build engines whose weights can be replaced later.")
@click.option("--workspace-gib", type=float, help="Cap on TensorRT's scratch memory, GiB (default: TensorRT's).")
@click.option(
    "--components",
    help="Comma-separated components to build, e.g. unet,controlnet_canny "
    "(default: every component the artifact has, its ControlNets included).",
)
def build_cmd(
    artifacts: Path,
    out: Path,
    static_size: str | None,
    dynamic: bool,
    min_size: str | None,
    opt_size: str | None,
    max_size: str | None,
    batch: int | None,
    min_batch: int | None,
    opt_batch: int | None,
    max_batch: int | None,
    timing_cache: Path | None,
    opt_level: int,
    refittable: bool,
    workspace_gib: float | None,
    components: str | None,
) -> None:
    """Build TensorRT engines from the ONNX artifact folder ARTIFACTS into the engine folder OUT.

    Building into an engine folder again keeps every engine built from the same ONNX file, profile, TensorRT and
    GPU: after adding a ControlNet to ARTIFACTS, only the ControlNet's engine is built.
    """
    from sdtrt.export.build import ProfileRequest, TensorRTBuildOptions, build_engines

    request = ProfileRequest(
        static_size=parse_size(static_size),
        dynamic=dynamic,
        min_size=parse_size(min_size),
        opt_size=parse_size(opt_size),
        max_size=parse_size(max_size),
        batch=batch,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
    )
    options = TensorRTBuildOptions(
        opt_level=opt_level,
        timing_cache=timing_cache,
        refittable=refittable,
        workspace_gib=workspace_gib,
        components=split_list(components) if components is not None else None,
    )
    events: dict[str, str] = {}

    def progress(component: str, event: str) -> None:
        events[component] = event
        if event == "building":
            click.echo(f"building {component} ...", err=True)

    start = time.perf_counter()
    manifest = build_engines(artifacts, out, engine_profile(request, artifacts, out), options, progress=progress)
    show_engines(manifest, out, events, time.perf_counter() - start)


def engine_profile(request: ProfileRequest, artifacts: Path, out: Path) -> ShapeProfile | None:
    """The shapes asked for; else those of the engines already in ``out`` (said on stderr), so building into it
    again keeps them; else None, the artifact's own."""
    from sdtrt.export.build import existing_profile, resolve_profile
    from sdtrt.runtime.manifest import read_manifest

    source_profile = read_manifest(artifacts).profile
    profile = resolve_profile(request, source_profile)
    if profile is None and (profile := existing_profile(out, source_profile)) is not None:
        click.echo(
            f"keeping the profile of the engines in {out}: {profile.id} (ask for other shapes with --static, "
            "--dynamic or the batch options)",
            err=True,
        )
    return profile


def show_engines(manifest: Manifest, out: Path, events: dict[str, str], seconds: float) -> None:
    """What ``sdtrt build`` made: one line per engine, built now or kept from an earlier build."""
    click.echo(f"TensorRT {manifest.versions.get('tensorrt')} engines in {out} ({seconds:.1f} s)")
    click.echo(f"  profile {manifest.profile.id}")
    for name, entry in manifest.components.items():
        extra = entry.extra
        peak = extra.get("peak_device_memory")
        took = f"{extra.get('build_seconds', 0):.1f} s"
        state = f"built in {took}" if events.get(name) == "built" else f"kept (built earlier in {took})"
        click.echo(
            f"  {entry.file:<22} {(out / entry.file).stat().st_size / 2**20:9.1f} MiB  {state}, peak build memory "
            + ("n/a" if peak is None else f"{peak / 2**20:.0f} MiB")
            + f", activations {extra.get('device_memory_size', 0) / 2**20:.1f} MiB"
        )
    kept = [name for name in manifest.components if events.get(name) != "built"]
    if kept:
        click.echo(
            f"  kept {len(kept)} engine(s) built earlier from the same ONNX files and profile: {', '.join(kept)}"
        )
