"""``POST /upload/image``: a multipart form (``image``, ``type``, ``subfolder``, ``overwrite``) saved into the
input (or temp/output) folder as ComfyUI does, bounded and checked.

The body is read up to ``max_bytes``; the file must decode as an image of at most ``max_pixels`` (read from its
header before anything is decoded); its name is a plain file name with an image suffix, and the folder is
``ComfyFolders.resolve``'s (``..``, absolute paths and symlinks out are refused). As in ComfyUI, an existing file
of the same name is kept and the upload becomes ``name (1).png`` (``(2)``, ...), unless it holds the very same
bytes (then the name is reused) or ``overwrite`` is ``true``/``1``. The file is written under a temporary name and
renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from .folders import IMAGE_SUFFIXES, ComfyFolders, UnsafePath

MAX_UPLOAD_MB = 20.0
FIELDS = ("image", "type", "subfolder", "overwrite")


class UploadError(ValueError):
    """The upload is malformed, too large, not an image, or names a place outside its folder (HTTP 400)."""


@dataclass(frozen=True)
class Part:
    """One part of a multipart form: its field name, its file name (None for a plain field) and its bytes."""

    name: str
    filename: str | None
    data: bytes


def parse_multipart(content_type: str, body: bytes) -> dict[str, Part]:
    """The parts of a ``multipart/form-data`` body by field name; ``UploadError`` if it is not one."""
    header = Message()
    header["content-type"] = content_type or ""
    if header.get_content_type() != "multipart/form-data" or not header.get_param("boundary"):
        raise UploadError(
            f"expected a multipart/form-data body with a boundary (an HTML form upload), got {content_type!r}"
        )
    delimiter = b"--" + str(header.get_param("boundary")).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise UploadError("the multipart body is cut short or malformed (no closing boundary)")
    parts: dict[str, Part] = {}
    for chunk in chunks[1:-1]:
        part = _parse_part(chunk)
        if part.name in parts:
            raise UploadError(f"the form has the field {part.name!r} twice; send each field once")
        parts[part.name] = part
    return parts


def _parse_part(chunk: bytes) -> Part:
    if not chunk.startswith(b"\r\n") or b"\r\n\r\n" not in chunk:
        raise UploadError("a multipart part has no header block; the body is malformed")
    head, _, data = chunk[2:].partition(b"\r\n\r\n")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    headers = Message()
    for line in head.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise UploadError(f"a multipart part is not form-data (Content-Disposition {disposition!r})")
    name = headers.get_param("name", header="content-disposition")
    filename = headers.get_param("filename", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise UploadError("a multipart part has no field name")
    return Part(name, filename if isinstance(filename, str) else None, data)


def save_upload(parts: dict[str, Part], folders: ComfyFolders, max_pixels: int) -> dict[str, str]:
    """Save the form's ``image`` as ComfyUI does; its answer ``{"name", "subfolder", "type"}``."""
    unknown = sorted(set(parts) - set(FIELDS))
    if unknown:
        raise UploadError(f"unknown form field(s) {', '.join(unknown)}; /upload/image takes {', '.join(FIELDS)}")
    image = parts.get("image")
    if image is None or image.filename is None:
        raise UploadError("the form has no file field 'image'; send the image as image=@FILE")
    kind = _text(parts, "type", "input")
    subfolder = _text(parts, "subfolder", "")
    overwrite = _text(parts, "overwrite", "false").lower()
    if overwrite not in ("true", "1", "false", "0", ""):
        raise UploadError(f"overwrite must be true, 1, false or 0, got {overwrite!r}")
    name = image.filename
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UploadError(f"the file name must be a plain name (no folders; use subfolder), got {name!r}")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise UploadError(f"the file name must end in an image suffix ({', '.join(IMAGE_SUFFIXES)}), got {name!r}")
    check_image(image.data, max_pixels)
    try:
        path = folders.resolve(kind, name, subfolder)
    except UnsafePath as exc:
        raise UploadError(str(exc)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    folders.resolve(kind, name, subfolder)  # again, now that the folder exists (a symlinked subfolder)
    if overwrite not in ("true", "1"):
        path = _free_name(path, image.data)
    if not (path.is_file() and _same_bytes(path, image.data)):
        _write_atomic(path, image.data)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def check_image(data: bytes, max_pixels: int) -> None:
    """``UploadError`` unless ``data`` is an image Pillow reads, of at most ``max_pixels`` pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(
                    f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted; "
                    "upload a smaller image"
                )
            image.verify()
    except UploadError:
        raise
    except Exception as exc:  # Pillow raises many kinds for a file that is not an image
        raise UploadError(f"the file is not an image Pillow can read ({type(exc).__name__}: {exc})") from None


def _text(parts: dict[str, Part], field: str, default: str) -> str:
    part = parts.get(field)
    if part is None:
        return default
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(f"the form field {field!r} is not UTF-8 text") from None


def _free_name(path: Path, data: bytes) -> Path:
    """``path``, or ComfyUI's ``stem (1).ext``, ``(2)``, ... past files that hold other bytes."""
    candidate, counter = path, 1
    while candidate.exists() and not _same_bytes(candidate, data):
        candidate = path.with_name(f"{path.stem} ({counter}){path.suffix}")
        counter += 1
    return candidate


def _same_bytes(path: Path, data: bytes) -> bool:
    if not path.is_file() or path.stat().st_size != len(data):
        return False
    return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
