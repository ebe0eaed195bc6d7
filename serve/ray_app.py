"""The same HTTP API as a Ray Serve application: a FastAPI ingress over replicas that each hold one pipeline.

    sdtrt serve ARTIFACTS --ray --replicas 2                 # local Ray (started here), 2 replicas on the CPU
    sdtrt serve ARTIFACTS --ray --ray-address auto --gpus-per-replica 1 --min-replicas 1 --max-replicas 8

Layout: ``Ingress`` serves ``app.create_app`` (the very routes of the plain server) with a ``Service`` that
forwards each request to the ``Replica`` deployment through its handle. A replica opens one ``Pipeline`` on its
device (``num_gpus`` per replica on a GPU cluster, ``num_cpus`` on the CPU) and takes requests through
``@serve.batch``: those that arrive within ``batch_wait_s`` and share a ``generate.merge_key`` (txt2img, same size,
steps, guidance, sampler, negative prompt, ControlNet units, step caching and clip skip) run as one pipeline call up
to the artifact's batch limit, each with its own prompt and seeds, so a request's image does not depend on what it was
batched with.
Replicas autoscale between ``min_replicas`` and ``max_replicas`` on ongoing requests per replica; a deployment
whose queue is full answers 429 (Ray's back-pressure), like the plain server.
The replicas apply the step-caching default (``cache_interval``, ``cache_schedule``) and the clip-skip default
(``clip_skip``) to requests that do not choose their own, as the plain server does.

Progress, interrupt and skip: ``/progress`` reports the requests in flight through this ingress (``job_count``)
but no step progress, which lives in whichever replica runs a request; ``/interrupt`` and ``/skip`` answer 501
(an HTTP call reaches one replica picked by Ray, not the one running the request, and a merged batch holds several
clients' requests). The plain server supports all three.

Engines reach every node as files: the artifact (or engine) folder must be at the same path on every node (a
shared folder), or built on each node from the same artifact (engine folders are keyed by GPU and TensorRT
version, so a per-node ``sdtrt build`` into the same path reuses what matches).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from sdtrt.runtime.cache_plan import check_cache_args
from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ConfigError, SdtrtError
from sdtrt.runtime.request import random_seed

from .a1111 import GenerateRequest, Generation
from .caching import CacheDefaults
from .clipskip import check_clip_skip_default
from .errors import GenerationFailed, Overloaded, RequestError
from .limits import Limits
from .loras import LoraLibrary, check_lora_dir
from .models import Checkpoints
from .progress import NotSupported
from .service import ModelCard, ServiceStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    """The deployment's settings (``sdtrt serve --ray``)."""

    artifacts: str
    backend: str = "onnxruntime"
    device: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_batch: int = 0  # 0: the artifact's batch limit
    batch_wait_s: float = 0.01
    max_queued_requests: int = 16
    app_name: str = "sdtrt"  # the Ray Serve application name (serve.run(..., name=app_name))
    cache_interval: int = 1  # step caching of requests that do not choose: a full UNet step every N
    cache_schedule: str = "uniform"
    clip_skip: int = 1  # for requests without override_settings.CLIP_stop_at_last_layers
    limits: Limits = Limits()  # the same request bounds as the plain server, applied by the ingress
    lora_dir: str | None = None  # the LoRAs prompt tags name: read by the ingress, files opened by the replicas
    max_loaded: int = 1  # models a replica keeps open (``artifacts`` may be a folder of artifact folders)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"replicas must satisfy 1 <= min <= max, got min {self.min_replicas}, max {self.max_replicas}"
            )
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0 or self.batch_wait_s < 0:
            raise ConfigError("gpus/cpus per replica and the batch wait must be >= 0")
        if self.max_queued_requests < 1:
            raise ConfigError(f"the queue must hold at least 1 request, got {self.max_queued_requests}")
        check_cache_args(self.cache_interval, self.cache_schedule)
        check_clip_skip_default(self.clip_skip)
        check_lora_dir(self.lora_dir)

    @property
    def cache(self) -> CacheDefaults:
        """The step-caching default of the replicas."""
        return CacheDefaults(self.cache_interval, self.cache_schedule)

    def check_artifact(self) -> None:
        """``ArtifactError``/``ConfigError`` before Ray or any engine starts, if the artifact cannot run the caching
        or clip-skip default."""
        from sdtrt.runtime.clip_skip import check_clip_skip
        from sdtrt.runtime.manifest import read_manifest

        manifest = read_manifest(self.artifacts)
        self.cache.check_artifact(manifest.components, f"the artifact {self.artifacts}")
        check_clip_skip(manifest.model, self.clip_skip)


