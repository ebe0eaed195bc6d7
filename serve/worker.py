"""``LocalWorker``: the server's pipelines, a bounded asyncio queue, and one thread that runs requests in order.

What a request does on a pipeline is ``generate``'s; this module is the queue around it. Each request names its
model (``GenerateRequest.checkpoint``, set when it arrives); the pipelines are a ``models.PipelinePool``, so a
request queued for one model runs on that model even when the server's current model changes behind it, and a
model not open is opened when its first request's turn comes (closing the least recently used one if the pool
is full). A switch (``load``) is queued like a request, so it happens in arrival order.

The pipelines are not thread-safe, so every call (and every open and close) runs on the same single-thread
executor. A full queue raises
``Overloaded`` with a Retry-After estimated from recent latency; a request still queued after ``timeout`` seconds
raises ``TimedOut``; a request that has started runs to the end unless interrupted (``/interrupt``: it stops
between two steps and answers with what it has; ``/skip`` ends its current ``n_iter`` call; see ``progress``).
Requests run one at a time here, never merged, so an interrupt reaches exactly one request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sdtrt.runtime.errors import ConfigError, SdtrtError, ShapeError
from sdtrt.runtime.images import latent_rgb_map
from sdtrt.runtime.request import random_seed
from sdtrt.serve.a1111 import GenerateRequest, Generation
from sdtrt.serve.caching import CacheDefaults
from sdtrt.serve.errors import GenerationFailed, Overloaded, RequestError, TimedOut
from sdtrt.serve.generate import check_request, model_card, pipeline_calls, run_request
from sdtrt.serve.models import Checkpoint, Checkpoints, PipelinePool
from sdtrt.serve.progress import JobState
from sdtrt.serve.service import ModelCard, ServiceStats

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Job:
    work: Callable[[], Any]  # run on the pipeline thread: a request, or opening a model
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    abandoned: bool = False


class LocalWorker:
    """A ``Service`` over in-process pipelines (``pool``, of the models ``checkpoints`` lists); call ``start`` inside
    the event loop that serves.

    ``cache`` is the step caching of requests that do not choose their own (default: none), ``clip_skip`` their
    clip skip (default 1: the last layer). A request without a ``checkpoint`` runs on the current model.
    """

    def __init__(
        self,
        checkpoints: Checkpoints,
        pool: PipelinePool,
        queue_size: int = 16,
        timeout: float = 60.0,
        cache: CacheDefaults | None = None,
        clip_skip: int = 1,
    ) -> None:
        if queue_size < 1:
            raise ConfigError(f"queue size must be >= 1, got {queue_size}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        self.checkpoints, self.pool = checkpoints, pool
        self.max_loaded = pool.max_loaded  # as GET /options reports it (sd_checkpoints_limit)
        self.queue_size, self.timeout = queue_size, timeout
        self.cache = cache or CacheDefaults()
        self.clip_skip = clip_skip  # for requests that set no override_settings.CLIP_stop_at_last_layers
        self._queue: asyncio.Queue[_Job] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-pipeline")
        self._running = 0
        self._latency: deque[float] = deque(maxlen=16)  # seconds per request that ran
        self.job = JobState()
        self._last_card: ModelCard | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._consumer = asyncio.create_task(self._consume(), name="sdtrt-worker")

    async def stop(self) -> None:
        """Let queued requests finish, then close the pipelines."""
        if self._queue is not None:
            await self._queue.join()
        if self._consumer is not None:
            self._consumer.cancel()
        self._executor.shutdown(wait=True)
        self.pool.close_all()

    async def model(self) -> ModelCard:
        """The current model's card: from its pipeline when open, else from its folder (no engine details)."""
        current = self.checkpoints.current
        with self.pool.lock:
            pipe = self.pool.peek(current)
            if pipe is not None:
                return model_card(pipe, current.name)
        last = self._last_card
        backend, device = (last.backend, last.device) if last else ("", "")
        return ModelCard(current.name, current.sha256, current.folder, "", 0, backend, device, current.controlnets)

    async def load(self, checkpoint: Checkpoint) -> None:
        """Open ``checkpoint``'s pipeline, after the requests queued before (``sd_model_checkpoint`` switches)."""
        await self._submit(partial(self.pool.get, checkpoint), timeout=None)

    async def stats(self) -> ServiceStats:
        return ServiceStats(self._queue.qsize() if self._queue else 0, self._running, self.queue_size)

    async def progress(self, skip_current_image: bool) -> dict[str, Any]:
        return self.job.progress_body(skip_current_image)

    async def interrupt(self) -> None:
        self.job.interrupt()

    async def skip(self) -> None:
        self.job.skip()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: recent mean latency times the requests ahead."""
        mean = sum(self._latency) / len(self._latency) if self._latency else 1.0
        ahead = (self._queue.qsize() if self._queue else 0) + self._running
        return max(1, math.ceil(mean * max(1, ahead) / self.queue_size))

    async def generate(self, request: GenerateRequest) -> Generation:
        if request.checkpoint is None:
            request = request.with_checkpoint(self.checkpoints.current)
        request = request.with_cache_defaults(self.cache).with_clip_skip(self.clip_skip)
        with self.pool.lock:  # a model already open is checked now; another when it has opened, before it runs
            pipe = self.pool.peek(request.checkpoint)
            if pipe is not None:
                check_request(pipe, request)
        if request.seed is None:
            request = request.with_seed(random_seed())
        return await self._submit(partial(self._run, request, checked=pipe is not None), timeout=self.timeout)

    def submit(self, work: Callable[[PipelinePool], T]) -> asyncio.Future[T]:
        """Queue ``work(pool)`` for the pipeline thread, behind every request queued before it, and return its
        future at once (call inside the serving loop). ``Overloaded`` now if the queue is full. The work is not
        bounded by ``timeout``; it runs even if nobody awaits the future, and ``stop`` waits for it."""
        return self._enqueue(partial(work, self.pool)).future

    async def run(self, work: Callable[[PipelinePool], T]) -> T:
        """``submit(work)`` and wait for its result (what ``work`` raised is raised here)."""
        return await self.submit(work)

    def _enqueue(self, work: Callable[[], Any]) -> _Job:
        if self._queue is None:
            raise RuntimeError("LocalWorker.start() was not called")
        job = _Job(work, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(
                f"the queue is full ({self.queue_size} requests waiting); retry later or start the server "
                "with a larger --queue",
                self.retry_after(),
            ) from None
        return job

    async def _submit(self, work: Callable[[], Any], timeout: float | None) -> Any:
        """Queue ``work`` for the pipeline thread and wait for its result; ``TimedOut`` if it has not started
        after ``timeout`` seconds (None: wait)."""
        job = self._enqueue(work)
        done, _ = await asyncio.wait({job.future}, timeout=timeout)
        if not done and not job.started:
            job.abandoned = True
            raise TimedOut(
                f"the request waited {self.timeout:g} s in the queue without starting; the server is busy, "
                "retry later (or raise --timeout)"
            )
        return await job.future

    def _run(self, request: GenerateRequest, checked: bool) -> Generation:
        """Run ``request`` on its model's pipeline (opened if needed; ``checked``: the request was checked against
        it when it arrived, else it is checked now); on the pipeline thread."""
        assert request.checkpoint is not None
        pipe = self.pool.get(request.checkpoint)
        self._last_card = model_card(pipe, request.checkpoint.name)
        if not checked:
            check_request(pipe, request)
        kind = "scripts_img2img" if request.img2img else "scripts_txt2img"
        self.job.rgb_map = latent_rgb_map(pipe.manifest)
        self.job.begin(kind, len(pipeline_calls(pipe, request)), request.steps)
        return run_request(pipe, request, request.checkpoint.name, self.job)

    async def _consume(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            try:
                if job.abandoned:
                    continue
                job.started = True
                self._running = 1
                begin = time.perf_counter()
                try:
                    result = await loop.run_in_executor(self._executor, job.work)
                except RequestError as exc:  # checked once its model opened
                    job.future.set_exception(exc)
                except (ConfigError, ShapeError) as exc:
                    job.future.set_exception(RequestError(str(exc)))
                except SdtrtError as exc:
                    job.future.set_exception(GenerationFailed(str(exc)))
                except Exception as exc:  # a bug or an engine failure: answer 500 and keep serving
                    log.exception("request failed")
                    job.future.set_exception(GenerationFailed(f"{type(exc).__name__}: {exc}"))
                else:
                    job.future.set_result(result)
                self._latency.append(time.perf_counter() - begin)
            finally:
                self.job.end()
                self._running = 0
                self._queue.task_done()
