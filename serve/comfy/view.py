"""``GET /view``: a file of the input, output or temp folder, as it is or converted as ComfyUI's ``channel`` and
``preview`` parameters ask; names are resolved by ``ComfyFolders.resolve`` (never outside the folder)."""

from __future__ import annotations

import mimetypes
from typing import Any

from .folders import ComfyFolders, UnsafePath

VIEW_CHANNELS = ("rgba", "rgb", "a")


class Refused(ValueError):
    """A request ComfyUI's protocol refuses (HTTP 400; 404 when ``kind`` is "not_found"): ``kind`` is the error
    object's ``type``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def view_response(query: dict[str, str], folders: ComfyFolders) -> Any:
    """``GET /view``: the file (``filename``, ``subfolder``, ``type``: output by default; ComfyUI's ``name.png
    [input]`` form too), as it is or as ComfyUI's ``channel`` (rgba, rgb, a) and ``preview`` (webp|jpeg;quality)."""
    from fastapi.responses import FileResponse, Response

    filename, kind = query.get("filename"), query.get("type", "output")
    if not filename:
        raise Refused("invalid_request", "filename is missing; /view takes filename, subfolder and type")
    for annotated in ("output", "input", "temp"):
        if filename.endswith(f" [{annotated}]"):
            filename, kind = filename[: -len(annotated) - 3], annotated
    channel = query.get("channel", "rgba")
    if channel not in VIEW_CHANNELS:
        raise Refused("invalid_request", f"channel must be one of {', '.join(VIEW_CHANNELS)}, got {channel!r}")
    try:
        path = folders.resolve(kind, filename, query.get("subfolder", ""))
    except UnsafePath as exc:
        raise Refused("invalid_path", str(exc)) from None
    if not path.is_file():
        raise Refused("not_found", f"no file {filename!r} in {kind}/{query.get('subfolder', '')}")
    disposition = {"Content-Disposition": f'filename="{path.name}"'}
    if "preview" not in query and channel == "rgba":
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers=disposition)
    data, media = _converted(path, query.get("preview"), channel)
    return Response(data, media_type=media, headers=disposition)


def _converted(path: Any, preview: str | None, channel: str) -> tuple[bytes, str]:
    import io

    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:
        raise Refused("invalid_request", f"{path.name} is not an image ({type(exc).__name__})") from None
    if channel == "a":
        alpha = image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
        image = Image.new("RGBA", image.size)
        image.putalpha(alpha)
    elif channel == "rgb":
        image = image.convert("RGB")
    buffer, kind, quality = io.BytesIO(), "png", 90
    if preview is not None:
        fmt, _, tail = preview.partition(";")
        kind = fmt if fmt in ("webp", "jpeg") and channel != "a" else "webp"
        quality = int(tail) if tail.isdigit() and 1 <= int(tail) <= 100 else 90
        if kind == "jpeg":
            image = image.convert("RGB")
    image.save(buffer, format=kind.upper(), quality=quality)
    return buffer.getvalue(), f"image/{kind}"
