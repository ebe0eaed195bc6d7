"""What one HTTP request may cost the server, and what it leaves in the log.

``Limits`` bounds a request before any work: the body size (413, checked from ``Content-Length`` before the body
is read and counted while a chunked body arrives), prompt lengths in characters, images per request, and images
sent as base64 (their text length, and their pixels read from the header before decoding: decompression bombs).
``install(app, limits)`` puts the body limit, one log line per request (INFO; successful /health and /metrics
probes, and static files under ``app.state.quiet_prefixes`` (the web UI's), at DEBUG) with a request id (also sent
back as ``X-Request-ID`` and in error bodies), and the ``{"error", "detail"}`` form of every error (404 and 405
included) on a FastAPI app. ``parse_json_body`` bounds what parsing a body may cost.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from sdtrt.runtime.errors import ConfigError

from .errors import REQUEST, RequestError, RequestRecord, error_body

log = logging.getLogger("sdtrt.serve")

PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
PROBES = ("/health", "/metrics")  # logged at DEBUG when they succeed
_FLAGS = ("max_body_mb", "max_prompt_chars", "max_images")
_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")
HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (``sdtrt serve --max-body-mb/--max-prompt-chars/--max-images``)."""

    max_body_mb: float = 32.0
    max_prompt_chars: int = 20_000
    max_images: int = 16  # batch_size x n_iter
    max_image_pixels: int = 4096 * 4096  # of each image sent (init image, ControlNet hint), read from its header
    max_image_mb: float = 24.0  # of each image's base64 text

    def __post_init__(self) -> None:
        for name in ("max_body_mb", "max_prompt_chars", "max_images", "max_image_pixels", "max_image_mb"):
            if not getattr(self, name) > 0:  # the first three are `sdtrt serve` flags: name them as such
                shown = "--" + name.replace("_", "-") if name in _FLAGS else name
                raise ConfigError(f"{shown} must be > 0, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_image_chars(self) -> int:
        return int(self.max_image_mb * 2**20)


def check_prompts(payload: dict[str, Any], limits: Limits) -> None:
    """``RequestError`` if a prompt field is longer than ``limits.max_prompt_chars`` characters."""
    for name in PROMPT_FIELDS:
        value = payload.get(name)
        if isinstance(value, str) and len(value) > limits.max_prompt_chars:
            raise RequestError(
                f"{name} has {len(value)} characters; at most {limits.max_prompt_chars} are accepted (the model "
                "reads only the first few hundred tokens); shorten it, or start the server with a larger "
                "--max-prompt-chars"
            )


def check_image_count(batch_size: int, n_iter: int, limits: Limits) -> None:
    """``RequestError`` if ``batch_size x n_iter`` exceeds ``limits.max_images``."""
    if batch_size * n_iter > limits.max_images:
        raise RequestError(
            f"batch_size x n_iter = {batch_size} x {n_iter} = {batch_size * n_iter} images; at most "
            f"{limits.max_images} per request: send fewer (or several requests), or start the server with a "
            "larger --max-images"
        )


def check_image_size(size: tuple[int, int], where: str, limits: Limits) -> None:
    """``RequestError`` if an image of ``size`` (width, height, from its header) has too many pixels."""
    width, height = size
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"{where} is {width}x{height} = {width * height} pixels; at most {limits.max_image_pixels} are "
            "accepted; send a smaller image (the model works at its profile's sizes anyway)"
        )


def check_image_text(text: str, where: str, limits: Limits) -> None:
    """``RequestError`` if a base64 image's text is longer than ``limits.max_image_chars``."""
    if len(text) > limits.max_image_chars:
        raise RequestError(
            f"{where} is {len(text)} characters of base64; at most {limits.max_image_chars} are accepted; "
            "send a smaller (or compressed: PNG, JPEG, WebP) image"
        )


def prompt_warnings(tokenizer: Any, max_windows: int, prompts: dict[str, str]) -> list[str]:
    """One line per prompt (name -> text) that ``tokenizer`` cuts to ``max_windows`` windows (bounded work)."""
    from sdtrt.runtime.prompts import WINDOW, truncation_message

    lines = []
    for name, text in prompts.items():
        bounded = tokenizer.bounded_ids(text, max_windows * WINDOW)
        if bounded.truncated:
            lines.append(f"{name} {truncation_message(bounded, max_windows)}")
    return lines


class BodyTooLarge(Exception):
    """A chunked body grew past the limit while it was read."""


