"""Errors of the serving layer; each carries the HTTP status the API answers with. Error bodies carry the id of
the request being answered (``REQUEST``, set by ``limits.RequestMiddleware``)."""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field

from sdtrt.runtime.errors import SdtrtError


class ServeError(SdtrtError):
    """Base class: ``status`` is the HTTP status code, ``kind`` the short name in the error body."""

    status = 500
    kind = "internal"


class RequestError(ServeError):
    """The payload is malformed or asks for something the model cannot do (HTTP 422)."""

    status = 422
    kind = "invalid_request"


class Overloaded(ServeError):
    """The queue is full (HTTP 429); ``retry_after`` is the suggested wait in whole seconds."""

    status = 429
    kind = "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(ServeError):
    """The request waited in the queue longer than the server's timeout (HTTP 503)."""

    status = 503
    kind = "timeout"


class GenerationFailed(ServeError):
    """The pipeline raised while running the request (HTTP 500); the server keeps serving."""

    status = 500
    kind = "generation_failed"


@dataclass
class RequestRecord:
    """What the log line of the request being answered reports; routes fill in ``images`` and ``model``."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    images: int = 0
    model: str = "-"
    error: str = ""


REQUEST: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("sdtrt_request", default=None)


def error_body(kind: str, message: str) -> dict[str, str]:
    """The JSON body of an error answer: {"error": kind, "detail": message, "request_id": id}; the error is also
    noted for the request's log line. No ``request_id`` outside a request (e.g. when called from Python)."""
    body = {"error": kind, "detail": message}
    record = REQUEST.get()
    if record is not None:
        record.error = f"{kind}: {message[:300]}"
        body["request_id"] = record.request_id
    return body
