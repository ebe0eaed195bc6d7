"""The A1111 endpoints clients call at start-up: settings, flags, memory, lists, schedulers and ``png-info``.

``GET /sdapi/v1/options`` reports the settings clients read, with the values that hold for sdtrt (the current
model's title and sha256, PNG output, the server's clip skip, ...); ``POST`` accepts a key only with a value the
server honours (``sd_model_checkpoint``: any of its models by title, name or hash, which it switches to) and
answers 422 for anything else, naming the key, so a client is never told that a change happened when it did not.
``POST /sdapi/v1/refresh-checkpoints`` scans the models folder again. The settings live in ``ServerOptions``, one
per app. Lists of things sdtrt does not have (VAEs, hypernetworks, styles, embeddings, ...) are honest empty lists.
"""

import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime.errors import ArtifactError

from .a1111 import SCHEDULE_TYPES
from .errors import RequestError, ServeError, error_body
from .images import decode_image
from .models import Checkpoint, Checkpoints
from .service import Service


@dataclass(frozen=True)
class FixedOption:
    """A setting with the one value sdtrt runs with, and why it cannot be changed (shown when a client tries)."""

    value: Any
    why: str


# The settings clients read (webuiapi, chat front-ends, bots), each with its true value for sdtrt.
FIXED_OPTIONS: dict[str, FixedOption] = {
    "sd_vae": FixedOption("Automatic", "the VAE is the one exported with the model"),
    "sd_checkpoints_limit": FixedOption(1, "the server's limit is `sdtrt serve --max-loaded N`"),
    "CLIP_stop_at_last_layers": FixedOption(
        1,
        "the server's default is `sdtrt serve --clip-skip N`; a request sets its own with "
        "override_settings.CLIP_stop_at_last_layers",
    ),
    "samples_format": FixedOption("png", "images are PNGs with the parameters text"),
    "eta_noise_seed_delta": FixedOption(0, "seeds are used as given"),
    "randn_source": FixedOption("CPU", "noise is drawn on the CPU, so a seed gives the same image on any device"),
    "eta_ancestral": FixedOption(1.0, "Euler a runs with eta 1, as diffusers' EulerAncestralDiscreteScheduler"),
    "eta_ddim": FixedOption(0.0, "DDIM runs with eta 0, as diffusers' DDIMScheduler"),
    "emphasis": FixedOption("None", "prompts are encoded as written: (word:1.2) weights are not parsed"),
    "img2img_fix_steps": FixedOption(False, "img2img runs int(steps x denoising_strength) steps, as A1111 does"),
}
READ_ONLY = {"sd_checkpoint_hash": "it follows sd_model_checkpoint"}


class ServerOptions:
    """The A1111 settings one server reports (``GET /sdapi/v1/options``) and accepts (``POST``).

    ``sd_model_checkpoint`` and ``sd_checkpoint_hash`` follow ``checkpoints.current``; ``update`` checks a change
    and returns the model to switch to, which the caller opens and selects (``add_info_routes``).
    """

    def __init__(self, checkpoints: Checkpoints, clip_skip: int = 1, max_loaded: int = 1) -> None:
        self.checkpoints = checkpoints
        self.values: dict[str, Any] = {
            **{key: option.value for key, option in FIXED_OPTIONS.items()},
            "CLIP_stop_at_last_layers": clip_skip,  # the server's default (``sdtrt serve --clip-skip``)
            "sd_checkpoints_limit": max_loaded,  # ``sdtrt serve --max-loaded``
        }

    def current(self) -> dict[str, Any]:
        """Every setting with its value (a copy)."""
        model = self.checkpoints.current
        return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256 or None, **self.values}

    def update(self, changes: Any) -> Checkpoint | None:
        """Check ``changes`` (a JSON object) all or nothing: ``RequestError`` naming every key it cannot honour;
        the model ``sd_model_checkpoint`` names (None when not given)."""
        if not isinstance(changes, dict):
            raise RequestError(f"the options body must be a JSON object of settings, got {type(changes).__name__}")
        problems = [problem for key, value in changes.items() if (problem := self.refusal(key, value))]
        if problems:
            raise RequestError("; ".join(problems))
        return self.checkpoints.find(changes["sd_model_checkpoint"]) if "sd_model_checkpoint" in changes else None

    def refusal(self, key: str, value: Any) -> str | None:
        """Why ``key`` cannot be set to ``value`` (None: it can)."""
        if key == "sd_model_checkpoint":
            try:
                self.checkpoints.resolve(value)
            except RequestError as exc:
                return str(exc)
            return None
        values = self.current()
        if key not in values:
            return f"unknown or unsupported option {key!r}; the options sdtrt has: {', '.join(sorted(values))}"
        if _same(value, values[key]):
            return None
        why = READ_ONLY.get(key) or FIXED_OPTIONS[key].why
        current = _show(values[key])
        return f"option {key!r} is {current} on this server, got {_show(value)}; it cannot be changed ({why})"


