"""The same HTTP API as a Ray Serve application: a FastAPI ingress over replicas that open models on demand.

    sdtrt serve ARTIFACTS --ray --replicas 2                 # local Ray (started here), 2 replicas on the CPU
    sdtrt serve MODELS --ray --max-loaded 2                  # a folder of artifact folders: several models
    sdtrt serve ARTIFACTS --ray --ray-address auto --gpus-per-replica 1 --min-replicas 1 --max-replicas 8

Layout: ``Ingress`` serves ``app.create_app`` (the very routes of the plain server) with a ``Service`` that
forwards each request to the ``Replica`` deployment through its handle. ``ARTIFACTS`` is one artifact (or engine)
folder, or a folder of them (the checkpoints ``/sdapi/v1/sd-models`` lists). Which model a request runs on is
Ray Serve's model multiplexing: the ingress sends each request with its model's folder as the multiplexed model
id; Ray routes it to a replica that has that model open when one has, and the replica opens it on demand
(``@serve.multiplexed``), keeping at most ``max_loaded`` open and evicting the least recently used first (see
``ray_replica`` for how an evicted model is closed). So a switch (``POST /sdapi/v1/options``) only selects the
model: the next request's replica opens it. A replica runs its models on its device (``num_gpus`` per replica on
a GPU cluster, ``num_cpus`` on the CPU) and takes requests through ``@serve.batch``, whose batches Ray splits by
model id: requests for one model that arrive within ``batch_wait_s`` and share a ``generate.merge_key`` (txt2img,
same model, size, steps, guidance, sampler, negative prompt, ControlNet units, step caching and clip skip) run as
one pipeline call up to the artifact's batch limit, each with its own prompt and seeds, so a request's image does
not depend on what it was batched with.
Replicas autoscale between ``min_replicas`` and ``max_replicas`` on ongoing requests per replica; a deployment
whose queue is full answers 429 (Ray's back-pressure), like the plain server.
The replicas apply the step-caching default (``cache_interval``, ``cache_schedule``) and the clip-skip default
(``clip_skip``) to requests that do not choose their own, as the plain server does.

Progress, interrupt and skip: ``/progress`` reports the requests in flight through this ingress (``job_count``)
but no step progress, which lives in whichever replica runs a request; ``/interrupt`` and ``/skip`` answer 501
(an HTTP call reaches one replica picked by Ray, not the one running the request, and a merged batch holds several
clients' requests). The plain server supports all three.

Engines reach every node as files: the artifact (or engine) folders must be at the same path on every node (a
shared folder), or built on each node from the same artifact (engine folders are keyed by GPU and TensorRT
version, so a per-node ``sdtrt build`` into the same path reuses what matches).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sdtrt.runtime.deps import require
from sdtrt.runtime.request import random_seed

from .a1111 import GenerateRequest, Generation
from .errors import GenerationFailed, Overloaded, RequestError
from .loras import LoraLibrary
from .models import Checkpoint, Checkpoints
from .progress import NotSupported
from .ray_replica import RayConfig, ReplicaCore, ReplicaModel
from .service import ModelCard, ServiceStats

__all__ = ["HandleService", "RayConfig", "ReplicaCore", "build_app", "run"]

log = logging.getLogger(__name__)


class HandleService:
    """The ``Service`` of the Ray ingress: every call goes to the replica deployment's handle, with the request's
    model folder as Ray's multiplexed model id.

    The handle is looked up by name in the ingress replica's own process (the app and its service are copied
    there by Ray, so a handle set on this object in the driver would not arrive). It has no ``load``: a switch
    selects the model in ``checkpoints`` (the app's own), and the replica that gets the next request opens it.
    """

    def __init__(
        self, app_name: str, capacity: int, clip_skip: int = 1, checkpoints: Checkpoints | None = None,
        max_loaded: int = 1,
    ) -> None:  # fmt: skip
        self.app_name, self.capacity = app_name, capacity
        self.clip_skip = clip_skip  # the replicas' default, as GET /options reports it
        self.checkpoints = checkpoints  # the app's: its current model is the one requests without their own run on
        self.max_loaded = max_loaded  # per replica, as GET /options reports it (sd_checkpoints_limit)
        self._handle: Any = None
        self._in_flight = 0  # requests forwarded to the replicas and not answered yet
        self._started = 0.0  # when the in-flight count last rose from 0

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Replica", app_name=self.app_name)
        return self._handle

    def _current(self) -> Checkpoint:
        if self.checkpoints is None:
            raise RuntimeError("HandleService was built without the app's checkpoints")
        return self.checkpoints.current

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerateRequest) -> Generation:
        from ray.serve.exceptions import BackPressureError

        if request.checkpoint is None:
            request = request.with_checkpoint(self._current())
        if request.seed is None:
            request = request.with_seed(random_seed())
        if self._in_flight == 0:
            self._started = time.time()
        self._in_flight += 1
        try:
            handle = self.handle.options(multiplexed_model_id=request.checkpoint.folder)
            result = await handle.generate.remote(request)
        except BackPressureError:
            raise Overloaded("every replica's queue is full; retry later or add replicas", 1) from None
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def model(self) -> ModelCard:
        """The current model's card, from a replica that has it open if one has (Ray routes by model id), else
        from its folder; asking opens nothing."""
        current = self._current()
        return await self.handle.options(multiplexed_model_id=current.folder).model.remote(current)

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
    checkpoints = Checkpoints(config.artifacts)  # one object: the app selects in it, the service reads it
    service = HandleService(config.app_name, config.max_queued_requests, config.clip_skip, checkpoints,
                            config.max_loaded)  # fmt: skip
    loras = LoraLibrary(config.lora_dir)
    app = create_app(service, checkpoints, cmd_flags=flags, limits=config.limits, loras=loras)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replica: Any) -> None:
            self.replica = replica  # bound so that Ray deploys the replicas with the ingress

    return Ingress.bind(replica_deployment(config).bind())


def deployment_options(config: RayConfig) -> dict[str, Any]:
    """The ``serve.deployment`` options of the replicas: resources, queue bounds, a fixed count or autoscaling."""
    actor: dict[str, float] = {"num_cpus": config.cpus_per_replica}
    if config.gpus_per_replica:
        actor["num_gpus"] = config.gpus_per_replica
    replicas: dict[str, Any] = {"num_replicas": config.min_replicas}
    if config.min_replicas != config.max_replicas:
        replicas = {"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                           "target_ongoing_requests": config.target_ongoing_requests}}  # fmt: skip
    return {"ray_actor_options": actor, "max_ongoing_requests": max(2, 2 * (config.max_batch or 4)),
            "max_queued_requests": config.max_queued_requests, **replicas}  # fmt: skip


def replica_deployment(config: RayConfig) -> Any:
    """The ``Replica`` deployment: a ``ReplicaCore`` whose models Ray Serve multiplexes (``max_loaded`` per
    replica) and whose requests arrive in ``@serve.batch`` batches (one model per batch: Ray splits them by id)."""
    from ray import serve

    @serve.deployment(**deployment_options(config))
    class Replica:
        def __init__(self) -> None:
            name = serve.get_replica_context().replica_id.unique_id
            self.core = ReplicaCore(config, name)
            self.generate.set_max_batch_size(self.core.max_batch)

        @serve.multiplexed(max_num_models_per_replica=config.max_loaded)
        async def get_model(self, model_id: str) -> ReplicaModel:
            """Open the model in folder ``model_id`` on the pipeline thread (after the call running there)."""
            return await asyncio.get_running_loop().run_in_executor(self.core.executor, self.core.open, model_id)

        async def held(self, model_id: str) -> ReplicaModel:
            """The model, opened if needed and held for one call (so that no eviction closes it under the call)."""
            for _ in range(3):  # an evicted model is out of Ray's cache before it closes: asking again opens it
                model = await self.get_model(model_id)
                if model.acquire():
                    return model
            raise GenerationFailed(f"model {model_id} was closed each time it was opened; retry")

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=config.batch_wait_s)
        async def generate(self, requests: list[GenerateRequest]) -> list[Generation | Exception]:
            model_id = serve.get_multiplexed_model_id() or requests[0].checkpoint.folder
            try:
                model = await self.held(model_id)
            except RequestError as exc:
                return [exc] * len(requests)
            except Exception as exc:  # a model that cannot open: the plain server's 500
                log.exception("opening %s failed", model_id)
                failed = GenerationFailed(f"the model in {model_id} could not be opened: {exc}")
                return [failed] * len(requests)
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.core.executor, self.core.run, requests, model)
            finally:
                model.release()

        async def model(self, checkpoint: Checkpoint) -> ModelCard:
            return self.core.card(checkpoint)

        async def models(self) -> dict[str, Any]:
            """This replica's open models and its recent opens and closes (``ReplicaCore.status``)."""
            return self.core.status()

        async def memory(self) -> dict[str, Any]:
            from .a1111_info import memory_body

            return memory_body()

    return Replica


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
