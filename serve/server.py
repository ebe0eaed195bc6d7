"""Run ``create_app(LocalWorker(...))`` under uvicorn, with a graceful shutdown on SIGTERM/SIGINT.

On SIGTERM the listening socket closes at once (new connections are refused); every request already accepted,
running or queued, is answered; then the pipeline is closed and ``serve`` returns (exit code 0). Queued
requests still obey the queue timeout, and ``grace`` seconds bound the whole drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime.cache_plan import check_cache_args
from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError

from .caching import CacheDefaults

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, how the local worker queues, and the step caching of requests that do not choose."""

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

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.queue_size < 1:
            raise ConfigError(f"--queue must be >= 1, got {self.queue_size}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        check_cache_args(self.cache_interval, self.cache_schedule)
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise ConfigError(f"--clip-skip must be an integer >= 1, got {self.clip_skip!r}")

    @property
    def cache(self) -> CacheDefaults:
        """The server's step-caching default (``ConfigError`` if the interval or schedule is bad)."""
        return CacheDefaults(self.cache_interval, self.cache_schedule)


def run_app(
    app: Any, host: str, port: int, on_ready: Callable[[str], None] | None = None, grace: float | None = None
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain gracefully; ``on_ready(url)`` once the socket listens."""
    uvicorn = require("uvicorn", "the HTTP server (sdtrt serve)", "serve")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            bound = server.servers[0].sockets[0].getsockname()[1]
            on_ready(f"http://{host}:{bound}")
        await task

    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    except SystemExit as exc:  # uvicorn exits when it cannot bind or the app fails to start
        if exc.code:
            raise ConfigError(
                f"could not serve on {host}:{port} (see the log above: the port in use, or the model failed to "
                "load); choose another --port"
            ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Open the artifact's pipeline, and serve the A1111 API over it until SIGTERM."""
    from sdtrt.runtime.manifest import model_display_name, read_manifest
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.request import check_clip_skip

    from .app import create_app
    from .worker import LocalWorker

    require("fastapi", "the HTTP server (sdtrt serve)", "serve")
    require("uvicorn", "the HTTP server (sdtrt serve)", "serve")
    manifest = read_manifest(config.artifacts)
    config.cache.check_artifact(manifest.components, f"the artifact {config.artifacts}")
    check_clip_skip(manifest.model, config.clip_skip)  # the default must run on this artifact: refuse it now
    pipe = Pipeline.from_artifacts(config.artifacts, backend=config.backend, device=config.device)
    name = model_display_name(pipe.manifest, fallback=Path(config.artifacts).resolve().name)
    worker = LocalWorker(pipe, name, config.queue_size, config.timeout, config.cache, config.clip_skip)
    grace = config.grace if config.grace is not None else config.timeout + 60.0
    run_app(create_app(worker), config.host, config.port, on_ready=on_ready, grace=grace)
