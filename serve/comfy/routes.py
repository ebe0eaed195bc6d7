"""ComfyUI's HTTP routes and websocket on ``sdtrt serve``: ``add_comfy_routes(app, worker, settings)``.

Every route is also under ``/api/`` (the web frontend calls those): ``/prompt``, ``/queue``, ``/interrupt``,
``/history``, ``/view``, ``/upload/image``, ``/object_info``, ``/system_stats``, ``/embeddings``, ``/models``,
``/extensions`` and the ``/ws`` websocket. Bodies are ComfyUI's; errors are 400 with ComfyUI's error object
``{"type", "message", "details", "extra_info"}`` (``/prompt`` adds ``node_errors``), 404 for a file or model folder
that is not there, 503 when the server's queue is full. The queue and its messages are ``jobs``'s.

No annotations future-import here: FastAPI reads the handlers' annotations at runtime.
"""

import math
import uuid
from dataclasses import dataclass
from typing import Any

from sdtrt.runtime.errors import ConfigError
from sdtrt.serve.errors import Overloaded, RequestError
from sdtrt.serve.limits import parse_json_body

from .folders import ComfyFolders
from .info import MODEL_FOLDERS, folder_files, system_stats
from .jobs import PREVIEW_METHODS, SECRET_KEYS, ComfyJobs, QueueItem
from .messages import MAX_CLIENT_ID, Clients
from .uploads import MAX_UPLOAD_MB, UploadError, parse_multipart, save_upload
from .view import Refused, view_response

PROMPT_FIELDS = ("prompt", "prompt_id", "client_id", "extra_data", "number", "front", "partial_execution_targets")


@dataclass(frozen=True)
class ComfySettings:
    """Where ComfyUI's files live and the protocol's bounds (``sdtrt serve --comfy-*``)."""

    folders: ComfyFolders
    max_history: int = 200  # prompts kept in /history, the oldest dropped first
    preview_method: str = "none"  # previews of prompts whose extra_data.preview_method is absent or "default"
    max_nodes: int = 500  # nodes per graph
    max_prompt_mb: float = 8.0  # a POST /prompt body
    max_upload_mb: float = MAX_UPLOAD_MB  # a POST /upload/image body

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ConfigError(f"--comfy-history must be >= 1, got {self.max_history}")
        if self.preview_method not in PREVIEW_METHODS:
            raise ConfigError(f"--comfy-preview-method must be one of {', '.join(PREVIEW_METHODS)}, "
                              f"got {self.preview_method!r}")  # fmt: skip
        for name in ("max_nodes", "max_prompt_mb", "max_upload_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def error_object(kind: str, message: str, details: str = "") -> dict[str, Any]:
    """ComfyUI's error object."""
    return {"type": kind, "message": message, "details": details or message, "extra_info": {}}


def add_comfy_routes(
    app: Any, worker: Any, settings: ComfySettings, library: Any = None, executor: Any = None
) -> ComfyJobs:
    """Add ComfyUI's routes to ``app``, running prompts on ``worker`` (a ``LocalWorker``); ``library``: the nodes
    (default: ``nodes.NodeLibrary`` over the app's checkpoints and LoRAs), ``executor``: the interpreter (default:
    ``graph.GraphExecutor``). Returns the queue (also ``app.state.comfy_jobs``)."""
    from .graph import GraphExecutor
    from .nodes import NodeLibrary

    settings.folders.create()
    library = library or NodeLibrary(app.state.checkpoints, app.state.loras, settings.folders)
    jobs = ComfyJobs(worker, executor or GraphExecutor(library), None, settings.max_history, settings.preview_method)
    features = {"supports_preview_metadata": False, "max_upload_size": int(settings.max_upload_mb * 1e6)}
    jobs.clients = Clients(jobs.status_for, jobs.reconnect_messages, features)
    app.state.comfy_jobs, app.state.comfy_settings = jobs, settings
    _add_queue_routes(app, jobs, library, settings)
    _add_file_routes(app, settings)
    _add_info_routes(app, worker, library)
    return jobs


def _route(app: Any, path: str, methods: list[str]) -> Any:
    """A decorator adding a handler at ``path`` and at ``/api`` + ``path``."""

    def add(handler: Any) -> Any:
        app.add_api_route(path, handler, methods=methods, include_in_schema=False)
        app.add_api_route("/api" + path, handler, methods=methods, include_in_schema=False)
        return handler

    return add


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _refusal(exc: Exception, kind: str = "invalid_request", status: int = 400, prompt: bool = False) -> Any:
    body: dict[str, Any] = {"error": error_object(getattr(exc, "kind", kind), str(exc))}
    if prompt:
        body["node_errors"] = {}
    return _json(body, status)


async def _read_body(request: Any, max_bytes: int, what: str) -> bytes:
    """The request body, refused (``Refused``) past ``max_bytes`` without reading the rest."""
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise Refused("body_too_large", f"the {what} body is larger than {max_bytes / 1e6:g} MB; send less")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Any, max_bytes: int, what: str, empty: Any = ...) -> Any:
    data = await _read_body(request, max_bytes, what)
    if not data.strip() and empty is not ...:
        return empty
    try:
        return parse_json_body(data)
    except RequestError as exc:
        raise Refused("invalid_json", str(exc)) from None


