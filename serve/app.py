"""The thin HTTP layer: ``create_app(service)`` -> a FastAPI app speaking A1111's ``/sdapi/v1`` API (and the
ControlNet extension's ``/controlnet`` endpoints, ``controlnet_api``).

No annotations future-import here: FastAPI reads the handlers' annotations at runtime, and fastapi is imported
inside ``create_app`` so that this module imports without the ``serve`` extra.
"""

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.schedulers import A1111_LABELS

from .a1111 import SAMPLER_ALIASES, parse_request, response_body
from .a1111_info import ServerOptions, add_info_routes, server_options
from .controlnet import resolve_units
from .controlnet_api import add_controlnet_routes
from .errors import RequestError, ServeError, error_body
from .fields import OWN_OVERRIDES, check_overrides
from .hires import latent_modes_body, upscalers_body
from .limits import Limits, install, note_generation, parse_json_body
from .loras import LoraLibrary, add_lora_routes, resolve_tags
from .metrics import Metrics
from .models import Checkpoints, keep_checkpoint, request_checkpoint
from .progress import add_progress_routes
from .service import ModelCard, Service, ServiceStats

log = logging.getLogger(__name__)


def samplers() -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers``: A1111's list of {name, aliases, options}."""
    return [
        {"name": label, "aliases": [name, *SAMPLER_ALIASES[name]], "options": {}}
        for name, label in A1111_LABELS.items()
    ]


def sd_models_body(checkpoints: Checkpoints) -> list[dict[str, Any]]:
    """``/sdapi/v1/sd-models``: the server's models, as A1111 lists checkpoints."""
    return [checkpoint.sd_model() for checkpoint in checkpoints.items]


def health_body(card: ModelCard, stats: ServiceStats, models: int = 1) -> dict[str, Any]:
    """``/health``: the current model, where it runs, how many the server has, and the queue."""
    return {
        "status": "ok",
        "model": card.name,
        "models": models,
        "backend": card.backend,
        "device": card.device,
        "queued": stats.queued,
        "running": stats.running,
        "capacity": stats.capacity,
    }


def create_app(
    service: Service,
    checkpoints: Checkpoints,
    metrics: Metrics | None = None,
    cmd_flags: dict[str, Any] | None = None,
    limits: Limits | None = None,
    loras: LoraLibrary | None = None,
    comfy: Any = None,
) -> Any:
    """A FastAPI app over ``service`` (see ``service.Service``), serving the models ``checkpoints`` lists (see
    ``models``); its lifespan starts and stops the service.
    ``cmd_flags``: the server's settings as ``/sdapi/v1/cmd-flags`` reports them (``a1111_info.cmd_flags``).
    ``limits`` bound each request (``limits.Limits``; default: its defaults), which is also logged in one line.
    ``loras``: the LoRAs ``<lora:NAME:WEIGHT>`` prompt tags name (``loras.LoraLibrary``; default: none).
    ``comfy``: ComfyUI's protocol too (``comfy.routes.ComfySettings``; ``service`` must then be a ``LocalWorker``,
    which runs its prompts); default: not served.
    """
    require("fastapi", "the HTTP server (sdtrt serve)", "serve")
    from fastapi import FastAPI

    counters = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="sdtrt", lifespan=lifespan)
    app.state.service, app.state.metrics = service, counters
    app.state.limits = limits or Limits()
    app.state.loras = loras or LoraLibrary()
    app.state.checkpoints = checkpoints
    app.state.a1111_options = ServerOptions(
        checkpoints, getattr(service, "clip_skip", 1), getattr(service, "max_loaded", 1)
    )  # the clip skip of requests that set none, and the models kept open: LocalWorker's and HandleService's
    install(app, app.state.limits)
    _add_generation_routes(app, service, counters)
    _add_status_routes(app, service, counters)
    add_controlnet_routes(app, service)
    add_info_routes(app, service, cmd_flags)
    add_progress_routes(app, service)
    add_lora_routes(app, app.state.loras)
    if comfy is not None:
        from .comfy.frontend import add_frontend_routes
        from .comfy.routes import add_comfy_routes

        add_comfy_routes(app, service, comfy)
        add_frontend_routes(app, comfy.folders)  # last: its static folders must not shadow the routes above
    return app


def _add_generation_routes(app: Any, service: Service, counters: Metrics) -> None:
    """``txt2img`` and ``img2img``: payload -> request -> service -> A1111 response (or an error body)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def generate(request: Request, endpoint: str, img2img: bool) -> Any:
        begin = time.perf_counter()
        try:
            try:
                payload = parse_json_body(await request.body())  # bounded: see limits.parse_json_body
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from None
            req = parse_request(payload, img2img=img2img, limits=request.app.state.limits)
            req = resolve_tags(req, request.app.state.loras)
            check_overrides(payload, (await server_options(request.app, service)).refusal, OWN_OVERRIDES)
            checkpoints = request.app.state.checkpoints
            req = req.with_checkpoint(request_checkpoint(payload, checkpoints))
            if req.controls:  # the units' models resolved before queueing, so a wrong name fails fast
                req = replace(req, controls=resolve_units(req.controls, req.checkpoint.controlnets))
            keep_checkpoint(payload, checkpoints, req.checkpoint)
            gen = await service.generate(req)
        except ServeError as exc:
            counters.observe(endpoint, exc.status, time.perf_counter() - begin, error=exc.kind)
            headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
            return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status, headers=headers)
        seconds = time.perf_counter() - begin
        note_generation(len(gen.images), gen.model_name)
        counters.observe(endpoint, 200, seconds, images=len(gen.images), cache_interval=gen.cache_interval)
        return JSONResponse(response_body(req, gen))

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> Any:
        return await generate(request, "txt2img", img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> Any:
        return await generate(request, "img2img", img2img=True)


def _add_status_routes(app: Any, service: Service, counters: Metrics) -> None:
    """Samplers, the model, health and Prometheus metrics."""
    from fastapi.responses import PlainTextResponse

    @app.get("/sdapi/v1/samplers")
    async def list_samplers() -> Any:
        return samplers()

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> Any:  # A1111's list of script titles: clients look for the ControlNet extension here
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> Any:
        return upscalers_body()

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes() -> Any:
        return latent_modes_body()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> Any:
        return sd_models_body(app.state.checkpoints)

    @app.get("/health")
    async def health() -> Any:
        stats = await service.stats()
        return health_body(await service.model(), stats, len(app.state.checkpoints.items))

    @app.get("/metrics")
    async def prometheus() -> Any:
        stats = await service.stats()
        return PlainTextResponse(
            counters.render(stats.queued, stats.running, stats.capacity),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )
