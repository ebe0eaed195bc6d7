"""The ``sdtrt`` command line. Each command: options -> config dataclass -> one library call -> printed result."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
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
            size = int(h), int(w)
        else:
            size = int(text), int(text)
    except ValueError:
        raise click.BadParameter(f"expected N or WIDTHxHEIGHT in pixels (e.g. 512 or 768x512), got {text!r}") from None
    if min(size) <= 0:
        raise click.BadParameter(
            f"sizes must be positive pixel counts, got {text!r}; e.g. 1024x1024, or leave the option out for the "
            "model's own size"
        )
    return size


def parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    """'1024x768' (width x height) -> (768, 1024) as (height, width), the order diffusers takes; '0x0' allowed."""
    if text is None:
        return None
    try:
        w, h = text.lower().split("x")
        pair = int(h), int(w)
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT ({what}), e.g. 1024x1024, got {text!r}") from None
    if min(pair) < 0:
        raise click.BadParameter(f"{what} must be >= 0, got {text!r}")
    return pair


def writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and make sure it can be written, before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise click.UsageError(
            f"cannot write {what} to {str(folder)!r} ({exc.strerror}); choose a folder you can write to"
        ) from None


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
) -> None:
    """Export SOURCE (a preset, a diffusers folder or a .safetensors checkpoint) to an ONNX artifact folder."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile, make_profile
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.runtime.specs import COMPONENTS

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
        components=tuple(c.strip() for c in components.split(",") if c.strip()) if components else COMPONENTS,
        opset=opset,
        vae_precision=vae_precision,
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
        click.echo(f"  {entry.file:<20} {size / 2**20:9.1f} MiB  {entry.precision}")


@main.command("check")
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
    from dataclasses import asdict

    from sdtrt.export.check import check_artifacts, format_table
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.shapes.report import adherence_report, format_adherence, is_shapes

    manifest = read_manifest(artifacts)
    if manifest.kind == "tensorrt":
        from sdtrt.export.engine_check import check_engines

        engine_rows = check_engines(artifacts, seed=seed)
        click.echo(format_table(engine_rows))
        if json_path:
            json_path.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in engine_rows], indent=2))
        engine_failed = [r for r in engine_rows if not r.passed]
        if engine_failed:
            click.echo(f"{len(engine_failed)} of {len(engine_rows)} checks failed", err=True)
            sys.exit(1)
        click.echo(f"all {len(engine_rows)} checks passed (TensorRT vs ONNX Runtime)")
        return
    quantized = [n for n, e in manifest.components.items() if e.precision in ("int8", "fp8")]
    rows = [r for r in check_artifacts(artifacts, seed=seed) if r.component not in quantized]
    click.echo(format_table(rows))
    if json_path:
        json_path.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in rows], indent=2))
    failed = [r for r in rows if not r.passed]
    report_failed = False
    if quantized:
        from sdtrt.calibrate.report import ReportConfig, format_report, quality_report

        click.echo(f"{', '.join(quantized)}: quantized, measured by the quality report", err=True)
        config = ReportConfig.for_shapes(prompts) if is_shapes(manifest.source) and prompts else ReportConfig()
        report = quality_report(artifacts, references, config)
        click.echo(format_report(report))
        if report_json:
            report.save(report_json)
        report_failed = not report.passed
    elif is_shapes(manifest.source) and prompts > 0:
        adherence = adherence_report(artifacts, prompts=prompts)
        click.echo(format_adherence(adherence))
        if report_json:
            report_json.write_text(json.dumps(adherence.to_dict(), indent=2) + "\n")
        report_failed = not adherence.passed
    if failed or report_failed:
        what = f"{len(failed)} of {len(rows)} checks failed" if failed else "all checks passed"
        click.echo(what + (", quality report failed" if report_failed else ""), err=True)
        sys.exit(1)
    adhered = is_shapes(manifest.source) and prompts > 0
    extra = ", quality report passed" if quantized else ", prompt adherence passed" if adhered else ""
    click.echo(f"all {len(rows)} checks passed" + extra)


@main.command("calibrate")
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
        quantize=QuantizeConfig(precision, op_types=tuple(t.strip() for t in op_types.split(",") if t.strip())),
        prompts_file=str(prompts_file) if prompts_file else None,
        backend=backend,
        device=device,
        save_data=str(save_data) if save_data else None,
    )

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


