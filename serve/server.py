"""Run ``create_app(LocalWorker(...))`` under uvicorn, with a graceful shutdown on SIGTERM/SIGINT.

On SIGTERM the listening socket closes at once (new connections are refused); every request already accepted,
running or queued, is answered; then the pipeline is closed and ``serve`` returns (exit code 0). Queued
requests still obey the queue timeout, and ``grace`` seconds bound the whole drain. The port is bound before the
model loads, so a port in use is one ``ConfigError`` line at once. Start, drain and stop are logged at INFO, as
is every request (``limits.RequestMiddleware``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime.cache_plan import check_cache_args
from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError

from .caching import CacheDefaults
from .clipskip import check_clip_skip_default
from .limits import Limits
from .loras import check_lora_dir
from .models import Checkpoint, Checkpoints, PipelinePool, check_defaults, check_max_loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """The models (``artifacts``: one artifact folder or a folder of them, ``models``), where to listen, how the
    local worker queues, and the defaults of requests that do not choose."""

    artifacts: Path
    host: str = "127.0.0.1"
    port: int = 7860
    backend: str = "onnxruntime"
    device: str | None = None
    queue_size: int = 16
    timeout: float = 60.0
    grace: float | None = None  # seconds the shutdown drain may take; None: queue timeout + 60 s
    cache_interval: int = 1  # a full UNet step every N (1: no caching)
    cache_schedule: str = "uniform"
    clip_skip: int = 1  # for requests without override_settings.CLIP_stop_at_last_layers
    limits: Limits = Limits()
    lora_dir: Path | None = None  # the LoRAs <lora:NAME:WEIGHT> tags name (file stems of its .safetensors)
    max_loaded: int = 1  # models kept open at once (``artifacts`` may be a folder of artifact folders)
    comfy_dir: Path = Path("sdtrt-comfy")  # ComfyUI's input/output/temp folders (created at start)
    comfy_history: int = 200  # ComfyUI prompts kept in /history
    comfy_preview_method: str = "none"  # latent previews of prompts that do not choose (extra_data.preview_method)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.queue_size < 1:
            raise ConfigError(f"--queue must be >= 1, got {self.queue_size}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        check_cache_args(self.cache_interval, self.cache_schedule)
        check_clip_skip_default(self.clip_skip)
        check_lora_dir(self.lora_dir)
        check_max_loaded(self.max_loaded)
        self.comfy  # noqa: B018  (checks the --comfy-* values now)

    @property
    def comfy(self) -> Any:
        """ComfyUI's settings (``comfy.routes.ComfySettings``; ``ConfigError`` if a value is bad)."""
        from .comfy.folders import ComfyFolders
        from .comfy.routes import ComfySettings

        return ComfySettings(ComfyFolders(Path(self.comfy_dir)), self.comfy_history, self.comfy_preview_method)

    @property
    def cache(self) -> CacheDefaults:
        """The server's step-caching default (``ConfigError`` if the interval or schedule is bad)."""
        return CacheDefaults(self.cache_interval, self.cache_schedule)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``; ``ConfigError`` in one line if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another server may use that port: stop it, "
            "or choose another --port (0: any free port)"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_app(
    app: Any,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None = None,
    grace: float | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain gracefully; ``on_ready(url)`` once the socket listens.

    ``sock``: a socket from ``bind`` (default: one bound here, before uvicorn starts).
    """
    uvicorn = require("uvicorn", "the HTTP server (sdtrt serve)", "serve")
    sock = sock or bind(host, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace)
    server = _drain_logged(uvicorn, config, grace)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.02)
        if server.started:
            bound = sock.getsockname()[1]
            log.info("started: listening on %s:%d", host, bound)
            if on_ready is not None:
                on_ready(f"http://{host}:{bound}")
        await task

    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    except SystemExit as exc:  # uvicorn exits when the app fails to start
        if exc.code:
            raise ConfigError(
                f"could not serve on {host}:{port}: the app failed to start (see the log above)"
            ) from None
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if server.draining_since is not None:
        log.info("stopped: drained in %.1f s", time.monotonic() - server.draining_since)


def _drain_logged(uvicorn: Any, config: Any, grace: float | None) -> Any:
    """A ``uvicorn.Server`` that logs when the drain begins (and remembers when, for the stop line)."""

    class DrainLogged(uvicorn.Server):  # type: ignore[misc, name-defined]
        draining_since: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining_since is None:
                self.draining_since = time.monotonic()
                log.info(
                    "draining: %s received; new connections are refused, the requests already accepted are "
                    "answered (at most %s s)", signal.Signals(sig).name, "unbounded" if grace is None else f"{grace:g}",
                )  # fmt: skip
            super().handle_exit(sig, frame)

    return DrainLogged(config)


def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Open the current model's pipeline, and serve the A1111 API and ComfyUI's over the models until SIGTERM."""
    from .a1111_info import cmd_flags
    from .app import create_app
    from .loras import LoraLibrary
    from .worker import LocalWorker

    require("fastapi", "the HTTP server (sdtrt serve)", "serve")
    require("uvicorn", "the HTTP server (sdtrt serve)", "serve")
    sock = bind(config.host, config.port)  # before the model loads: a port in use fails at once
    try:
        checkpoints, pool = open_models(config)
    except BaseException:
        sock.close()
        raise
    worker = LocalWorker(checkpoints, pool, config.queue_size, config.timeout, config.cache, config.clip_skip)
    grace = config.grace if config.grace is not None else config.timeout + 60.0
    log.info(
        "models: %s (current %s; at most %d open), %s, queue %d, limits: body %g MB, prompts %d characters, "
        "%d images per request",
        ", ".join(c.name for c in checkpoints.items), checkpoints.current.name, config.max_loaded, config.backend,
        config.queue_size, config.limits.max_body_mb, config.limits.max_prompt_chars, config.limits.max_images,
    )  # fmt: skip
    loras = LoraLibrary(config.lora_dir)
    if config.lora_dir is not None:
        log.info("LoRAs from %s: %s", config.lora_dir, ", ".join(loras.names) or "none yet")
    comfy = config.comfy
    try:
        comfy.folders.create()
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create ComfyUI's folders under {comfy.folders.root}: {exc}; choose another "
                          "--comfy-dir") from None  # fmt: skip
    log.info("ComfyUI API at /prompt and /ws, files in %s", comfy.folders.root)
    app = create_app(worker, checkpoints, cmd_flags=cmd_flags(config), limits=config.limits, loras=loras, comfy=comfy)
    run_app(app, config.host, config.port, on_ready=on_ready, grace=grace, sock=sock)


def open_models(config: ServeConfig) -> tuple[Checkpoints, PipelinePool]:
    """The models under ``config.artifacts``, each checked against the server's defaults (step caching, clip
    skip) before anything loads, and a pool with the first one open."""
    from sdtrt.runtime.engine import BackendOptions
    from sdtrt.runtime.pipeline import Pipeline

    checkpoints = Checkpoints(config.artifacts)
    for checkpoint in checkpoints.items:  # every model must run the defaults: refuse them now, not per request
        check_defaults(checkpoint.folder, config.cache, config.clip_skip)

    def open_pipeline(checkpoint: Checkpoint) -> Any:
        # ONNX Runtime's threads sleep between runs: spinning, they took the cores from the server's own threads
        # (2 cores, two tiny models: 38.7 -> 49.6 req/s at 4 clients without spinning; RESULTS.md)
        options = BackendOptions(spin=False)
        return Pipeline.from_artifacts(checkpoint.folder, backend=config.backend, device=config.device, options=options)

    pool = PipelinePool(open_pipeline, config.max_loaded)
    pool.get(checkpoints.current)
    return checkpoints, pool