async def switch_model(service: Service, checkpoints: Checkpoints, target: Checkpoint) -> None:
    """Make ``target`` the current model: requests from now on run on it; the service opens it after the
    requests already queued (which keep their model). If it cannot be opened, the previous model stays current
    and the service's error is raised."""
    previous = checkpoints.current
    if target == previous:
        return
    checkpoints.select(target)
    load = getattr(service, "load", None)  # a service that opens models on demand has none (Ray)
    if load is None:
        return
    try:
        await load(target)
    except ServeError:
        if checkpoints.current == target:
            checkpoints.select(previous)
        raise


def _show(value: Any) -> str:
    """A setting's value as an error message quotes it (cut short: the value comes from the client)."""
    return repr(value)[:80] if isinstance(value, str) else json.dumps(value)[:80]


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 and 1.0 are the same setting, true and 1 are not."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def cmd_flags(config: Any, **extra: Any) -> dict[str, Any]:
    """``/sdapi/v1/cmd-flags``: a server config dataclass as A1111's ``cmd_opts`` keys (``ckpt``, ``port``,
    ``listen``, ...) where A1111 has one, sdtrt's own settings under their option names (``--queue``: ``queue``)."""
    flags: dict[str, Any] = asdict(config) if is_dataclass(config) else {}
    flags.update(extra)
    renames = {"artifacts": "ckpt", "host": "server_name", "queue_size": "queue", "max_queued_requests": "queue"}
    flags = {renames.get(key, key): value for key, value in flags.items()}
    flags["ckpt"] = str(flags.get("ckpt", ""))
    if "server_name" in flags:
        flags["listen"] = flags["server_name"] not in ("127.0.0.1", "localhost", "::1")
    return {"api": True, "nowebui": True, **flags}


def memory_body() -> dict[str, Any]:
    """``/sdapi/v1/memory`` in A1111's shape: this process's RAM (``used``: its RSS, ``free``: total - used),
    and CUDA's when torch sees a GPU (``{"error": "unavailable"}`` otherwise)."""
    try:
        rss, total = _ram()
        ram: dict[str, Any] = {"free": total - rss, "used": rss, "total": total}
    except (OSError, ValueError, ImportError) as exc:
        ram = {"error": f"{type(exc).__name__}: {exc}"}
    return {"ram": ram, "cuda": _cuda_memory()}


def _ram() -> tuple[int, int]:
    """(this process's RSS, the machine's RAM) in bytes: from /proc on Linux (no dependency), else psutil."""
    if sys.platform.startswith("linux"):
        status = Path("/proc/self/status").read_text()
        meminfo = Path("/proc/meminfo").read_text()
        rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
        if rss is None or total is None:
            raise ValueError("/proc has no VmRSS or MemTotal line")
        return int(rss.group(1)) * 1024, int(total.group(1)) * 1024
    import psutil  # elsewhere: only if installed (ImportError is reported in the body)

    return psutil.Process(os.getpid()).memory_info().rss, psutil.virtual_memory().total


def _cuda_memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
    except RuntimeError as exc:
        return {"error": str(exc)}

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


