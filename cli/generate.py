"""``sdtrt generate``: images for a prompt from an artifact folder, saved as PNGs with A1111 parameters."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdtrt.cli.comfy_generate import check_comfy_call
from sdtrt.cli.control import control_options, read_controls
from sdtrt.cli.options import (
    backend_options,
    cache_options,
    clip_skip_option,
    hires_options,
    inpaint_options,
    parse_pair,
    parse_size,
    read_hires,
    read_inpaint,
    sigma_schedule_option,
    writable_folder,
)
from sdtrt.cli.output import OutputTarget, output_target

if TYPE_CHECKING:
    from PIL import Image

    from sdtrt.runtime.manifest import Manifest
    from sdtrt.runtime.pipeline import GenerationResult, Pipeline


@click.command("generate")
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
@click.option(
    "--seed",
    type=int,
    help="Seed of the first image (image k uses seed + k), 0 to 4294967295; -1 or omitted: a random one (printed).",
)
@click.option("--size", help="WIDTHxHEIGHT in pixels (default: the artifact's tuned size).")
@click.option(
    "--scheduler",
    help="euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras or lcm (default: the sampler of the model's scheduler); "
    "with --sigma-schedule also dpmpp_2m_sde.",
)
@backend_options
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="img2img source.")
@click.option("--strength", type=float, default=0.8, show_default=True, help="img2img: how much to change.")
@click.option(
    "--out",
    "out",
    default="sdtrt.png",
    show_default=True,
    help="PNG to write (with several images NAME-0.png, NAME-1.png, ...), or a folder (existing, or ending in /) "
    "to write 00001-SEED.png, 00002-SEED.png, ... in, numbered after the images already there.",
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
@control_options
@cache_options
@clip_skip_option(
    "Condition on the text encoder's hidden state N layers from the end, through its final layer norm (A1111's "
    "Clip skip; diffusers' clip_skip is N - 1); 1: the last layer. SD 1.x/2.x, any N up to the encoder's layers "
    "without re-export."
)
@hires_options
@inpaint_options
@sigma_schedule_option
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
    out: str,
    preview_dir: Path | None,
    original_size: str | None,
    crop: str | None,
    target_size: str | None,
    loras: tuple[str, ...],
    controls: tuple[str, ...],
    preprocess: tuple[str, ...],
    resize: tuple[str, ...],
    canny_low: int,
    canny_high: int,
    guess_mode: bool,
    cache_interval: int,
    cache_schedule: str,
    clip_skip: int,
    sigma_schedule: str | None,
    **grouped: Any,
) -> None:
    """Generate images for PROMPT with the engines in ARTIFACTS.

    SDXL-Turbo: --steps 1 --cfg 0 (its scheduler, Euler ancestral with trailing spacing, is the default).
    Hires fix (A1111's): --hires-scale or --hires-size adds a second, img2img pass at the larger size.
    Inpainting: --init-image IMG --mask MASK repaints the white part of MASK and keeps the rest of IMG.
    ComfyUI: --sigma-schedule NAME samples as ComfyUI's KSampler (its default workflow's image, pixel for pixel).
    """
    from sdtrt.runtime.manifest import model_display_name

    hw = parse_size(size, "--size")
    target = output_target(out)
    if preview_dir:
        writable_folder(preview_dir, "previews")
    if sigma_schedule is not None:
        generate_with_sigmas(click.get_current_context().params, hw, target)
        return
    call = pipeline_call(click.get_current_context().params, hw)
    hires = read_hires(**option_group(grouped, "hires_"))
    lora_specs = check_before_work(artifacts, prompt, call, loras, hires)
    with open_pipeline(artifacts, backend, device, lora_specs) as pipe:
        runs = min(int(steps * strength), steps) if init_image else steps
        with step_progress(runs + hires_runs(hires, steps), preview_dir, pipe.manifest) as on_step:
            result = run(pipe, prompt, hires, callback=on_step, **call)
        model_hash = str(pipe.manifest.source.get("sha256", ""))
        name = model_display_name(pipe.manifest, artifacts.name)
    from sdtrt.runtime.images import infotext

    save_images(result, target, partial(infotext, prompt, negative or "", model_hash=model_hash, model_name=name))
    click.echo(timing_line(result, steps, backend))


def pipeline_call(options: dict[str, Any], hw: tuple[int, int] | None) -> dict[str, Any]:
    """The ``Pipeline.__call__`` arguments of the command's ``options`` (click's parameters), parsed and read."""
    from sdtrt.runtime.request import resolve_seed

    o = options
    return {
        "negative_prompt": o["negative"],
        "steps": o["steps"],
        "guidance_scale": o["guidance"],
        "seed": resolve_seed(o["seed"]),  # -1 or none: random, drawn now so the check and the run agree
        "height": hw[0] if hw else None,
        "width": hw[1] if hw else None,
        "scheduler": o["scheduler"],
        "num_images": o["num_images"],
        "image": read_init_image(o["init_image"]) if o["init_image"] else None,
        "strength": o["strength"],
        "original_size": parse_pair(o["original_size"], "--original-size"),
        "crops_coords_top_left": parse_pair(o["crop"], "--crop") or (0, 0),
        "target_size": parse_pair(o["target_size"], "--target-size"),
        "controls": read_controls(
            *(o[k] for k in ("controls", "preprocess", "resize", "canny_low", "canny_high", "guess_mode"))
        ),
        "cache_interval": o["cache_interval"],
        "cache_schedule": o["cache_schedule"],
        "clip_skip": o["clip_skip"],
        "inpaint": read_inpaint(**option_group(o, "inpaint_")),
    }


def generate_with_sigmas(options: dict[str, Any], hw: tuple[int, int] | None, target: OutputTarget) -> None:
    """``--sigma-schedule``: ComfyUI's default workflow with the command's ``options`` (click's parameters), the
    options that have no node in it refused."""
    o = options
    hires = read_hires(**option_group(o, "hires_"))
    unsupported = {"--control": o["controls"], "--original-size": o["original_size"], "--crop": o["crop"]}
    unsupported |= {"--hires-*": hires, "--target-size": o["target_size"], "--mask": o.get("inpaint_mask")}
    given = {option: bool(value) for option, value in unsupported.items()}
    comfy = {"sampler": o["scheduler"], "schedule": o["sigma_schedule"], "steps": o["steps"], "cfg": o["guidance"]}
    comfy |= {"seed": o["seed"], "size": hw, "batch": o["num_images"], "denoise": o["strength"]}
    comfy |= {"clip_skip": o["clip_skip"], "cache_interval": o["cache_interval"], "cache_schedule": o["cache_schedule"]}
    comfy["image"] = read_init_image(o["init_image"]) if o["init_image"] else None
    check_comfy_call(comfy, given)
    engines = (o["backend"], o["device"], o["loras"])
    generate_comfy(o["artifacts"], o["prompt"], o["negative"] or "", comfy, engines, target, o["preview_dir"])


def generate_comfy(
    artifacts: Path,
    prompt: str,
    negative: str,
    call: dict[str, Any],
    engines: tuple[str, str | None, tuple[str, ...]],
    target: OutputTarget,
    preview_dir: Path | None,
) -> None:
    """``--sigma-schedule``: ComfyUI's default workflow (``cli.comfy_generate``) with the checked ``call``."""
    import time

    from sdtrt.cli.comfy_generate import parameters_text, run_comfy
    from sdtrt.cli.comfy_generate import save_images as save_comfy
    from sdtrt.runtime.cache_plan import check_cache_supported
    from sdtrt.runtime.lora import LoraState, parse_lora_option, read_loras
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.runtime.request import image_size

    start = time.perf_counter()
    manifest = read_manifest(artifacts)  # the size and step caching against the artifact, before engines open
    check_cache_supported(call["cache_interval"], manifest.components)
    if call["image"] is None:
        height, width = call["size"] or (None, None)
    else:  # VAEEncode's crop to whole latents
        factor = manifest.model.vae_scale_factor
        height, width = (n // factor * factor for n in call["image"].shape[1:3])
    image_size(manifest, height, width, call["batch"])
    backend, device, loras = engines
    lora_specs = [parse_lora_option(text) for text in loras]
    read_loras(LoraState(), lora_specs)
    with open_pipeline(artifacts, backend, device, lora_specs) as pipe:
        with step_progress(call["steps"], preview_dir, pipe.manifest) as on_step:
            scale = pipe.manifest.model.scaling_factor
            images = run_comfy(pipe, prompt, negative, callback=lambda i, n, x: on_step(i, n, x * scale), **call)
    size = f"{images.shape[2]}x{images.shape[1]}"
    text = parameters_text(prompt, negative, call, size)
    save_comfy(images, target, call["seed"], text)
    seconds = time.perf_counter() - start
    click.echo(
        f"{size}, {call['steps']} steps, {call['sampler']} {call['schedule']} (ComfyUI), {backend}: {seconds:.2f} s"
    )


def option_group(options: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The options named ``prefix...``, without the prefix (the --hires-* and --mask options)."""
    return {k.removeprefix(prefix): v for k, v in options.items() if k.startswith(prefix)}


def run(pipe: Pipeline, prompt: str, hires: Any, **call: Any) -> GenerationResult:
    """One pipeline call, or both passes of a hires fix (``hires``: a ``HiresFix``, or None)."""
    if hires is None:
        return pipe(prompt, **call)
    from sdtrt.runtime.hires import run_hires

    return run_hires(pipe, prompt, hires, **call)


def hires_runs(hires: Any, steps: int) -> int:
    """The steps the hires fix's second pass runs (0 without one)."""
    if hires is None:
        return 0
    from sdtrt.runtime.hires import hires_runs as second_runs

    return second_runs(hires, steps)


def check_before_work(
    artifacts: Path, prompt: str, call: dict[str, Any], loras: Sequence[str], hires: Any = None
) -> list[tuple[Path, float]]:
    """Refuse, with the runtime's own messages, what can be refused before any engine opens: the pipeline
    arguments ``call`` against the artifact's manifest (sizes, profile, steps, strength, scheduler, seeds) and
    the --lora files (FILE[:SCALE], read here so a bad one is refused now) and the controls against the
    artifact's ControlNets; return the LoRAs as (path, scale)."""
    from sdtrt.runtime.control.inputs import check_controls
    from sdtrt.runtime.lora import LoraState, parse_lora_option, read_loras
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.runtime.request import check_request

    manifest = read_manifest(artifacts)
    check_request(manifest, prompt, **{k: v for k, v in call.items() if k not in ("controls", "inpaint")})
    if call.get("inpaint") is not None:
        check_inpaint_call(manifest, call)
    if hires is not None:
        from sdtrt.runtime.hires import check_hires

        if call.get("image") is not None:
            raise click.UsageError("--hires-scale/--hires-size run on text-to-image; leave out --init-image")
        check_hires(manifest, hires, call["height"], call["width"], call["num_images"])
    model = manifest.model
    families = manifest.controlnet_families()
    check_controls(call.get("controls", ()), manifest.controlnets, model.control_ready, families, model.family)
    lora_specs = [parse_lora_option(text) for text in loras]
    read_loras(LoraState(), lora_specs)
    return lora_specs


def check_inpaint_call(manifest: Any, call: dict[str, Any]) -> None:
    """Refuse a --mask the runtime would refuse (no init image, another size, nothing to repaint), now."""
    from sdtrt.runtime.errors import ConfigError
    from sdtrt.runtime.inpaint import plan_inpaint
    from sdtrt.runtime.request import image_size

    if call.get("image") is None:
        raise click.UsageError("--mask needs the image it applies to: add --init-image IMAGE")
    height, width = image_size(manifest, call["height"], call["width"], call["num_images"])
    try:
        plan_inpaint(call["inpaint"], call["image"], width, height, manifest.model.vae_scale_factor)
    except ConfigError as exc:
        raise click.UsageError(f"{exc} (--mask)") from None


def timing_line(result: GenerationResult, steps: int, backend: str) -> str:
    """One line: the size, steps, sampler and backend, and what each stage took."""
    t = result.times
    w, h = result.settings.width, result.settings.height
    hires = result.settings.hires
    size = f"{w}x{h}" if hires is None else f"{w}x{h} then {hires.width}x{hires.height} (hires fix)"
    return (
        f"{size}, {steps} steps, {result.settings.scheduler}, {backend}: text {t.text_encode * 1000:.0f} ms, "
        f"denoise {t.denoise * 1000:.0f} ms ({t.step_median * 1000:.1f} ms/step), VAE decode "
        f"{t.vae_decode * 1000:.0f} ms, total {t.total:.2f} s"
    )


def read_init_image(path: Path) -> Image.Image:
    """The --init-image file, read now so a bad file fails before the engines load."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except OSError as exc:
        raise click.BadParameter(
            f"{str(path)!r} is not an image Pillow can read ({exc}); give a PNG, JPEG or WebP file",
            param_hint="--init-image",
        ) from None
    return image


@contextlib.contextmanager
def open_pipeline(
    artifacts: Path, backend: str, device: str | None, loras: Sequence[tuple[Path, float]]
) -> Iterator[Pipeline]:
    """The pipeline over ARTIFACTS with ``loras`` (path, scale) applied."""
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(artifacts, backend=backend, device=device) as pipe:
        if loras:
            pipe.set_loras(loras)
        yield pipe


@contextlib.contextmanager
def step_progress(
    runs: int, preview_dir: Path | None, manifest: Manifest | None = None
) -> Iterator[Callable[[int, int, Any], None]]:
    """A progress bar on stderr ticked by the step callback, which also saves a latent preview per step if asked
    (in the model's own preview colours when its ``manifest`` has them)."""
    from sdtrt.runtime.images import latent_rgb_map, latents_to_rgb

    rgb_map = latent_rgb_map(manifest) if manifest is not None and preview_dir else None

    with click.progressbar(length=runs, label="denoising", file=sys.stderr) as bar:

        def on_step(i: int, total: int, latents: Any) -> None:
            bar.update(1)
            if preview_dir:
                for k, preview in enumerate(latents_to_rgb(latents, rgb_map)):
                    preview.save(preview_dir / f"step-{i + 1:03d}-{k}.png")

        yield on_step


def save_images(result: GenerationResult, target: OutputTarget, info: Callable[..., str]) -> None:
    """Each image as a PNG with its A1111 parameters (``info(seed, settings)``), named as ``target`` says."""
    from sdtrt.runtime.images import save_png

    paths = target.paths(result.seeds)
    for img, img_seed, path in zip(result.images, result.seeds, paths, strict=True):
        save_png(img, path, info(img_seed, result.settings))
        click.echo(f"wrote {path} (seed {img_seed})")
