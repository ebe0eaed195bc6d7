"""ComfyUI's official web frontend on ``sdtrt serve``: its static files at ``/`` and the endpoints it calls while
it starts.

The frontend is the ``comfyui-frontend-package`` wheel (``pip install "sdtrt[ui]"``); its ``static/`` folder is
served as it is. Besides the protocol's routes (``routes``: ``/prompt``, ``/object_info``, ``/ws``, ...), the
frontend asks for its user's settings and files (``/users``, ``/settings``, ``/userdata``: stored under
``ComfyFolders.root/user/default``, see ``userdata``), server feature flags (``/features``), custom nodes'
translations and node packs' workflow templates (``/i18n``, ``/workflow_templates``: sdtrt has none, so empty),
the templates browser's workflows (``/templates/``: sdtrt's own, see ``templates``), the model folders
(``/experiment/models``) and the jobs list (``/api/jobs``, see ``joblist``). Each route is also under ``/api/``,
as ComfyUI does. Register these after every other route (the frontend's folders are mounted at their own paths).

No annotations future-import here: FastAPI reads the handlers' annotations at runtime (``Request``).
"""

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from ..errors import error_body
from .folders import ComfyFolders
from .joblist import Snapshot, add_job_routes
from .templates import model_size, template_thumbnail, template_workflow, templates_index
from .userdata import UnsafeName, UserData, file_info

log = logging.getLogger(__name__)

PACKAGE = "comfyui_frontend_package"
# Browsers refuse module scripts served with another type; Python's mimetypes reads the system's tables, which
# may lack or misname these, so they are fixed here.
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".wasm": "application/wasm",
    ".html": "text/html; charset=utf-8",
}
# The server's defaults under the user's own settings. ComfyUI's release notes (fetched from api.comfy.org)
# describe ComfyUI's updates, not this server's.
SETTING_DEFAULTS = {"Comfy.Notification.ShowVersionUpdates": False}
NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}


def frontend_folder() -> Path | None:
    """The installed frontend's ``static`` folder, or None without the ``ui`` extra."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "index.html").is_file() else None


def frontend_version() -> str | None:
    """The installed frontend's version, or None."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def server_features(max_upload_bytes: int) -> dict[str, Any]:
    """``/features``: what this server supports of ComfyUI's negotiated features (what its websocket also
    answers to the client's ``feature_flags``). Preview frames carry no metadata (binary event 1, not 4), so
    ``supports_preview_metadata`` is false; without the protocol there are no uploads (0 bytes)."""
    return {"supports_preview_metadata": False, "max_upload_size": max_upload_bytes}


def add_frontend_routes(
    app: Any, folders: ComfyFolders, static: Path | None = None, jobs: Any = None, max_upload_bytes: int = 0
) -> None:
    """The frontend's start-up endpoints (each also under ``/api``) and its static files at ``/`` on ``app``.

    ``folders``: the user's settings and files live in ``folders.root/user/default`` (created here).
    ``static``: the frontend's files (default: the installed ``comfyui-frontend-package``; without it ``/``
    answers 404 saying how to install it).
    ``jobs``: the protocol's queue (``routes.add_comfy_routes``' ``ComfyJobs``; default ``app.state.comfy_jobs``),
    which ``/api/jobs`` lists; without one there is no ``/api/jobs``.
    ``max_upload_bytes``: the upload bound ``/features`` reports (default: the protocol's, ``comfy_settings``).
    Call it after every other route is added.
    """
    users = UserData(folders.root).create()
    static = static or frontend_folder()
    jobs = jobs if jobs is not None else getattr(app.state, "comfy_jobs", None)
    if not max_upload_bytes:
        settings = getattr(app.state, "comfy_settings", None)
        max_upload_bytes = int(settings.max_upload_mb * 1e6) if settings is not None else 0
    for prefix in ("", "/api"):
        _add_user_routes(app, users, prefix)
        _add_userdata_routes(app, users, prefix)
        _add_userdata_write_routes(app, users, prefix)
        _add_info_routes(app, prefix, max_upload_bytes)
    if jobs is not None:
        add_job_routes(app, lambda: queue_snapshot(jobs), lambda prompt_id: cancel_prompt(jobs, prompt_id))
    _add_static(app, static)
    if static is None:
        log.info('web UI: not served (no comfyui-frontend-package; pip install "sdtrt[ui]")')
    else:
        log.info("web UI: ComfyUI frontend %s at /", frontend_version() or "(version unknown)")


def cancel_prompt(jobs: Any, prompt_id: str) -> bool:
    """Take ``prompt_id`` off the protocol's queue, or stop it between two steps if it runs; True if either."""
    pending = any(item[1] == prompt_id for item in jobs.queue_body()["queue_pending"])
    jobs.delete([prompt_id])
    return jobs.interrupt(prompt_id) or pending  # a prompt that started in the meantime is stopped


def queue_snapshot(jobs: Any) -> Snapshot:
    """(running, pending, history) of the protocol's queue, in the shapes of its ``/queue`` and ``/history``."""
    queue = jobs.queue_body()
    return queue["queue_running"], queue["queue_pending"], jobs.history()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _fail(status: int, kind: str, message: str) -> Any:
    return _json(error_body(kind, message), status)


