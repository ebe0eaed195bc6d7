"""Files on disk: atomic writes (a killed process never leaves a file that loads as valid), sha256, JSON config
files, and whether a weights file is safetensors or pickle, judged by its first bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sdtrt.runtime.errors import SourceError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh folder beside ``final``; on success it replaces ``final``, on failure it is removed.

    The folder becomes visible under its final name only once everything in it is written.
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    os.chmod(stage, 0o755)
    try:
        yield stage
        for child in stage.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(stage, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def existing_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path once it is an existing file; SourceError for a folder or a missing file."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise SourceError(
            f"{file} is a folder; expected a single checkpoint file (.safetensors). "
            "A diffusers folder is loaded as a model folder, not as a single file"
        )
    if not file.is_file():
        raise SourceError(f"checkpoint {file} does not exist; expected a .safetensors file")
    return file


def checkpoint_format(path: str | os.PathLike[str]) -> Literal["safetensors", "pickle"]:
    """``"safetensors"`` or ``"pickle"``, judged by the first bytes (a renamed file is still caught)."""
    file = existing_checkpoint(path)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(64)
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    if not head:
        found = "an empty file"
    elif head.startswith(b"version https://git-lfs"):
        found = "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    else:
        found = f"a file starting with {head[:16]!r}"
    raise SourceError(
        f"{file} is {found}; expected a .safetensors checkpoint (8-byte header length, then a JSON header) "
        "or a PyTorch pickle checkpoint (.ckpt/.pt, as torch.save writes it)"
    )


def read_json_object(path: Path, missing: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; SourceError for a missing file (``missing`` says what should be there), invalid
    JSON or anything but an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SourceError(f"missing {str(path)!r}" + (f"; {missing}" if missing else "")) from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{str(path)!r} must hold a JSON object")
    return data
