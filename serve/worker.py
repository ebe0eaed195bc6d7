"""``LocalWorker``: one pipeline, a bounded asyncio queue, and one thread that runs requests in order.

What a request does on the pipeline is ``generate``'s; this module is the queue around it.

The pipeline is not thread-safe, so every call runs on the same single-thread executor. A full queue raises
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdtrt.runtime.errors import ConfigError, SdtrtError, ShapeError
from sdtrt.runtime.images import latent_rgb_map
from sdtrt.runtime.request import random_seed
from sdtrt.serve.a1111 import GenerateRequest, Generation
from sdtrt.serve.caching import CacheDefaults
from sdtrt.serve.errors import GenerationFailed, Overloaded, RequestError, TimedOut
from sdtrt.serve.generate import check_request, model_card, pipeline_calls, run_request
from sdtrt.serve.progress import JobState
from sdtrt.serve.service import ModelCard, ServiceStats

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: GenerateRequest
    future: asyncio.Future[Generation]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    abandoned: bool = False


class LocalWorker:
    """A ``Service`` over one in-process ``Pipeline``; call ``start`` inside the event loop that serves.

    ``cache`` is the step caching of requests that do not choose their own (default: none), ``clip_skip`` their
    clip skip (default 1: the last layer).
    """

    def __init__(
        self,
        pipe: Any,
        model_name: str,
        queue_size: int = 16,
        timeout: float = 60.0,
        cache: CacheDefaults | None = None,
        clip_skip: int = 1,
    ) -> None:
        if queue_size < 1:
            raise ConfigError(f"queue size must be >= 1, got {queue_size}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        self.pipe, self.model_name = pipe, model_name
        self.queue_size, self.timeout = queue_size, timeout
        self.cache = cache or CacheDefaults()
        self.clip_skip = clip_skip  # for requests that set no override_settings.CLIP_stop_at_last_layers
        self._queue: asyncio.Queue[_Job] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-pipeline")
        self._running = 0
        self._latency: deque[float] = deque(maxlen=16)  # seconds per request that ran
        self.job = JobState(latent_rgb_map(pipe.manifest))

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._consumer = asyncio.create_task(self._consume(), name="sdtrt-worker")

    async def stop(self) -> None:
        """Let queued requests finish, then close the pipeline."""
        if self._queue is not None:
            await self._queue.join()
        if self._consumer is not None:
            self._consumer.cancel()
        self._executor.shutdown(wait=True)
        self.pipe.close()

    async def model(self) -> ModelCard:
        return model_card(self.pipe, self.model_name)

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
        if self._queue is None:
            raise RuntimeError("LocalWorker.start() was not called")
        request = request.with_cache_defaults(self.cache).with_clip_skip(self.clip_skip)
        check_request(self.pipe, request)
        if request.seed is None:
            request = request.with_seed(random_seed())
        job = _Job(request, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(
                f"the queue is full ({self.queue_size} requests waiting); retry later or start the server "
                "with a larger --queue",
                self.retry_after(),
            ) from None
        done, _ = await asyncio.wait({job.future}, timeout=self.timeout)
        if not done and not job.started:
            job.abandoned = True
            raise TimedOut(
                f"the request waited {self.timeout:g} s in the queue without starting; the server is busy, "
                "retry later (or raise --timeout)"
            )
        return await job.future

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
                kind = "scripts_img2img" if job.request.img2img else "scripts_txt2img"
                self.job.begin(kind, len(pipeline_calls(self.pipe, job.request)), job.request.steps)
                try:
                    gen = await loop.run_in_executor(
                        self._executor, run_request, self.pipe, job.request, self.model_name, self.job
                    )
                except (ConfigError, ShapeError) as exc:
                    job.future.set_exception(RequestError(str(exc)))
                except SdtrtError as exc:
                    job.future.set_exception(GenerationFailed(str(exc)))
                except Exception as exc:  # a bug or an engine failure: answer 500 and keep serving
                    log.exception("request failed")
                    job.future.set_exception(GenerationFailed(f"{type(exc).__name__}: {exc}"))
                else:
                    job.future.set_result(gen)
                self._latency.append(time.perf_counter() - begin)
            finally:
                self.job.end()
                self._running = 0
                self._queue.task_done()