def _add_user_routes(app: Any, users: UserData, prefix: str) -> None:
    """``/users`` (one user, server storage) and ``/settings`` (a JSON object in the user's folder)."""
    from fastapi import Request

    @app.get(prefix + "/users")
    async def get_users() -> Any:  # ComfyUI's single-user answer: settings live on the server, already there
        return {"storage": "server", "migrated": True}

    @app.post(prefix + "/users")
    async def post_users() -> Any:
        return _fail(400, "not_supported", "this server has one user, 'default'; adding users is not supported")

    @app.get(prefix + "/settings")
    async def get_settings() -> Any:
        return {**SETTING_DEFAULTS, **users.settings()}

    @app.get(prefix + "/settings/{setting_id}")
    async def get_setting(setting_id: str) -> Any:
        return _json({**SETTING_DEFAULTS, **users.settings()}.get(setting_id))

    @app.post(prefix + "/settings")
    async def post_settings(request: Request) -> Any:
        value = await _json_body(request)
        if not isinstance(value, dict):
            return _fail(400, "bad_request", "POST /settings takes a JSON object of setting id -> value")
        users.store_settings(value)
        return _json(None)

    @app.post(prefix + "/settings/{setting_id}")
    async def post_setting(setting_id: str, request: Request) -> Any:
        value = await _json_body(request)
        if value is _INVALID:
            return _fail(400, "bad_request", f"POST /settings/{setting_id} takes the setting's value as JSON")
        users.store_settings({setting_id: value})
        return _json(None)


_INVALID = object()


async def _json_body(request: Any) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return _INVALID


def _add_userdata_routes(app: Any, users: UserData, prefix: str) -> None:
    """``GET /userdata?dir=`` (list) and ``GET /userdata/{file}``, as ComfyUI's ``user_manager`` answers them."""
    from fastapi import Request
    from fastapi.responses import FileResponse, Response

    @app.get(prefix + "/userdata")
    async def list_userdata(request: Request) -> Any:
        query = request.query_params
        directory = query.get("dir", "")
        if not directory:
            return _fail(400, "bad_request", "GET /userdata needs ?dir=FOLDER (e.g. workflows)")
        flags = {key: query.get(key, "").lower() == "true" for key in ("recurse", "full_info", "split")}
        try:
            found = users.listing(directory, flags["recurse"], flags["full_info"], flags["split"])
        except UnsafeName as exc:
            return _fail(403, "forbidden", str(exc))
        return _fail(404, "not_found", f"no folder {directory!r} in the user's files") if found is None else found

    @app.get(prefix + "/userdata/{name:path}")
    async def get_userdata(request: Request) -> Any:
        name = "/".join(_raw_names(request, prefix))
        try:
            path = users.path(name)
        except UnsafeName as exc:
            return _fail(403, "forbidden", str(exc))
        css = path == users.folder / "user.css"
        if not path.is_file():
            if css:  # index.html links it on every load: no file is an empty style sheet
                return Response(b"", media_type="text/css")
            return _fail(404, "not_found", f"no file {name!r} in the user's files")
        if css:
            return FileResponse(path, media_type="text/css", headers={"X-Content-Type-Options": "nosniff"})
        # a user's file never renders in the app's origin (stored markup or scripts): always a download
        headers = {"X-Content-Type-Options": "nosniff", "Content-Disposition": "attachment"}
        media = "application/json" if path.suffix == ".json" else "application/octet-stream"
        return FileResponse(path, media_type=media, headers=headers)


def _add_userdata_write_routes(app: Any, users: UserData, prefix: str) -> None:
    """``POST /userdata/{file}`` (store), ``POST /userdata/{file}/move/{dest}`` and ``DELETE /userdata/{file}``."""
    from fastapi import Request
    from fastapi.responses import Response

    @app.post(prefix + "/userdata/{name:path}")
    async def post_userdata(request: Request) -> Any:
        names = _raw_names(request, prefix)
        query = request.query_params
        overwrite = query.get("overwrite", "true") != "false"
        full_info = query.get("full_info", "false").lower() == "true"
        try:
            if len(names) == 3 and names[1] == "move":  # /userdata/{file}/move/{dest}
                path = users.move(names[0], names[2], overwrite)
            else:
                path = users.write("/".join(names), await request.body(), overwrite)
        except FileNotFoundError:
            return _fail(404, "not_found", f"no file {names[0]!r} in the user's files")
        except UnsafeName as exc:
            return _fail(403, "forbidden", str(exc))
        if path is None:
            return _fail(409, "conflict", "the file already exists and overwrite=false")
        rel = path.relative_to(users.folder).as_posix()
        return file_info(path, rel) if full_info else rel

    @app.delete(prefix + "/userdata/{name:path}")
    async def delete_userdata(request: Request) -> Any:
        name = "/".join(_raw_names(request, prefix))
        try:
            path = users.path(name)
        except UnsafeName as exc:
            return _fail(403, "forbidden", str(exc))
        if not path.is_file():
            return _fail(404, "not_found", f"no file {name!r} in the user's files")
        path.unlink()
        return Response(status_code=204)