# "Key: value" pairs of the last infotext line; a value is a JSON string (may hold commas) or runs to a comma.
_FIELD = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111's ``parameters`` text -> its fields as A1111's ``png-info`` gives them (strings; ``Size`` split into
    ``Size-1``/``Size-2``; ``Prompt``, ``Negative prompt``; ``Clip skip`` "1" and ``Schedule type`` "Automatic"
    when absent, as A1111 reads a missing field)."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # no settings line: every line is prompt text
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in (line.strip() for line in lines):
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    fields: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    fields.setdefault("Clip skip", "1")
    fields.setdefault("Schedule type", "Automatic")
    return fields


def png_info_body(payload: Any) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info`` ({"image": base64}) -> {"info": parameters text, "items": the image's other text
    fields, "parameters": the parsed fields}."""
    from PIL import Image

    if not isinstance(payload, dict) or "image" not in payload:
        raise RequestError('png-info needs a JSON object {"image": "<base64 PNG>"}')
    data = decode_image(payload["image"].strip() if isinstance(payload["image"], str) else payload["image"], "image")
    with Image.open(io.BytesIO(data)) as image:
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
    info = items.pop("parameters", "")
    return {"info": info, "items": items, "parameters": parse_parameters(info) if info else {}}


def schedulers_body() -> list[dict[str, Any]]:
    """``/sdapi/v1/schedulers``: the schedules sdtrt runs, as A1111 lists them."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULE_TYPES
    ]


# What sdtrt has none of: A1111's lists, empty (an honest answer, not a 404 that clients crash on).
EMPTY_LISTS = ("prompt-styles", "sd-vae", "hypernetworks", "face-restorers", "realesrgan-models")
# The ControlNet extension is the one (always-on) script (``/sdapi/v1/scripts`` lists it too).
SCRIPT_INFO = [
    {"name": "controlnet", "is_alwayson": True, "is_img2img": img2img, "args": []} for img2img in (False, True)
]


async def server_options(app: Any, service: Service) -> ServerOptions:
    """The options ``app`` keeps (``app.state.a1111_options``, made by ``app.create_app``)."""
    return app.state.a1111_options


def add_info_routes(app: Any, service: Service, flags: dict[str, Any] | None = None) -> None:
    """Register the start-up endpoints on ``app``; ``flags`` is what ``/cmd-flags`` reports (``cmd_flags``)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.get("/sdapi/v1/options")
    async def get_options() -> Any:
        return (await server_options(app, service)).current()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Any:
        try:
            try:
                changes = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from None
            target = (await server_options(app, service)).update(changes)
            if target is not None:
                await switch_model(service, app.state.checkpoints, target)
        except ServeError as exc:
            return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status)
        return None  # A1111 answers null

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> Any:
        try:
            app.state.checkpoints.refresh()
        except ArtifactError as exc:  # the server's folder, not the request, is wrong: the list stays as it was
            return JSONResponse(error_body(ServeError.kind, f"{exc}; the model list is unchanged"), status_code=500)
        return None  # A1111 answers null

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> Any:
        try:
            try:
                payload = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from None
            return png_info_body(payload)
        except RequestError as exc:
            return JSONResponse(error_body(exc.kind, str(exc)), status_code=exc.status)

    @app.get("/sdapi/v1/memory")
    async def memory() -> Any:
        probe = getattr(service, "memory", None)  # a service whose engines run elsewhere asks there (Ray)
        return await probe() if probe is not None else memory_body()

    _add_static_routes(app, dict(flags or {}))


def _add_static_routes(app: Any, flags: dict[str, Any]) -> None:
    """The answers that never change while the server runs."""

    @app.get("/sdapi/v1/cmd-flags")
    async def get_cmd_flags() -> Any:
        return flags

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> Any:
        return schedulers_body()

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> Any:
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/script-info")
    async def script_info() -> Any:
        return SCRIPT_INFO

    for name in EMPTY_LISTS:
        app.add_api_route(f"/sdapi/v1/{name}", _empty_list, methods=["GET"], name=name)


async def _empty_list() -> list[Any]:
    return []