class ReplicaCore:
    """What one replica does, without Ray: one pipeline, one thread, merged batches (tested on its own too)."""

    def __init__(self, config: RayConfig, name: str = "") -> None:
        from pathlib import Path

        from sdtrt.runtime.manifest import model_display_name
        from sdtrt.runtime.pipeline import Pipeline

        self.config = config
        self.name = name
        config.check_artifact()
        self.pipe = Pipeline.from_artifacts(config.artifacts, backend=config.backend, device=config.device)
        self.model_name = model_display_name(self.pipe.manifest, fallback=Path(config.artifacts).name)
        self.max_batch = config.max_batch or self.pipe.manifest.profile.max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-replica")

    def run(self, requests: list[GenerateRequest]) -> list[Generation | Exception]:
        """Run a batch of requests (in this thread): mergeable ones together, the others one by one."""
        from sdtrt.serve.generate import check_request, merge_key, run_merged, run_request

        results: dict[int, Generation | Exception] = {}
        groups: dict[Any, list[int]] = {}
        requests = [r.with_cache_defaults(self.config.cache).with_clip_skip(self.config.clip_skip) for r in requests]
        for index, request in enumerate(requests):
            try:
                check_request(self.pipe, request)
            except RequestError as exc:
                results[index] = exc
                continue
            key = merge_key(request)
            groups.setdefault(key if key is not None else ("alone", index), []).append(index)
        for key, members in groups.items():
            chunks: list[list[int]] = []
            for index in members:
                size = requests[index].batch_size
                if (
                    chunks
                    and key[0] != "alone"
                    and sum(requests[i].batch_size for i in chunks[-1]) + size <= self.max_batch
                ):
                    chunks[-1].append(index)
                else:
                    chunks.append([index])
            for chunk in chunks:
                try:
                    if len(chunk) == 1:
                        out = [run_request(self.pipe, requests[chunk[0]], self.model_name)]
                    else:
                        out = run_merged(self.pipe, [requests[i] for i in chunk], self.model_name)
                except SdtrtError as exc:
                    out = [RequestError(str(exc))] * len(chunk)
                except Exception as exc:  # a failure inside the engines: report it, keep serving
                    log.exception("generation failed")
                    out = [GenerationFailed(f"generation failed: {exc}")] * len(chunk)
                for index, value in zip(chunk, out, strict=True):
                    results[index] = replace(value, served_by=self.name) if isinstance(value, Generation) else value
        return [results[i] for i in range(len(requests))]

    def card(self) -> ModelCard:
        from sdtrt.serve.generate import model_card

        return model_card(self.pipe, self.model_name, self.max_batch)