def _add_queue_routes(app: Any, jobs: ComfyJobs, library: Any, settings: ComfySettings) -> None:
    from fastapi import Request, WebSocket
    from fastapi.responses import Response

    from .graph import PromptError

    @_route(app, "/prompt", ["POST"])
    async def post_prompt(request: Request) -> Any:
        jobs.clients.bind()
        try:
            payload = await _json_body(request, int(settings.max_prompt_mb * 1e6), "/prompt")
            item = check_prompt(payload, jobs, library, settings)
            jobs.put(item)
        except PromptError as exc:
            return _json(exc.body(), 400)
        except Refused as exc:
            return _refusal(exc, prompt=True)
        except Overloaded as exc:
            body = {"error": error_object("queue_full", str(exc)), "node_errors": {}}
            return _json(body, 503, {"Retry-After": str(exc.retry_after)})
        return _json({"prompt_id": item.prompt_id, "number": item.number, "node_errors": {}})

    @_route(app, "/prompt", ["GET"])
    async def get_prompt() -> Any:
        return _json(jobs.status_for()["status"])

    @_route(app, "/queue", ["GET"])
    async def get_queue() -> Any:
        return _json(jobs.queue_body())

    @_route(app, "/queue", ["POST"])
    async def post_queue(request: Request) -> Any:
        try:
            clear, delete = _clear_delete(await _json_body(request, 1 << 20, "/queue"), "/queue")
        except Refused as exc:
            return _refusal(exc)
        if clear:
            jobs.clear()
        if delete:
            jobs.delete(delete)
        return Response(status_code=200)

    _add_history_routes(app, jobs)

    async def websocket(ws: WebSocket) -> None:
        client_id = ws.query_params.get("clientId") or None
        if client_id is not None and len(client_id) > MAX_CLIENT_ID:
            await ws.close(code=1008, reason=f"clientId is longer than {MAX_CLIENT_ID} characters")
            return
        await jobs.clients.serve(ws, client_id)

    app.add_api_websocket_route("/ws", websocket)
    app.add_api_websocket_route("/api/ws", websocket)


def _add_history_routes(app: Any, jobs: ComfyJobs) -> None:
    from fastapi import Request
    from fastapi.responses import Response

    @_route(app, "/interrupt", ["POST"])
    async def post_interrupt(request: Request) -> Any:
        try:
            payload = await _json_body(request, 1 << 16, "/interrupt", empty={})
            prompt_id = payload.get("prompt_id") if isinstance(payload, dict) else None
            if not isinstance(payload, dict) or set(payload) - {"prompt_id"} or not isinstance(prompt_id, str | None):
                raise Refused("invalid_request", 'expected an empty body or {"prompt_id": "..."}')
        except Refused as exc:
            return _refusal(exc)
        jobs.interrupt(prompt_id)
        return Response(status_code=200)

    @_route(app, "/history", ["GET"])
    async def get_history(request: Request) -> Any:
        try:
            max_items = _int_param(request, "max_items", 0)
            offset = _int_param(request, "offset", -1)
        except Refused as exc:
            return _refusal(exc)
        return _json(jobs.history(max_items=max_items, offset=-1 if offset is None else offset))

    @_route(app, "/history/{prompt_id}", ["GET"])
    async def get_history_item(prompt_id: str) -> Any:
        return _json(jobs.history(prompt_id))

    @_route(app, "/history", ["POST"])
    async def post_history(request: Request) -> Any:
        try:
            clear, delete = _clear_delete(await _json_body(request, 1 << 20, "/history"), "/history")
        except Refused as exc:
            return _refusal(exc)
        if clear:
            jobs.clear_history()
        if delete:
            jobs.delete_history(delete)
        return Response(status_code=200)


def check_prompt(payload: Any, jobs: ComfyJobs, library: Any, settings: ComfySettings) -> QueueItem:
    """A ``POST /prompt`` body as a queue item: fields checked, graph validated (``PromptError``), ids given."""
    import time

    from .graph import validate_prompt

    if not isinstance(payload, dict):
        raise Refused("invalid_request", f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(PROMPT_FIELDS))
    if unknown:
        raise Refused(
            "invalid_request", f"unknown field(s) {', '.join(unknown)}; /prompt takes {', '.join(PROMPT_FIELDS)}"
        )
    if "prompt" not in payload:
        raise Refused("no_prompt", "No prompt provided")
    prompt_id = _prompt_id(payload.get("prompt_id"), jobs)
    client_id = payload.get("client_id")
    if client_id is not None and not (isinstance(client_id, str) and len(client_id) <= MAX_CLIENT_ID):
        raise Refused("invalid_request", f"client_id must be a string of at most {MAX_CLIENT_ID} characters")
    extra = _extra_data(payload.get("extra_data", {}))
    targets = payload.get("partial_execution_targets")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise Refused("invalid_request", "partial_execution_targets must be a list of output node ids")
    number = _number(payload, jobs)
    outputs = validate_prompt(payload["prompt"], library, max_nodes=settings.max_nodes)
    if targets is not None:
        missing = [t for t in targets if t not in outputs]
        if missing:
            raise Refused("invalid_request", f"partial_execution_targets {missing} are not output nodes of the prompt "
                          f"(its output nodes: {outputs})")  # fmt: skip
        outputs = [o for o in outputs if o in targets]
    if client_id is not None:
        extra["client_id"] = client_id
    extra["create_time"] = int(time.time() * 1000)
    return QueueItem(number, prompt_id, payload["prompt"], extra, list(outputs))


