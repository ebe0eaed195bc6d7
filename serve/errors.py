"""Errors of the serving layer; each carries the HTTP status the API answers with."""

from __future__ import annotations

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


def error_body(kind: str, message: str) -> dict[str, str]:
    """The JSON body of an error answer: {"error": kind, "detail": message}."""
    return {"error": kind, "detail": message}