class RequestMiddleware:
    """ASGI middleware: the body limit, the request id, one log line per request, and a JSON 500 for a bug."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        given = _header(scope, b"x-request-id")  # a proxy's (Ray Serve sets one) or a client's id is kept
        if given and len(given) <= 64 and _ID_CHARS.fullmatch(given):
            record.request_id = given
        token = REQUEST.set(record)
        begin, state = time.perf_counter(), {"status": 0}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            length = _content_length(scope)
            if length is not None and length > self.limits.max_body_bytes:
                await self._too_large(send_with_id, f"{length} bytes")
            else:
                await self.app(scope, self._counted(receive), send_with_id)
        except BodyTooLarge:
            if not state["status"]:
                await self._too_large(send_with_id, "a chunked body past that")
        except Exception as exc:  # a bug: answer 500 in the documented form and keep serving
            log.exception("request %s failed", record.request_id)
            if not state["status"]:
                await _send_json(send_with_id, 500, error_body("internal", f"{type(exc).__name__}: {exc}"))
        finally:
            _log_request(scope, state["status"], time.perf_counter() - begin, record)
            REQUEST.reset(token)

    def _counted(self, receive: Any) -> Any:
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_body_bytes:
                    raise BodyTooLarge
            return message

        return counted

    async def _too_large(self, send: Any, found: str) -> None:
        detail = (
            f"the request body is larger than this server's limit of {self.limits.max_body_mb:g} MB (got {found}); "
            "send smaller images or prompts, or start the server with a larger --max-body-mb"
        )
        await _send_json(send, 413, error_body("body_too_large", detail), close=True)


def install(app: Any, limits: Limits) -> None:
    """Add the request middleware and the ``{"error", "detail"}`` handlers for HTTP and validation errors."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def http_error(request: Any, exc: HTTPException) -> Any:
        kind = HTTP_KINDS.get(exc.status_code, f"http_{exc.status_code}")
        detail = _http_detail(request, exc)
        return JSONResponse(error_body(kind, detail), status_code=exc.status_code, headers=exc.headers)

    async def invalid(request: Any, exc: RequestValidationError) -> Any:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]]
        return JSONResponse(error_body("invalid_request", "; ".join(parts) or "invalid request"), status_code=422)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_middleware(RequestMiddleware, limits=limits)


def _http_detail(request: Any, exc: Any) -> str:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return f"no such endpoint: {where}; the A1111 API is under /sdapi/v1 (the list is at /docs)"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"{where} is not allowed; this endpoint takes {allowed or 'another method'}"
    return f"{where}: {exc.detail}"


def _header(scope: dict[str, Any], wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return None


def _content_length(scope: dict[str, Any]) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def _send_json(send: Any, status: int, body: dict[str, str], close: bool = False) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _log_request(scope: dict[str, Any], status: int, seconds: float, record: RequestRecord) -> None:
    line = "%s %s %d %.0f ms images=%d model=%s id=%s"
    args: tuple[Any, ...] = (scope.get("method", "-"), scope.get("path", "-"), status, seconds * 1000)
    args += (record.images, record.model, record.request_id)
    if record.error:
        line, args = line + " error=%s", (*args, record.error)
    level = logging.ERROR if status >= 500 else logging.INFO
    path = scope.get("path") or ""
    quiet = getattr(getattr(scope.get("app"), "state", None), "quiet_prefixes", ())
    if status < 400 and (path in PROBES or path.startswith(tuple(quiet))):
        level = logging.DEBUG  # probes come every few seconds, a page of the web UI loads ~270 files: noise
    log.log(level, line, *args)


def note_generation(images: int, model: str) -> None:
    """Record what the request being answered generated, for its log line."""
    record = REQUEST.get()
    if record is not None:
        record.images, record.model = images, model


# A1111's txt2img/img2img request fields: ``parameters`` echoes these (as A1111's schema does), not whatever else
# a body carries; images sent (init images, masks) are echoed as None.
A1111_FIELDS = frozenset(
    "prompt negative_prompt styles seed subseed subseed_strength seed_resize_from_h seed_resize_from_w sampler_name "
    "sampler_index scheduler batch_size n_iter steps cfg_scale distilled_cfg_scale width height restore_faces tiling "
    "do_not_save_samples do_not_save_grid eta denoising_strength s_min_uncond s_churn s_tmax s_tmin s_noise "
    "override_settings override_settings_restore_afterwards refiner_checkpoint refiner_switch_at "
    "disable_extra_networks firstpass_image comments enable_hr firstphase_width firstphase_height hr_scale "
    "hr_upscaler hr_second_pass_steps hr_resize_x hr_resize_y hr_checkpoint_name hr_additional_modules "
    "hr_sampler_name hr_scheduler hr_prompt hr_negative_prompt hr_cfg hr_distilled_cfg force_task_id script_name "
    "script_args send_images save_images alwayson_scripts infotext init_images resize_mode image_cfg_scale mask "
    "mask_blur_x mask_blur_y mask_blur mask_round inpainting_fill inpaint_full_res inpaint_full_res_padding "
    "inpainting_mask_invert initial_noise_multiplier latent_mask include_init_images".split()
)
SENT_IMAGES = ("init_images", "mask", "latent_mask", "firstpass_image")


def echoed(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a request body ``parameters`` repeats: A1111's fields and sdtrt's own, sent images as None."""
    echo = {k: v for k, v in payload.items() if k in A1111_FIELDS or k.startswith("sdtrt_")}
    echo.update({k: None for k in SENT_IMAGES if k in echo})
    return echo


MAX_JSON_CONTAINERS = 100_000  # objects and arrays in one body: A1111 bodies hold a few dozen


def parse_json_body(data: bytes) -> Any:
    """A request body as JSON; ``RequestError`` if it is not JSON, nests too deep, or holds so many objects and
    arrays that parsing it would cost many times its size in memory (``[{},{},...]``: ~70 bytes per 3 sent)."""
    import json

    containers = data.count(b"{") + data.count(b"[")  # an upper bound (brackets inside strings count too)
    if containers > MAX_JSON_CONTAINERS:
        raise RequestError(
            f"the request body holds {containers} JSON objects/arrays (or brackets); at most {MAX_JSON_CONTAINERS} "
            "are accepted; send the A1111 fields only"
        )
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("the request body nests JSON arrays/objects too deep; send the A1111 fields only") from None
