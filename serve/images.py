"""Images in A1111 payloads: base64 text (or a ``data:`` URL) -> image bytes, and PNG bytes -> base64 text."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image

from .errors import RequestError
from .limits import Limits, check_image_size, check_image_text


def decode_image(text: Any, where: str, limits: Limits | None = None) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> image bytes, checked to open with Pillow.

    Within ``limits``: the text's length, and the pixels the header declares, checked before decoding.
    """
    if not isinstance(text, str):
        raise RequestError(f"{where} must be a base64 string, got {type(text).__name__}")
    limits = limits or Limits()
    check_image_text(text, where, limits)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where} is not valid base64 ({exc}); send a base64-encoded PNG, JPEG or WebP") from None
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only: the size, before any pixel
            check_image_size(image.size, where, limits)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(
            f"{where} is not an image Pillow can read; give a base64-encoded PNG, JPEG or WebP file"
        ) from None
    return data


def encode_png(png: bytes) -> str:
    """PNG bytes as the raw base64 text A1111 answers with (no ``data:`` prefix)."""
    return base64.b64encode(png).decode("ascii")