def _prompt_id(value: Any, jobs: ComfyJobs) -> str:
    if value is None:
        return str(uuid.uuid4())
    try:
        valid = isinstance(value, str) and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        valid = False
    if not valid:
        raise Refused("invalid_prompt_id", f"prompt_id must be a UUID like {uuid.uuid4()}, got {value!r}; "
                      "leave it out to get one")  # fmt: skip
    if jobs.known(value):
        raise Refused("invalid_prompt_id", f"prompt_id {value} is already queued or running; use a new UUID")
    return value


def _extra_data(extra: Any) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise Refused("invalid_request", f"extra_data must be a JSON object, got {type(extra).__name__}")
    method = extra.get("preview_method", "default")
    if method not in ("default", *PREVIEW_METHODS):
        raise Refused("invalid_request", f"extra_data.preview_method must be one of default, "
                      f"{', '.join(PREVIEW_METHODS)}, got {method!r}")  # fmt: skip
    return {k: v for k, v in extra.items() if k not in SECRET_KEYS}


def _number(payload: dict[str, Any], jobs: ComfyJobs) -> float:
    front = payload.get("front", False)
    if not isinstance(front, bool):
        raise Refused("invalid_request", f"front must be true or false, got {front!r}")
    if "number" not in payload:
        return jobs.next_number(front)
    number = payload["number"]
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise Refused("invalid_request", f"number must be a finite number, got {number!r}")
    return float(number)


def _clear_delete(payload: Any, where: str) -> tuple[bool, list[str]]:
    if not isinstance(payload, dict) or set(payload) - {"clear", "delete"}:
        raise Refused("invalid_request", f'{where} takes {{"clear": true}} and/or {{"delete": [ids]}}')
    clear, delete = payload.get("clear", False), payload.get("delete", [])
    if not isinstance(clear, bool) or not (isinstance(delete, list) and all(isinstance(i, str) for i in delete)):
        raise Refused("invalid_request", f"{where}: clear must be true/false and delete a list of prompt ids")
    return clear, delete


def _int_param(request: Any, name: str, minimum: int) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise Refused("invalid_request", f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _add_file_routes(app: Any, settings: ComfySettings) -> None:
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    from sdtrt.serve.limits import Limits

    limits = getattr(app.state, "limits", None) or Limits()

    @_route(app, "/view", ["GET"])
    async def view(request: Request) -> Any:
        try:
            return await run_in_threadpool(view_response, dict(request.query_params), settings.folders)
        except Refused as exc:
            return _refusal(exc, status=404 if exc.kind == "not_found" else 400)

    @_route(app, "/upload/image", ["POST"])
    async def upload_image(request: Request) -> Any:
        max_bytes = int(settings.max_upload_mb * 1e6)
        try:
            body = await _read_body(request, max_bytes, "upload")
            parts = parse_multipart(request.headers.get("content-type", ""), body)
            answer = await run_in_threadpool(save_upload, parts, settings.folders, limits.max_image_pixels)
        except Refused as exc:
            return _refusal(exc)
        except UploadError as exc:
            return _refusal(exc, "invalid_upload")
        return _json(answer)


def _add_info_routes(app: Any, worker: Any, library: Any) -> None:
    @_route(app, "/object_info", ["GET"])
    async def object_info() -> Any:
        return _json(library.object_info())

    @_route(app, "/object_info/{node_class}", ["GET"])
    async def object_info_node(node_class: str) -> Any:
        info = library.object_info()
        return _json({node_class: info[node_class]} if node_class in info else {})

    @_route(app, "/system_stats", ["GET"])
    async def stats() -> Any:
        card = await worker.model()
        return _json(system_stats(card.device))

    @_route(app, "/embeddings", ["GET"])
    async def embeddings() -> Any:
        return _json([])  # sdtrt's engines take no textual-inversion embeddings

    @_route(app, "/extensions", ["GET"])
    async def extensions() -> Any:
        return _json([])  # no frontend extensions: sdtrt has no custom nodes with web parts

    @_route(app, "/models", ["GET"])
    async def models() -> Any:
        return _json(list(MODEL_FOLDERS))

    @_route(app, "/models/{folder}", ["GET"])
    async def model_files(folder: str) -> Any:
        files = folder_files(library.object_info(), folder)
        if files is None:
            message = f"no model folder {folder!r}; the folders are {', '.join(MODEL_FOLDERS)}"
            return _json({"error": error_object("not_found", message)}, 404)
        return _json(files)
