"""``LocalWorker``: one pipeline, a bounded asyncio queue, and one thread that runs requests in order.

The pipeline is not thread-safe, so every call runs on the same single-thread executor. A full queue raises
``Overloaded`` with a Retry-After estimated from recent latency; a request still queued after ``timeout`` seconds
raises ``TimedOut``; a request that has started always runs to the end.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdtrt.runtime.errors import ConfigError, SdtrtError, ShapeError
from sdtrt.runtime.images import a1111_parameters
from sdtrt.runtime.schedulers import A1111_LABELS
from sdtrt.runtime.specs import check_size

from .a1111 import GenerateRequest, Generation, random_seed
from .errors import GenerationFailed, Overloaded, RequestError, TimedOut
from .service import ModelCard, ServiceStats

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: GenerateRequest
    future: asyncio.Future[Generation]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    abandoned: bool = False


def check_request(pipe: Any, request: GenerateRequest) -> tuple[int, int]:
    """Raise ``RequestError`` (the library's message) unless ``pipe`` can run ``request``; return (height, width)."""
    profile, model = pipe.manifest.profile, pipe.manifest.model
    height = request.height or profile.opt_height
    width = request.width or profile.opt_width
    try:
        check_size(height, width, model)
        profile.check(height, width, request.batch_size)
    except ShapeError as exc:
        raise RequestError(str(exc)) from None
    if request.img2img and "vae_encoder" not in pipe.engines:
        raise RequestError("img2img needs the vae_encoder component; export it with --components ...,vae_encoder")
    return height, width


def run_request(pipe: Any, request: GenerateRequest, model_name: str) -> Generation:
    """Run ``request`` (seed resolved) on ``pipe``: ``n_iter`` calls of ``batch_size`` images, seeds consecutive."""
    from PIL import Image

    assert request.seed is not None
    image = Image.open(io.BytesIO(request.init_image)).convert("RGB") if request.init_image else None
    start = time.perf_counter()
    rows: list[tuple[Any, int, str, str]] = []
    settings: dict[str, Any] = {}
    for i in range(request.n_iter):
        result = pipe(
            request.prompt,
            negative_prompt=request.negative_prompt or None,  # as `sdtrt generate` without --negative
            steps=request.steps,
            guidance_scale=request.cfg_scale,
            seed=request.seed + i * request.batch_size,
            height=request.height,
            width=request.width,
            scheduler=request.sampler,
            num_images=request.batch_size,
            image=image,
            strength=request.denoising_strength,
        )
        settings = result.settings
        rows += zip(result.images, result.seeds, result.prompts, result.negative_prompts, strict=True)
    return make_generation(pipe, request, rows, settings, model_name, time.perf_counter() - start)


def make_generation(
    pipe: Any,
    request: GenerateRequest,
    rows: list[tuple[Any, int, str, str]],
    settings: dict[str, Any],
    model_name: str,
    seconds: float,
) -> Generation:
    """A ``Generation`` of (image, seed, prompt, negative) rows: PNGs with A1111's ``parameters`` text."""
    model_hash = str(pipe.manifest.source.get("sha256", ""))
    extra = [("Denoising strength", f"{request.denoising_strength:g}")] if request.img2img else []
    gen: dict[str, list[Any]] = {"images": [], "seeds": [], "prompts": [], "negatives": [], "infotexts": []}
    for img, seed, prompt, negative in rows:
        text = a1111_parameters(
            prompt,
            request.negative_prompt,
            request.steps,
            A1111_LABELS[str(settings["scheduler"])],
            request.cfg_scale,
            seed,
            int(settings["width"]),
            int(settings["height"]),
            model_hash=model_hash,
            model_name=model_name,
            extra=extra,
        )
        gen["images"].append(_png(img, text))
        gen["seeds"].append(seed)
        gen["prompts"].append(prompt)
        gen["negatives"].append(negative)
        gen["infotexts"].append(text)
    return Generation(
        gen["images"],
        gen["seeds"],
        gen["prompts"],
        gen["negatives"],
        gen["infotexts"],
        str(settings["scheduler"]),
        request.steps,
        request.cfg_scale,
        int(settings["width"]),
        int(settings["height"]),
        model_name,
        model_hash,
        seconds,
    )


def merge_key(request: GenerateRequest) -> tuple[Any, ...] | None:
    """Requests with equal keys can run as one pipeline call (their own prompts and seeds); None: never merged."""
    if request.img2img or request.n_iter != 1:
        return None
    return (request.negative_prompt, request.steps, request.cfg_scale, request.width, request.height, request.sampler)


def run_merged(pipe: Any, requests: list[GenerateRequest], model_name: str) -> list[Generation]:
    """Run txt2img requests with one ``merge_key`` as one pipeline call: each keeps its prompt and seeds."""
    first = requests[0]
    prompts = [r.prompt for r in requests for _ in range(r.batch_size)]
    seeds = [int(r.seed or 0) + k for r in requests for k in range(r.batch_size)]
    start = time.perf_counter()
    result = pipe(
        prompts,
        negative_prompt=first.negative_prompt or None,
        steps=first.steps,
        guidance_scale=first.cfg_scale,
        seed=seeds,
        height=first.height,
        width=first.width,
        scheduler=first.sampler,
    )
    seconds = time.perf_counter() - start
    rows = list(zip(result.images, result.seeds, result.prompts, result.negative_prompts, strict=True))
    out, offset = [], 0
    for r in requests:
        out.append(make_generation(pipe, r, rows[offset : offset + r.batch_size], result.settings, model_name, seconds))
        offset += r.batch_size
    return out


def _png(image: Any, parameters: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class LocalWorker:
    """A ``Service`` over one in-process ``Pipeline``; call ``start`` inside the event loop that serves."""

    def __init__(self, pipe: Any, model_name: str, queue_size: int = 16, timeout: float = 60.0) -> None:
        if queue_size < 1:
            raise ConfigError(f"queue size must be >= 1, got {queue_size}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        self.pipe, self.model_name = pipe, model_name
        self.queue_size, self.timeout = queue_size, timeout
        self._queue: asyncio.Queue[_Job] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-pipeline")
        self._running = 0
        self._latency: deque[float] = deque(maxlen=16)  # seconds per request that ran

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
        m = self.pipe.manifest
        return ModelCard(
            self.model_name,
            str(m.source.get("sha256", "")),
            str(self.pipe.folder),
            self.pipe.default_scheduler,
            m.profile.max_batch,
            self.pipe.backend,
            str(self.pipe.device),
        )

    async def stats(self) -> ServiceStats:
        return ServiceStats(self._queue.qsize() if self._queue else 0, self._running, self.queue_size)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: recent mean latency times the requests ahead."""
        mean = sum(self._latency) / len(self._latency) if self._latency else 1.0
        ahead = (self._queue.qsize() if self._queue else 0) + self._running
        return max(1, math.ceil(mean * max(1, ahead) / self.queue_size))

    async def generate(self, request: GenerateRequest) -> Generation:
        if self._queue is None:
            raise RuntimeError("LocalWorker.start() was not called")
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
                try:
                    gen = await loop.run_in_executor(
                        self._executor, run_request, self.pipe, job.request, self.model_name
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
                self._running = 0
                self._queue.task_done()
