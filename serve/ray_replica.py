"""One replica of the Ray Serve deployment, without Ray: its settings (``RayConfig``), the models it holds open
(``ReplicaModel``) and how it runs a batch of requests on one of them (``ReplicaCore``).

Which models a replica keeps open is Ray Serve's model multiplexing (``ray_app``: at most ``max_loaded``, the least
recently used evicted first); a ``ReplicaModel`` is what it keeps. Ray evicts a model by calling its ``__del__``
from a thread of the event loop's default executor, and opens the next model only once that has returned: so
``close`` waits until no call runs on the model, then closes its pipeline on the replica's pipeline thread, and the
memory is free before the next model opens. A call never runs on a closed pipeline: each call holds the model
(``acquire``/``release``) from the moment the event loop gets it until the pipeline thread is done with it.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdtrt.runtime.cache_plan import check_cache_args
from sdtrt.runtime.errors import ConfigError, SdtrtError

from .a1111 import GenerateRequest, Generation
from .caching import CacheDefaults
from .clipskip import check_clip_skip_default
from .errors import GenerationFailed, RequestError
from .limits import Limits
from .loras import check_lora_dir
from .models import Checkpoint, Checkpoints, check_defaults, check_max_loaded, scan
from .service import ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    """The deployment's settings (``sdtrt serve --ray``); ``artifacts``: one artifact folder or a folder of them."""

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
    max_loaded: int = 1  # models each replica keeps open (Ray Serve's max_num_models_per_replica)

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
        check_max_loaded(self.max_loaded)

    @property
    def cache(self) -> CacheDefaults:
        """The step-caching default of the replicas."""
        return CacheDefaults(self.cache_interval, self.cache_schedule)

    def check_artifact(self) -> None:
        """``ArtifactError``/``ConfigError`` before Ray or any engine starts, if ``artifacts`` holds no model or a
        model that cannot run the caching or clip-skip default (every model is checked, as the plain server does)."""
        for checkpoint in scan(Path(self.artifacts)):
            self.check_model(checkpoint.folder)

    def check_model(self, folder: str) -> None:
        """``ArtifactError``/``ConfigError`` if the model in ``folder`` cannot run the caching or clip-skip default."""
        check_defaults(folder, self.cache, self.clip_skip)


class ReplicaModel:
    """One model open on a replica: its checkpoint, pipeline and batch limit.

    ``acquire``/``release`` bracket every call on it; ``close`` (``__del__``: how Ray evicts it) waits until no
    call holds it, then closes the pipeline on the replica's pipeline thread. It can be closed more than once.
    """

    def __init__(self, core: ReplicaCore, checkpoint: Checkpoint, pipe: Any, max_batch: int) -> None:
        self.checkpoint, self.max_batch = checkpoint, max_batch
        # weak: the core holds its models, and a cycle's collection would end the pipeline thread before this
        # model's close could hand its work to it
        self._core = weakref.ref(core)
        self._pipe = pipe
        self._calls = 0
        self._idle = threading.Condition()

    @property
    def folder(self) -> str:
        return self.checkpoint.folder

    @property
    def pipe(self) -> Any:
        """The open pipeline (``RuntimeError`` once closed)."""
        if self._pipe is None:
            raise RuntimeError(f"model {self.checkpoint.title} is closed")
        return self._pipe

    @property
    def closed(self) -> bool:
        return self._pipe is None

    def acquire(self) -> bool:
        """Hold the model for one call (False, and not held, if it is closed already)."""
        with self._idle:
            if self._pipe is None:
                return False
            self._calls += 1
            return True

    def release(self) -> None:
        """End a call that ``acquire`` began."""
        with self._idle:
            self._calls -= 1
            self._idle.notify_all()

    def close(self) -> None:
        """Wait for the calls on it to end, then close the pipeline (its memory is released when this returns)."""
        with self._idle:
            self._idle.wait_for(lambda: self._calls == 0)
            pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        core = self._core()
        if core is not None:
            core.close_pipeline(self, pipe)
        else:  # the replica is gone, and its pipeline thread with it
            pipe.close()

    def __del__(self) -> None:
        self.close()