@main.command("generate")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option(
    "--negative",
    help="Negative prompt (what to steer away from). SDXL models that say so get zero negative conditioning "
    "when it is left out, as diffusers does.",
)
@click.option("--steps", type=int, default=30, show_default=True)
@click.option(
    "--cfg", "guidance", type=float, default=7.5, show_default=True, help="Guidance scale; <= 1 turns CFG off."
)
@click.option("--seed", type=int, help="Seed of the first image (image k uses seed + k); random when omitted.")
@click.option("--size", help="WIDTHxHEIGHT in pixels (default: the artifact's tuned size).")
@click.option(
    "--scheduler",
    help="euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras or lcm (default: the sampler of the model's scheduler).",
)
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime, torch or tensorrt.")
@click.option("--device", help="cpu or cuda (default: cuda when the backend can use it).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="img2img source.")
@click.option("--strength", type=float, default=0.8, show_default=True, help="img2img: how much to change.")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("sdtrt.png"),
    show_default=True,
    help="PNG to write; with several images, NAME-0.png, NAME-1.png, ...",
)
@click.option("--preview-dir", type=click.Path(path_type=Path), help="Write a cheap latent preview per step here.")
@click.option("--original-size", help="SDXL: original size WIDTHxHEIGHT to condition on (default: the image size).")
@click.option("--crop", help="SDXL: crop top-left LEFTxTOP to condition on (default: 0x0).")
@click.option("--target-size", help="SDXL: target size WIDTHxHEIGHT to condition on (default: the image size).")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    help="FILE[:SCALE]: a LoRA (.safetensors, kohya/A1111 or diffusers format) applied without re-export; "
    "repeatable, scale 1 when omitted.",
)
def generate_cmd(
    artifacts: Path,
    prompt: str,
    negative: str,
    steps: int,
    guidance: float,
    seed: int | None,
    size: str | None,
    scheduler: str | None,
    backend: str,
    device: str | None,
    num_images: int,
    init_image: Path | None,
    strength: float,
    out: Path,
    preview_dir: Path | None,
    original_size: str | None,
    crop: str | None,
    target_size: str | None,
    loras: tuple[str, ...],
) -> None:
    """Generate images for PROMPT with the engines in ARTIFACTS.

    SDXL-Turbo: --steps 1 --cfg 0 (its scheduler, Euler ancestral with trailing spacing, is the default).
    """
    from PIL import Image

    from sdtrt.runtime.images import a1111_parameters, latents_to_rgb, save_png
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.schedulers import A1111_LABELS

    hw = parse_size(size)
    height, width = hw if hw else (None, None)
    image = None
    if init_image:
        try:
            image = Image.open(init_image)
            image.load()
        except OSError as exc:
            raise click.BadParameter(
                f"{str(init_image)!r} is not an image Pillow can read ({exc}); give a PNG, JPEG or WebP file",
                param_hint="--init-image",
            ) from None
    writable_folder(out.parent, "the image")
    if preview_dir:
        writable_folder(preview_dir, "previews")
    from sdtrt.runtime.lora import parse_lora_option

    lora_specs = [parse_lora_option(text) for text in loras]
    with Pipeline.from_artifacts(artifacts, backend=backend, device=device) as pipe:
        if lora_specs:
            pipe.set_loras(lora_specs)
        runs = min(int(steps * strength), steps) if init_image else steps
        with click.progressbar(length=runs, label="denoising", file=sys.stderr) as bar:

            def on_step(i: int, total: int, latents: Any) -> None:
                bar.update(1)
                if preview_dir:
                    for k, preview in enumerate(latents_to_rgb(latents)):
                        preview.save(preview_dir / f"step-{i + 1:03d}-{k}.png")

            result = pipe(
                prompt,
                negative_prompt=negative,
                steps=steps,
                guidance_scale=guidance,
                seed=seed,
                height=height,
                width=width,
                scheduler=scheduler,
                num_images=num_images,
                image=image,
                strength=strength,
                callback=on_step,
                original_size=parse_pair(original_size, "--original-size"),
                crops_coords_top_left=parse_pair(crop, "--crop") or (0, 0),
                target_size=parse_pair(target_size, "--target-size"),
            )
        model_hash = str(pipe.manifest.source.get("sha256", ""))
        active = pipe.loras
    w, h = result.settings.width, result.settings.height
    scheduler = result.settings.scheduler
    for k, (img, img_seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        target = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}")
        extra = [("Denoising strength", f"{strength:g}")] if init_image else []
        if active:  # as A1111: the LoRAs in the prompt text, and their hashes
            extra.append(("Lora hashes", '"' + ", ".join(f"{f.name}: {f.short_hash}" for f, _ in active) + '"'))
        tags = "".join(f" <lora:{f.name}:{s:g}>" for f, s in active)
        text = a1111_parameters(
            prompt + tags,
            negative or "",
            steps,
            A1111_LABELS[scheduler],
            guidance,
            img_seed,
            w,
            h,
            model_hash=model_hash,
            model_name=artifacts.name,
            extra=extra,
        )
        save_png(img, target, text)
        click.echo(f"wrote {target} (seed {img_seed})")
    t = result.times
    click.echo(
        f"{w}x{h}, {steps} steps, {scheduler}, {backend}: text {t.text_encode * 1000:.0f} ms, denoise "
        f"{t.denoise * 1000:.0f} ms ({t.step_median * 1000:.1f} ms/step), VAE decode "
        f"{t.vae_decode * 1000:.0f} ms, total {t.total:.2f} s"
    )


