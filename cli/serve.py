"""``sdtrt serve``: the AUTOMATIC1111 HTTP API over an artifact folder (or a folder of them), in one process or on
Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdtrt.cli.options import backend_options, clip_skip_option
from sdtrt.runtime.cache_plan import CACHE_SCHEDULES
from sdtrt.serve.limits import Limits


@click.command("serve")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to listen on (0: any free port).")
@backend_options
@click.option("--queue", "queue_size", type=int, default=16, show_default=True, help="Requests that may wait.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds a request may wait before a 503.")
@click.option(
    "--cache-interval",
    type=int,
    default=1,
    show_default=True,
    help="Step caching for requests that do not choose: a full UNet step every N, the shallow UNet in between "
    "(1: off). A request overrides it with sdtrt_cache_interval (in override_settings or top-level).",
)
@click.option(
    "--cache-schedule",
    type=click.Choice(CACHE_SCHEDULES),
    default="uniform",
    show_default=True,
    help="Which steps run in full: every N (uniform) or DeepCache's quadratic spacing. Per request: "
    "sdtrt_cache_schedule.",
)
@clip_skip_option(
    "Clip skip of requests that do not set override_settings.CLIP_stop_at_last_layers: the text encoder's hidden "
    "state N layers from the end (1: the last layer)."
)
@click.option(
    "--max-body-mb",
    type=float,
    default=32.0,
    show_default=True,
    help="Largest request body (MB); a larger one is answered 413 before it is read.",
)
@click.option(
    "--max-prompt-chars",
    type=int,
    default=20_000,
    show_default=True,
    help="Longest prompt (each of prompt, negative_prompt, hr_prompt, hr_negative_prompt) in characters; 422 beyond.",
)
@click.option(
    "--max-images", type=int, default=16, show_default=True, help="Most images per request (batch_size x n_iter)."
)
@click.option(
    "--lora-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of LoRA .safetensors files that <lora:NAME:WEIGHT> prompt tags name (NAME: the file stem); "
    "GET /sdapi/v1/loras lists them, POST /sdapi/v1/refresh-loras rescans. With --ray, every node must see DIR.",
)
@click.option(
    "--max-loaded",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="When ARTIFACTS is a folder of artifact folders (one model each): models kept open at once, the least "
    "recently used closed first. With --ray: per replica.",
)
@click.option(
    "--comfy-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="ComfyUI's input/output/temp folders (uploads, SaveImage, PreviewImage), created at start "
    "[default: ./sdtrt-comfy].",
)
@click.option(
    "--comfy-history",
    type=click.IntRange(min=1),
    help="ComfyUI prompts kept in /history, the oldest dropped [default: 200].",
)
@click.option(
    "--comfy-preview-method",
    type=click.Choice(["none", "auto", "latent2rgb", "taesd"]),
    help="Latent previews (binary websocket frames) for ComfyUI prompts whose extra_data has no preview_method "
    "(taesd: latent2rgb, sdtrt has no TAESD) [default: none].",
)
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
    cache_interval: int,
    cache_schedule: str,
    clip_skip: int,
    max_body_mb: float,
    max_prompt_chars: int,
    max_images: int,
    lora_dir: Path | None,
    max_loaded: int,
    use_ray: bool,
    ray_address: str | None,
    replicas: int | None,
    min_replicas: int,
    max_replicas: int,
    gpus_per_replica: float,
    cpus_per_replica: float,
    **comfy: Any,
) -> None:
    """Serve the AUTOMATIC1111 HTTP API (/sdapi/v1/txt2img, img2img, ...) over the engines in ARTIFACTS.

    ARTIFACTS is one artifact or engine folder, or a folder whose subfolders are (one model each, listed by
    /sdapi/v1/sd-models and chosen with sd_model_checkpoint, in POST /sdapi/v1/options or a request's
    override_settings).

    The same port speaks ComfyUI's API too (/prompt, /ws, /history, ..., also under /api/; not with --ray).

    SIGTERM stops accepting connections, answers every request already accepted, then exits 0. With --ray, the
    same API runs as a Ray Serve application: one pipeline per replica, requests batched with @serve.batch.
    --cache-interval N > 1 needs an artifact exported with the shallow UNet (--step-cache); a request chooses its
    own with "override_settings": {"sdtrt_cache_interval": N, "sdtrt_cache_schedule": "quadratic"}.
    Every request is logged in one line at INFO (shown by default; -q hides it); errors carry a request id, also
    sent as the X-Request-ID header and in the error body.
    """
    limits = Limits(max_body_mb=max_body_mb, max_prompt_chars=max_prompt_chars, max_images=max_images)

    def ready(url: str) -> None:
        from sdtrt.serve.comfy.frontend import frontend_folder

        comfy_api = "" if use_ray else f", ComfyUI API at {url}/prompt"
        web_ui = "" if use_ray or frontend_folder() is None else f"; web UI at {url}/"
        click.echo(f"serving {artifacts} on {url} (A1111 API at {url}/sdapi/v1{comfy_api}){web_ui}")

    comfy = comfy_given(comfy, use_ray)
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
            cache_interval=cache_interval,
            cache_schedule=cache_schedule,
            clip_skip=clip_skip,
            limits=limits,
            lora_dir=str(lora_dir.resolve()) if lora_dir else None,
            max_loaded=max_loaded,
        )
        run(config_ray, host, port, address=ray_address, on_ready=ready)
        return
    from sdtrt.serve.server import ServeConfig, serve

    config = ServeConfig(artifacts, host, port, backend, device, queue_size, timeout, cache_interval=cache_interval,
                         cache_schedule=cache_schedule, limits=limits, clip_skip=clip_skip,
                         lora_dir=lora_dir, max_loaded=max_loaded, **comfy)  # fmt: skip
    serve(config, on_ready=ready)


def comfy_given(comfy: dict[str, Any], use_ray: bool) -> dict[str, Any]:
    """The ``--comfy-*`` options given (the others keep ``ServeConfig``'s defaults); refused with ``--ray``."""
    given = {name: value for name, value in comfy.items() if value is not None}
    if given and use_ray:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise click.UsageError(f"{flags}: ComfyUI's API is served by the plain server only, not with --ray")
    return given
