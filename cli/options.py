"""Option parsing shared by the ``sdtrt`` commands: sizes, pairs, comma lists, writable folders, backend options."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def parse_size(text: str | None, option: str | None = None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '768x512' (width x height) -> (512, 768) as (height, width); errors name ``option``."""
    if text is None:
        return None
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            size = int(h), int(w)
        else:
            size = int(text), int(text)
    except ValueError:
        raise click.BadParameter(
            f"expected N or WIDTHxHEIGHT in pixels (e.g. 512 or 768x512), got {text!r}", param_hint=option
        ) from None
    if min(size) <= 0:
        raise click.BadParameter(
            f"sizes must be positive pixel counts, got {text!r}; e.g. 1024x1024, or leave the option out for the "
            "model's own size",
            param_hint=option,
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


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): a comma-separated option value, blanks dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


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


def backend_options(command: F) -> F:
    """``--backend`` and ``--device`` of the commands that open a pipeline on artifacts."""
    command = click.option("--device", help="cpu or cuda (default: cuda when the backend can use it).")(command)
    return click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime, torch or tensorrt.")(
        command
    )


def cache_options(command: F) -> F:
    """``--cache-interval`` and ``--cache-schedule``: step caching on the commands that generate images."""
    command = click.option(
        "--cache-schedule",
        default="uniform",
        show_default=True,
        help="Which steps run the full UNet with --cache-interval > 1: uniform (every N) or quadratic (DeepCache's "
        "non-uniform schedule: denser around the step 30%% of the way in).",
    )(command)
    return click.option(
        "--cache-interval",
        type=int,
        default=1,
        show_default=True,
        help="Step caching: run the full UNet on one step in N and only its outer layers (the shallow UNet) in "
        "between; 1 runs every step in full. Needs an artifact exported with the shallow UNet (the default).",
    )(command)


def sigma_schedule_option(command: F) -> F:
    """``--sigma-schedule NAME``: sample as ComfyUI's KSampler does, over that sigma schedule."""
    return click.option(
        "--sigma-schedule",
        help="Sample as ComfyUI's KSampler does, with this scheduler: normal, karras, exponential, sgm_uniform, "
        "simple, ddim_uniform, beta, linear_quadratic or kl_optimal. --scheduler then names the sampler (euler -> "
        "euler, euler_a -> euler_ancestral, dpmpp_2m, dpmpp_2m_sde, ddim, lcm; default euler), the seed is "
        "ComfyUI's (0 to 2**64-1, one noise draw for the whole batch) and --strength is KSampler's denoise. Same "
        "settings, same image as ComfyUI's default workflow.",
    )(command)


def clip_skip_option(help_text: str) -> Callable[[F], F]:
    """``--clip-skip N``: which text-encoder layer (from the end) conditions the images; ``help_text`` says where
    it applies."""
    return click.option("--clip-skip", type=click.IntRange(min=1), default=1, show_default=True, help=help_text)


INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")  # runtime.inpaint.FILLS (checked there)