def _raw_names(request: Any, prefix: str) -> list[str]:
    """The ``/``-separated pieces after ``/userdata/``, each decoded, read from the raw path: a name's own
    ``/`` arrives as ``%2F`` (the frontend encodes it), so ``a%2Fb.json/move/c.json`` is a move, ``a%2Fb.json``
    one name."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    tail = raw[len(prefix + "/userdata/") :]
    return [unquote_to_bytes(piece).decode("utf-8", "replace") for piece in tail.split(b"/")]


def _add_info_routes(app: Any, prefix: str, max_upload_bytes: int) -> None:
    """Feature flags, translations, templates and model folders: what sdtrt has of them (mostly nothing)."""
    from fastapi import Request

    @app.get(prefix + "/features")
    async def features() -> Any:
        return server_features(max_upload_bytes)

    @app.get(prefix + "/i18n")
    async def i18n() -> Any:  # custom nodes' translations: sdtrt's nodes are ComfyUI's, named as the frontend knows
        return {}

    @app.get(prefix + "/global_subgraphs")
    async def global_subgraphs() -> Any:  # subgraph blueprints of node packs: none
        return {}

    @app.get(prefix + "/workflow_templates")
    async def workflow_templates() -> Any:  # custom node packs' templates: none
        return {}

    @app.get(prefix + "/experiment/models")
    async def model_folders() -> Any:
        return [{"name": name, "folders": []} for name in ("checkpoints", "loras")]

    @app.get(prefix + "/experiment/models/{folder}")
    async def models_in(folder: str, request: Request) -> Any:
        state = request.app.state
        if folder == "checkpoints":
            names = [c.name for c in state.checkpoints.items]
        elif folder == "loras":
            names = [f"{name}.safetensors" for name in getattr(state.loras, "names", [])]
        else:
            return _fail(404, "not_found", f"no model folder {folder!r}; this server has checkpoints and loras")
        return [{"name": name, "pathIndex": 0} for name in names]


def _add_static(app: Any, static: Path | None) -> None:
    """``/`` (index.html, never cached), ``/templates/`` (sdtrt's workflows, see ``templates``), ``/user.css``
    (none), and the frontend's files; without the frontend, ``/`` says how to get it."""
    from fastapi import Request
    from fastapi.responses import FileResponse, Response

    @app.get("/templates/index.json")
    async def index_of_templates() -> Any:  # ComfyUI's own templates are another package, for other models
        return templates_index()

    @app.get("/templates/index_logo.json")
    async def templates_logos() -> Any:  # the templates' providers' logos: none
        return {}

    @app.get("/templates/{name}.json")
    async def template(name: str, request: Request) -> Any:
        current = request.app.state.checkpoints.current
        workflow = template_workflow(name, current.name, *model_size(current.folder))
        return workflow if workflow is not None else _fail(404, "not_found", f"no template {name!r}")

    @app.get("/templates/{name}-1.svg")
    async def thumbnail(name: str) -> Any:
        svg = template_thumbnail(name)
        if svg is None:
            return _fail(404, "not_found", f"no template {name!r}")
        return Response(svg.encode(), media_type="image/svg+xml")

    @app.get("/user.css")
    async def user_css() -> Any:
        return Response(b"", media_type="text/css")

    if static is None:

        @app.get("/")
        async def no_frontend() -> Any:
            return _fail(
                404, "not_found",
                "the web UI needs ComfyUI's frontend, which is not installed: pip install \"sdtrt[ui]\" and "
                "restart the server; the APIs (/prompt, /sdapi/v1) work without it",
            )  # fmt: skip

        return

    @app.get("/")
    async def index() -> Any:
        return FileResponse(static / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)

    # Each of the frontend's top-level folders and files at its own path, not one mount of everything at /: a path
    # the frontend does not have stays a 404, and one that another route takes with another method a 405.
    files = _static_files()
    for entry in sorted(static.iterdir()):
        if entry.is_dir():
            app.mount(f"/{entry.name}", files(directory=entry), name=f"frontend-{entry.name}")
        elif entry.name != "index.html" and entry.is_file():
            app.add_api_route(f"/{entry.name}", _file_handler(entry), methods=["GET"], include_in_schema=False)


def _file_handler(path: Path) -> Any:
    from fastapi.responses import FileResponse

    async def frontend_file() -> Any:
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower()))

    return frontend_file


def _static_files() -> Any:
    """A StaticFiles class with the media types browsers need."""
    from starlette.staticfiles import StaticFiles

    class FrontendFiles(StaticFiles):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "websocket":  # a websocket to a path no route has: refused, not a server error
                await send({"type": "websocket.close", "code": 1008})
                return
            await super().__call__(scope, receive, send)

        def file_response(self, full_path: Any, *args: Any, **kwargs: Any) -> Any:
            response = super().file_response(full_path, *args, **kwargs)
            media = MEDIA_TYPES.get(Path(str(full_path)).suffix.lower())
            if media is not None:
                response.headers["content-type"] = media
                response.media_type = media
            return response

    return FrontendFiles