class ReplicaCore:
    """What one replica does, without Ray: open models (``open``, on its pipeline thread) and run batches of
    requests, each batch on one model (``run``), mergeable requests as one pipeline call.

    Without Ray (``run(requests)`` with no model) the core keeps one model of its own open, the one the requests
    name (the current model for requests that name none); ``pipe`` is its pipeline, ``close`` closes it.
    """

    def __init__(self, config: RayConfig, name: str = "") -> None:
        from sdtrt.runtime.manifest import read_manifest

        config.check_artifact()
        self.config, self.name = config, name
        self.checkpoints = Checkpoints(config.artifacts)
        # @serve.batch takes one limit for every model: the largest; each model's own bounds its merged calls
        limits = [read_manifest(c.folder).profile.max_batch for c in self.checkpoints.items]
        self.max_batch = config.max_batch or max(limits)
        self.events: deque[tuple[str, str]] = deque(maxlen=1000)  # ("open" | "close", model name), in order
        self._open: dict[str, ReplicaModel] = {}
        self._lock = threading.Lock()
        self._own: ReplicaModel | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-replica")
        self._thread = self.executor.submit(threading.get_ident).result()  # the pipeline thread

    def checkpoint(self, folder: str) -> Checkpoint:
        """The server's model in ``folder`` (rescanned once if not listed: it may have been added since);
        ``RequestError`` if there is none."""
        for attempt in range(2):
            found = [c for c in self.checkpoints.items if c.folder == folder]
            if found:
                return found[0]
            if attempt == 0:
                self.checkpoints.refresh()
        raise RequestError(f"{folder} is not a model of this server (not a subfolder of {self.config.artifacts})")

    def open(self, folder: str) -> ReplicaModel:
        """Open the model in ``folder`` (its absolute path: the multiplexed model id); run on the pipeline thread."""
        from sdtrt.runtime.engine import BackendOptions
        from sdtrt.runtime.pipeline import Pipeline

        checkpoint = self.checkpoint(folder)
        try:  # a model added since start-up (refresh-checkpoints) must run the defaults too
            self.config.check_model(folder)
        except SdtrtError as exc:
            raise RequestError(str(exc)) from None
        options = BackendOptions(spin=False)  # as the plain server: spinning threads took its event loop's cores
        pipe = Pipeline.from_artifacts(folder, backend=self.config.backend, device=self.config.device, options=options)
        model = ReplicaModel(self, checkpoint, pipe, self.config.max_batch or pipe.manifest.profile.max_batch)
        with self._lock:
            self._open[folder] = model
            self.events.append(("open", checkpoint.name))
            count = len(self._open)
        log.info("replica %s: model %s opened (%d open)", self.name, checkpoint.title, count)
        return model

    def close_pipeline(self, model: ReplicaModel, pipe: Any) -> None:
        """Close ``model``'s pipeline on the pipeline thread (``ReplicaModel.close`` calls this, once)."""

        def close() -> None:
            pipe.close()
            gc.collect()  # the engines' buffers go now: the next model needs the room
            with self._lock:
                if self._open.get(model.folder) is model:
                    del self._open[model.folder]
                self.events.append(("close", model.checkpoint.name))
                count = len(self._open)
            log.info("replica %s: model %s closed (%d open)", self.name, model.checkpoint.title, count)

        if threading.get_ident() == self._thread:
            close()
            return
        try:
            self.executor.submit(close).result()
        except RuntimeError:  # the executor has shut down: no call can run any more
            close()

    def status(self) -> dict[str, Any]:
        """This replica's name, its open models and its last 1000 opens and closes, in order."""
        with self._lock:
            return {"replica": self.name, "open": [m.checkpoint.name for m in self._open.values()],
                    "events": list(self.events)}  # fmt: skip

    def card(self, checkpoint: Checkpoint) -> ModelCard:
        """``checkpoint``'s card: from its pipeline if this replica has it open, else from its folder."""
        from sdtrt.serve.generate import model_card

        with self._lock:
            model = self._open.get(checkpoint.folder)
            if model is not None and model.acquire():
                try:
                    return model_card(model.pipe, checkpoint.name, model.max_batch)
                finally:
                    model.release()
        return ModelCard(checkpoint.name, checkpoint.sha256, checkpoint.folder, "", 0, self.config.backend,
                         self.config.device or "", checkpoint.controlnets)  # fmt: skip

    def run(self, requests: list[GenerateRequest], model: ReplicaModel | None = None) -> list[Generation | Exception]:
        """Run a batch of requests on ``model`` (held by the caller), in this thread: mergeable ones together, the
        others one by one; a request for another model is refused. Without ``model``: on the core's own."""
        if model is None:
            return self._run_own(requests)
        requests = [r if r.checkpoint is not None else r.with_checkpoint(model.checkpoint) for r in requests]
        requests = [r.with_cache_defaults(self.config.cache).with_clip_skip(self.config.clip_skip) for r in requests]
        results: dict[int, Generation | Exception] = {}
        groups: dict[Any, list[int]] = {}
        for index, request in enumerate(requests):
            error = self._check(model, request)
            if error is not None:
                results[index] = error
                continue
            groups.setdefault(self._key(request, index), []).append(index)
        for key, members in groups.items():
            for chunk in self._chunks(requests, key, members, model.max_batch):
                for index, value in zip(chunk, self._call(model, [requests[i] for i in chunk]), strict=True):
                    results[index] = replace(value, served_by=self.name) if isinstance(value, Generation) else value
        return [results[i] for i in range(len(requests))]

    @staticmethod
    def _check(model: ReplicaModel, request: GenerateRequest) -> Exception | None:
        from sdtrt.serve.generate import check_request

        assert request.checkpoint is not None
        if request.checkpoint.folder != model.folder:  # never two models in one call
            return GenerationFailed(
                f"a request for model {request.checkpoint.title} reached a call on {model.checkpoint.title}"
            )
        try:
            check_request(model.pipe, request)
        except RequestError as exc:
            return exc
        return None

    @staticmethod
    def _key(request: GenerateRequest, index: int) -> Any:
        from sdtrt.serve.generate import merge_key

        key = merge_key(request)
        return key if key is not None else ("alone", index)

    @staticmethod
    def _chunks(requests: list[GenerateRequest], key: Any, members: list[int], limit: int) -> list[list[int]]:
        """``members`` (one merge key) cut into pipeline calls of at most ``limit`` images."""
        chunks: list[list[int]] = []
        for index in members:
            size = requests[index].batch_size
            if chunks and key[0] != "alone" and sum(requests[i].batch_size for i in chunks[-1]) + size <= limit:
                chunks[-1].append(index)
            else:
                chunks.append([index])
        return chunks

    @staticmethod
    def _call(model: ReplicaModel, chunk: list[GenerateRequest]) -> list[Generation | Exception]:
        """One pipeline call (or a request alone); its failure is each request's answer."""
        from sdtrt.serve.generate import run_merged, run_request

        name = chunk[0].checkpoint.name if chunk[0].checkpoint else model.checkpoint.name  # as the request chose it
        try:
            if len(chunk) == 1:
                return [run_request(model.pipe, chunk[0], name)]
            return list(run_merged(model.pipe, chunk, name))
        except SdtrtError as exc:
            return [RequestError(str(exc))] * len(chunk)
        except Exception as exc:  # a failure inside the engines: report it, keep serving
            log.exception("generation failed")
            return [GenerationFailed(f"generation failed: {exc}")] * len(chunk)

    # -- without Ray -------------------------------------------------------------------------------------------
    def _run_own(self, requests: list[GenerateRequest]) -> list[Generation | Exception]:
        """``run`` without Ray: the requests of each model on the core's own model (one open at a time)."""
        current = self.checkpoints.current
        by_model: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_model.setdefault((request.checkpoint or current).folder, []).append(index)
        results: dict[int, Generation | Exception] = {}
        for folder, members in by_model.items():
            model = self._own_model(folder)
            model.acquire()
            try:
                out = self.run([requests[i] for i in members], model)
            finally:
                model.release()
            results.update(zip(members, out, strict=True))
        return [results[i] for i in range(len(requests))]

    def _own_model(self, folder: str) -> ReplicaModel:
        if self._own is not None and (self._own.folder != folder or self._own.closed):
            self._own.close()
            self._own = None
        if self._own is None:
            self._own = self.open(folder)
        return self._own

    @property
    def pipe(self) -> Any:
        """The pipeline of the core's own model (the current model's, opened now if none is open)."""
        if self._own is None or self._own.closed:
            return self._own_model(self.checkpoints.current.folder).pipe
        return self._own.pipe

    def close(self) -> None:
        """Close the core's own model."""
        if self._own is not None:
            self._own.close()
            self._own = None