def hires_options(command: F) -> F:
    """The hires fix options of ``sdtrt generate`` (see ``read_hires``)."""
    options = [
        click.option("--hires-scale", type=float, help="Hires fix: a second pass at this many times the size."),
        click.option("--hires-size", help="Hires fix: a second pass at WIDTHxHEIGHT (0 on one side keeps the aspect)."),
        click.option(
            "--hires-upscaler",
            default="Latent",
            show_default=True,
            help="Hires fix: Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent "
            "(nearest), Latent (nearest-exact) (in latent space), or Lanczos, Nearest, None (on the decoded image).",
        ),
        click.option("--hires-steps", type=int, default=0, show_default=True, help="Second pass steps; 0: --steps."),
        click.option("--hires-denoise", type=float, default=0.7, show_default=True, help="Second pass strength."),
        click.option("--hires-sampler", help="Second pass sampler (default: --scheduler's)."),
        click.option("--hires-prompt", help="Second pass prompt (default: PROMPT)."),
        click.option("--hires-negative-prompt", help="Second pass negative prompt (default: --negative)."),
        click.option("--hires-cfg", type=float, help="Second pass guidance scale (default: --cfg)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def inpaint_options(command: F) -> F:
    """The inpainting options of ``sdtrt generate`` (see ``read_inpaint``)."""
    fills = [fill.replace(" ", "-") for fill in INPAINT_FILLS]
    options = [
        click.option(
            "--mask",
            "inpaint_mask",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Inpaint: repaint the white part of this image (the --init-image's size) and keep the rest.",
        ),
        click.option(
            "--mask-blur", "inpaint_blur", type=int, default=4, show_default=True, help="Inpaint: mask edge blur (px)."
        ),
        click.option("--mask-invert", "inpaint_invert", is_flag=True, help="Inpaint: repaint the black part instead."),
        click.option(
            "--inpainting-fill",
            "inpaint_fill",
            type=click.Choice(fills),
            default="original",
            show_default=True,
            help="Inpaint: what the masked region starts from: the image (original), its surroundings' colours "
            "(fill), random latents (latent-noise) or zero latents (latent-nothing).",
        ),
        click.option(
            "--only-masked",
            "inpaint_only_masked",
            is_flag=True,
            help="Inpaint: generate only the region around the mask, at --size, and paste it back (A1111's "
            "'inpaint at full resolution'); the output has the init image's size.",
        ),
        click.option(
            "--only-masked-padding",
            "inpaint_padding",
            type=int,
            default=32,
            show_default=True,
            help="Inpaint, --only-masked: pixels around the mask that are generated with it.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def read_inpaint(mask: Path | None, **details: Any) -> Any:
    """The ``runtime.inpaint.Inpaint`` of the --mask options (``details``: blur, invert, fill, only_masked,
    padding), or None without --mask; a usage error when one is wrong or given without --mask."""
    from PIL import Image, UnidentifiedImageError

    from sdtrt.runtime.errors import ConfigError
    from sdtrt.runtime.inpaint import Inpaint

    defaults = {"blur": 4, "invert": False, "fill": "original", "only_masked": False, "padding": 32}
    flags = {"blur": "--mask-blur", "invert": "--mask-invert", "fill": "--inpainting-fill",
             "only_masked": "--only-masked", "padding": "--only-masked-padding"}  # fmt: skip
    if mask is None:
        given = [flags[name] for name, value in details.items() if value != defaults[name]]
        if given:
            raise click.UsageError(f"{', '.join(given)} set how a mask is used; add --mask MASK (and --init-image)")
        return None
    try:
        image = Image.open(mask)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise click.BadParameter(f"cannot read {mask} as an image ({exc})", param_hint="--mask") from None
    try:
        return Inpaint(image, **{**details, "fill": details["fill"].replace("-", " ")})
    except ConfigError as exc:
        raise click.UsageError(f"{exc} (--mask options)") from None


def read_hires(scale: float | None, size: str | None, **details: Any) -> Any:
    """The ``runtime.hires.HiresFix`` of the --hires-* options (``details``: upscaler, steps, denoise, sampler,
    prompt, negative_prompt, cfg), or None without --hires-scale/--hires-size; a usage error when one is wrong."""
    from sdtrt.runtime.errors import ConfigError
    from sdtrt.runtime.hires import HiresFix

    defaults = {"upscaler": "Latent", "steps": 0, "denoise": 0.7}
    if scale is None and size is None:
        given = [f"--hires-{k.replace('_', '-')}" for k, v in details.items() if v is not None and v != defaults.get(k)]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} set the hires fix's second pass; add --hires-scale or --hires-size"
            )
        return None
    if scale is not None and size is not None:
        raise click.UsageError("give --hires-scale or --hires-size, not both")
    resize = parse_pair(size, "--hires-size") if size is not None else None
    try:
        return HiresFix(
            scale=2.0 if scale is None else scale,
            resize=resize,
            upscaler=details["upscaler"],
            steps=details["steps"],
            denoising_strength=details["denoise"],
            sampler=details["sampler"],
            prompt=details["prompt"],
            negative_prompt=details["negative_prompt"],
            guidance_scale=details["cfg"],
        )
    except ConfigError as exc:
        raise click.UsageError(f"{exc} (--hires-* options)") from None