@main.command("serve")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime, torch or tensorrt.")
@click.option("--device", help="cpu or cuda (default: cuda when the backend can use it).")
@click.option("--queue", "queue_size", type=int, default=16, show_default=True, help="Requests that may wait.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds a request may wait before a 503.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve as a Ray Serve application (replicas, autoscaling).")
@click.option("--ray-address", help="Ray cluster to join (e.g. auto); default: start a local Ray.")
@click.option("--replicas", type=click.IntRange(min=1), help="Ray: a fixed number of replicas.")
@click.option(
    "--min-replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Ray: autoscaling floor."
)
@click.option(
    "--max-replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Ray: autoscaling ceiling."
)
@click.option("--gpus-per-replica", type=float, default=0.0, show_default=True, help="Ray: num_gpus of a replica.")
@click.option("--cpus-per-replica", type=float, default=1.0, show_default=True, help="Ray: num_cpus of a replica.")
def serve_cmd(
    artifacts: Path,
    host: str,
    port: int,
    backend: str,
    device: str | None,
    queue_size: int,
    timeout: float,
    use_ray: bool,
    ray_address: str | None,
    replicas: int | None,
    min_replicas: int,
    max_replicas: int,
    gpus_per_replica: float,
    cpus_per_replica: float,
) -> None:
    """Serve the AUTOMATIC1111 HTTP API (/sdapi/v1/txt2img, img2img, ...) over the engines in ARTIFACTS.

    SIGTERM stops accepting connections, answers every request already accepted, then exits 0. With --ray, the
    same API runs as a Ray Serve application: one pipeline per replica, requests batched with @serve.batch.
    """

    def ready(url: str) -> None:
        click.echo(f"serving {artifacts} on {url} (A1111 API at {url}/sdapi/v1)")

    if use_ray:
        from sdtrt.serve.ray_app import RayConfig, run

        config_ray = RayConfig(
            str(artifacts.resolve()),
            backend,
            device,
            min_replicas=replicas or min_replicas,
            max_replicas=replicas or max(max_replicas, min_replicas),
            gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica,
            max_queued_requests=queue_size,
        )
        run(config_ray, host, port, address=ray_address, on_ready=ready)
        return
    from sdtrt.serve.server import ServeConfig, serve

    config = ServeConfig(artifacts, host, port, backend, device, queue_size, timeout)
    serve(config, on_ready=ready)


