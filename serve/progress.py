"""A1111's progress, interrupt and skip: the state of the running request and the three routes over it.

``JobState`` is what A1111 keeps in ``shared.state``, for one pipeline: the pipeline thread writes it (``begin``,
``next_call``, ``on_step``, ``end``), the HTTP handlers read it (``progress_body``) or raise its flags
(``interrupt``, ``skip``). It is also the pipeline's ``cancel`` (``is_set``), read between denoising steps only.
As in A1111:

- ``/interrupt`` ends the running request: its pipeline call stops before the next step, its images are decoded
  from the latents as they are, no further ``n_iter`` call runs, and the request answers 200 with the images of
  the calls that ran (the last one partly denoised).
- ``/skip`` ends the current pipeline call the same way (its images are kept) and the next ``n_iter`` call runs.
- Both act on the running request only: the flags are cleared when a request begins, so queued requests run as
  usual and an interrupt while nothing runs has no effect. A call that holds several merged requests ends for
  all of them.
- After a request, ``state`` keeps its last ``job_no``/``sampling_step`` and the ``interrupted``/``skipped``
  flags until the next request begins (A1111 resets ``sampling_step`` to 0 there).
"""

from __future__ import annotations

import base64
import datetime
import threading
import time
from typing import Any

import torch

from sdtrt.runtime.images import latents_to_rgb, png_bytes

from .errors import ServeError, error_body

PREVIEW_WATCH_S = 30.0  # a preview request keeps latents copied between steps this long


class NotSupported(ServeError):
    """The deployment cannot do what the endpoint asks (HTTP 501)."""

    status = 501
    kind = "not_supported"


class JobState:
    """The running request's progress and its interrupt/skip flags, shared by the pipeline thread and the server.

    ``rgb_map`` is the model's latent preview map (``runtime.images.latent_rgb_map``), for ``current_image``.
    """

    def __init__(self, rgb_map: torch.Tensor | None = None) -> None:
        self.rgb_map = rgb_map
        self._lock = threading.Lock()
        self.job, self.job_count, self.job_no = "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.interrupted = self.skipped = False
        self.job_timestamp, self.time_start = "0", 0.0
        self._latents: torch.Tensor | None = None  # the first image's latents at the last step, on the CPU
        self._preview_until = 0.0  # monotonic time until which a client watches previews

    # -- written by the worker and the pipeline thread ------------------------------------------------------
    def begin(self, job: str, calls: int, steps: int) -> None:
        """A request of ``calls`` pipeline calls (``n_iter``) of ``steps`` steps starts; clears the flags of the
        request before."""
        with self._lock:
            self.job, self.job_count, self.job_no = job, calls, 0
            self.sampling_step, self.sampling_steps = 0, steps
            self.interrupted = self.skipped = False
            self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
            self.time_start, self._latents = time.time(), None

    def next_call(self, index: int) -> bool:
        """Before pipeline call ``index``: clears ``skipped``; False once the request is interrupted (the first
        call always runs, so a request always has images: with the flag already set, it runs no step)."""
        with self._lock:
            if index > 0 and self.interrupted:
                return False
            self.skipped = False
            self.job_no, self.sampling_step = index, 0
            if self.job_count > 1:
                self.job = f"Batch {index + 1} out of {self.job_count}"
            return True

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        """The pipeline's callback, between steps. Copies latents for a preview only while a client asks for one
        (a device-to-host copy per step otherwise costs the GPU path a sync for nothing)."""
        watched = time.monotonic() < self._preview_until
        copy = latents[:1].to("cpu", torch.float32, copy=True) if watched else None
        with self._lock:
            self.sampling_step, self.sampling_steps = step + 1, total
            if copy is not None:
                self._latents = copy

    def end(self) -> None:
        with self._lock:
            self.job, self.job_count = "", 0

    def is_set(self) -> bool:
        """The pipeline's cancel: the current call should stop (skipped or interrupted)."""
        return self.interrupted or self.skipped

    # -- set and read by the HTTP handlers ------------------------------------------------------------------
    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def state(self) -> dict[str, Any]:
        """A1111's ``state`` object of ``/progress``."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def progress_body(self, skip_current_image: bool = False) -> dict[str, Any]:
        """``/sdapi/v1/progress`` as A1111 computes it; ``current_image`` is a latent preview (latent size, the
        model's fitted colour map) while a request runs, once a step has run after a request asked for one."""
        if not skip_current_image:
            self._preview_until = time.monotonic() + PREVIEW_WATCH_S
        with self._lock:
            state, latents, started = self.state(), self._latents, self.time_start
        if state["job_count"] == 0:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        done = state["job_no"] / state["job_count"]
        if state["sampling_steps"] > 0:
            done += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
        progress = 0.01 + done  # A1111's offset: never 0 while running, and no division by 0 below
        elapsed = time.time() - started
        image = None
        if latents is not None and not skip_current_image:
            image = base64.b64encode(png_bytes(latents_to_rgb(latents, self.rgb_map)[0])).decode("ascii")
        return {
            "progress": min(progress, 1.0),
            "eta_relative": elapsed / progress - elapsed,
            "state": state,
            "current_image": image,
            "textinfo": f"step {state['sampling_step']} of {state['sampling_steps']}",
        }


def add_progress_routes(app: Any, service: Any) -> None:
    """``GET /sdapi/v1/progress``, ``POST /sdapi/v1/interrupt`` and ``POST /sdapi/v1/skip`` over ``service``
    (its ``progress(skip_current_image)``, ``interrupt()`` and ``skip()``); a ``ServeError`` becomes its
    status with the ``{"error", "detail"}`` body."""
    from fastapi.responses import JSONResponse

    async def answer(call: Any, *args: Any) -> Any:
        try:
            return await call(*args)
        except ServeError as exc:
            return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> Any:
        return await answer(service.progress, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> Any:
        out = await answer(service.interrupt)
        return {} if out is None else out  # A1111 answers {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> Any:
        return await answer(service.skip)  # A1111 answers null


__all__ = ["JobState", "NotSupported", "add_progress_routes"]