class HandleService:
    """The ``Service`` of the Ray ingress: every call goes to the replica deployment's handle.

    The handle is looked up by name in the ingress replica's own process (the app and its service are copied
    there by Ray, so a handle set on this object in the driver would not arrive).
    """

    def __init__(self, app_name: str, capacity: int, clip_skip: int = 1) -> None:
        self.app_name, self.capacity = app_name, capacity
        self.clip_skip = clip_skip  # the replicas' default, as GET /options reports it
        self._handle: Any = None
        self._card: ModelCard | None = None
        self._in_flight = 0  # requests forwarded to the replicas and not answered yet
        self._started = 0.0  # when the in-flight count last rose from 0

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Replica", app_name=self.app_name)
        return self._handle

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerateRequest) -> Generation:
        from ray.serve.exceptions import BackPressureError

        if request.seed is None:
            request = request.with_seed(random_seed())
        if self._in_flight == 0:
            self._started = time.time()
        self._in_flight += 1
        try:
            result = await self.handle.generate.remote(request)
        except BackPressureError:
            raise Overloaded("every replica's queue is full; retry later or add replicas", 1) from None
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def model(self) -> ModelCard:
        if self._card is None:  # every replica serves the same artifact: ask once
            self._card = await self.handle.model.remote()
        return self._card

    async def stats(self) -> ServiceStats:
        return ServiceStats(0, 0, self.capacity)

    async def memory(self) -> dict[str, Any]:
        """``/sdapi/v1/memory`` of the replica that answers (the engines' process), not of the ingress."""
        return await self.handle.memory.remote()

    async def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """``/progress`` from the ingress: idle (progress 0, job_count 0) when nothing is in flight, else the
        number of requests in flight as ``job_count`` and A1111's starting value 0.01, with no step counts."""
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": self._in_flight,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
        if not self._in_flight:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        state["job"] = "ray"
        state["job_timestamp"] = time.strftime("%Y%m%d%H%M%S", time.localtime(self._started))
        textinfo = f"{self._in_flight} request(s) running on the Ray replicas; step progress is not reported"
        return {"progress": 0.01, "eta_relative": 0, "state": state, "current_image": None, "textinfo": textinfo}

    async def interrupt(self) -> None:
        raise NotSupported(
            "/interrupt is not available on the Ray deployment (the request runs on a replica this call cannot "
            "address); serve without --ray to interrupt requests"
        )

    async def skip(self) -> None:
        raise NotSupported(
            "/skip is not available on the Ray deployment (the request runs on a replica this call cannot "
            "address); serve without --ray to skip images"
        )


def build_app(config: RayConfig, **listen: Any) -> Any:
    """The Ray Serve application (``serve.run(build_app(config))``): ingress + autoscaled replicas.
    ``listen`` (host, port, ray_address) completes what ``/sdapi/v1/cmd-flags`` reports."""
    require("ray.serve", "the Ray Serve deployment", "serve-ray")
    from ray import serve

    from .a1111_info import cmd_flags
    from .app import create_app

    config.check_artifact()
    flags = cmd_flags(config, ray=True, **listen)
    service = HandleService(config.app_name, config.max_queued_requests, config.clip_skip)
    loras = LoraLibrary(config.lora_dir)
    app = create_app(service, Checkpoints(config.artifacts), cmd_flags=flags, limits=config.limits, loras=loras)
    actor: dict[str, float] = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica:
        actor["num_gpus"] = config.gpus_per_replica
    replicas: dict[str, Any]
    if config.min_replicas == config.max_replicas:
        replicas = {"num_replicas": config.min_replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        }

    @serve.deployment(
        ray_actor_options=actor,
        max_ongoing_requests=max(2, 2 * (config.max_batch or 4)),
        max_queued_requests=config.max_queued_requests,
        **replicas,
    )
    class Replica:
        def __init__(self) -> None:
            name = serve.get_replica_context().replica_id.unique_id
            self.core = ReplicaCore(config, name)
            self.generate.set_max_batch_size(self.core.max_batch)

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=config.batch_wait_s)
        async def generate(self, requests: list[GenerateRequest]) -> list[Generation | Exception]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.core.executor, self.core.run, requests)

        async def model(self) -> ModelCard:
            return self.core.card()

        async def memory(self) -> dict[str, Any]:
            from .a1111_info import memory_body

            return memory_body()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replica: Any) -> None:
            self.replica = replica  # bound so that Ray deploys the replicas with the ingress

    return Ingress.bind(Replica.bind())


def run(config: RayConfig, host: str, port: int, address: str | None = None, on_ready: Any = None) -> None:
    """Start (or join) Ray, serve the application on ``host:port`` and block until SIGTERM / Ctrl-C."""
    import signal
    import threading

    ray = require("ray", "the Ray Serve deployment", "serve-ray")
    from ray import serve

    config.check_artifact()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(config, host=host, port=port, ray_address=address)
        serve.run(app, route_prefix="/", name=config.app_name)
        if on_ready:
            on_ready(f"http://{host}:{port}")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