@main.command("bench")
@click.argument("source")
@click.option(
    "--backends",
    default="diffusers,torch,onnxruntime",
    show_default=True,
    help="Comma-separated: diffusers, diffusers-compile, torch, torch-graph, onnxruntime, tensorrt.",
)
@click.option(
    "--size", help="WIDTHxHEIGHT in pixels (default: the model's native size: 512 for SD 1.5, 1024 for SDXL)."
)
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--cfg", "guidance", type=float, default=7.5, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp16",
    show_default=True,
    help="fp16 applies on CUDA; PyTorch backends run fp32 on a CPU.",
)
@click.option("--scheduler", default="euler_a", show_default=True)
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
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the JSON rows here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG chart here.")
def bench_cmd(
    source: str,
    backends: str,
    size: str | None,
    steps: int,
    guidance: float,
    batch: int,
    precision: str,
    scheduler: str,
    runs: int,
    warmup: int,
    seed: int,
    device: str | None,
    artifacts: Path | None,
    sequential: bool,
    json_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Time SOURCE on several backends side by side: same weights, seed and sampler, one process, runs interleaved."""
    from sdtrt.benchmarks.harness import BenchConfig, run_benchmark
    from sdtrt.benchmarks.report import format_table, plot, summarize
    from sdtrt.runtime.files import write_text_atomic
    from sdtrt.runtime.models.sources import native_size

    native = native_size(source)
    hw = parse_size(size or f"{native}x{native}")
    assert hw is not None
    config = BenchConfig(
        source=source,
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
        height=hw[0],
        width=hw[1],
        steps=steps,
        guidance=guidance,
        batch=batch,
        precision=precision,
        runs=runs,
        warmup=warmup,
        seed=seed,
        scheduler=scheduler,
        device=device,
        artifacts=str(artifacts) if artifacts else None,
        sequential=sequential,
    )
    for path, what in ((json_path, "the JSON rows"), (plot_path, "the chart")):
        if path:
            writable_folder(path.parent, what)
    rows = run_benchmark(config, progress=lambda message: click.echo(message, err=True))
    summaries = summarize(rows)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json.dumps({"rows": rows, "summary": summaries}, indent=2) + "\n")
    if plot_path:
        title = f"{source} {hw[1]}x{hw[0]}, {steps} steps, CFG {guidance:g}, batch {batch}"
        plot(summaries, plot_path, title)
    env = rows[0]["env"]
    machine = env.get("gpu") or f"{env['cpu']} ({env['cpus']} cpus)"
    order = "sequential blocks" if sequential else "interleaved"
    click.echo(
        f"{source} {hw[1]}x{hw[0]}, {steps} steps, CFG {guidance:g}, batch {batch}, {scheduler}, {machine}, {order}"
    )
    click.echo(format_table(summaries))


@main.command("build")
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
    default="text_encoder,unet,vae_decoder,vae_encoder",
    show_default=True,
    help="Comma-separated components to build (those the artifact has).",
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
    components: str,
) -> None:
    """Build TensorRT engines from the ONNX artifact folder ARTIFACTS into the engine folder OUT."""
    from sdtrt.export.build import ProfileRequest, TensorRTBuildOptions, build_engines, resolve_profile
    from sdtrt.runtime.manifest import read_manifest

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
        components=tuple(c.strip() for c in components.split(",") if c.strip()),
    )
    start = time.perf_counter()
    manifest = build_engines(artifacts, out, resolve_profile(request, read_manifest(artifacts).profile), options)
    click.echo(f"TensorRT {manifest.versions.get('tensorrt')} engines in {out} ({time.perf_counter() - start:.1f} s)")
    click.echo(f"  profile {manifest.profile.id}")
    for entry in manifest.components.values():
        extra = entry.extra
        peak = extra.get("peak_device_memory")
        click.echo(
            f"  {entry.file:<18} {(out / entry.file).stat().st_size / 2**20:9.1f} MiB  "
            f"built in {extra.get('build_seconds', 0):.1f} s, peak build memory "
            + ("n/a" if peak is None else f"{peak / 2**20:.0f} MiB")
            + f", activations {extra.get('device_memory_size', 0) / 2**20:.1f} MiB"
        )


@main.command("doctor")
def doctor_cmd() -> None:
    """Show versions, the GPU, and which backends can run here."""
    import importlib
    import platform

    import torch

    from sdtrt.runtime.backends.trt_compat import extra_advice
    from sdtrt.runtime.deps import version_of
    from sdtrt.runtime.engine import BACKENDS, get_backend

    rows = [
        ("python", platform.python_version()),
        ("sdtrt", version_of("sdtrt") or "?"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})"),
        ("trt extra", extra_advice()),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append(
                (
                    f"GPU {index}",
                    f"{props.name}, compute capability {props.major}.{props.minor}, "
                    f"{props.total_memory / 2**30:.1f} GiB",
                )
            )
    else:
        rows.append(("GPU", "none visible to torch"))
    for module in ("tensorrt", "onnxruntime", "onnx", "diffusers", "transformers"):
        try:
            version = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception as exc:  # not installed, or installed but broken: say which
            version = "not installed" if isinstance(exc, ModuleNotFoundError) else f"fails to import ({exc})"
        if module == "onnxruntime" and not version.startswith(("not", "fails")):
            version += f" ({', '.join(importlib.import_module(module).get_available_providers())})"
        rows.append((module, version))
    for name, value in rows:
        click.echo(f"{name:<13} {value}")
    click.echo("backends:")
    for name in BACKENDS:
        try:
            usable, reason = get_backend(name).available()
        except Exception as exc:
            usable, reason = False, f"{type(exc).__name__}: {exc}"
        click.echo(f"  {name:<12} " + ("usable" if usable else f"not usable: {reason}"))


if __name__ == "__main__":
    main()
