"""The ``Service`` protocol: what the HTTP layer needs from whatever runs the engines.

The plain server's service is ``worker.LocalWorker`` (one pipeline, one thread); a Ray Serve deployment can pass
any object with these async methods (e.g. one that forwards to a deployment handle) to ``app.create_app``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .a1111 import GenerateRequest, Generation


@dataclass(frozen=True)
class ModelCard:
    """The loaded model as ``/sdapi/v1/sd-models`` describes it."""

    name: str
    sha256: str
    filename: str
    default_sampler: str  # sdtrt scheduler name
    max_batch: int
    backend: str = ""
    device: str = ""
    controlnets: tuple[str, ...] = ()  # the artifact's ControlNet names (``/controlnet/model_list``)


@dataclass(frozen=True)
class ServiceStats:
    """Queue state, read by ``/health`` and ``/metrics``."""

    queued: int
    running: int
    capacity: int


@runtime_checkable
class Service(Protocol):
    async def start(self) -> None:
        """Called once by the app's lifespan before the first request."""

    async def stop(self) -> None:
        """Called once at shutdown, after the HTTP server stopped taking requests."""

    async def generate(self, request: GenerateRequest) -> Generation:
        """Run one request; raise ``RequestError``, ``Overloaded``, ``TimedOut`` or ``GenerationFailed``."""
        ...

    async def model(self) -> ModelCard: ...

    async def stats(self) -> ServiceStats: ...

    async def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """A1111's ``/progress`` body (see ``progress.JobState``)."""
        ...

    async def interrupt(self) -> None:
        """End the running request between two steps; raise ``progress.NotSupported`` where it cannot."""

    async def skip(self) -> None:
        """End the running request's current pipeline call (the next ``n_iter`` call runs)."""
