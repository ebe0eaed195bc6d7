"""The web frontend's own files on the server: its settings and user data (saved workflows, ``user.css``, ...).

ComfyUI keeps them under ``user/<user>/``; sdtrt has one user, ``default``, so ``UserData(root)`` is
``root/user/default``. Every name a client sends goes through ``UserData.path``, which refuses (``UnsafeName``)
empty names, NUL bytes, absolute paths and drive letters, ``..`` parts, and names that resolve (through a symlink)
outside the folder. Writes go to a temporary file in the same folder first, then replace the target, so a reader
never sees half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "default"
SETTINGS_FILE = "comfy.settings.json"
FOLDERS = ("workflows", "subgraphs")  # created at start: the frontend lists them while it loads


class UnsafeName(ValueError):
    """A user-data name that is empty or would leave the user's folder."""


@dataclass(frozen=True)
class UserData:
    """The files of the one user, ``default``, under ``root/user/default``."""

    root: Path

    @property
    def folder(self) -> Path:
        return self.root / "user" / USER

    def create(self) -> UserData:
        for name in FOLDERS:
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        return self

    def path(self, name: str) -> Path:
        """The path of ``name`` (``/``-separated) inside the user's folder; ``UnsafeName`` if it would leave it."""
        if not isinstance(name, str) or not name.strip("/\\ "):
            raise UnsafeName("the file name is empty; name a file inside the user's folder")
        if "\0" in name:
            raise UnsafeName(f"the name {name!r} has a NUL byte")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise UnsafeName(f"{name!r} is an absolute path; name a file inside the user's folder")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafeName(f"{name!r} has a '..' part; name a file inside the user's folder")
        path = self.folder.joinpath(*parts)
        base = self.folder.resolve()
        real = path.resolve()
        if real != base and base not in real.parents:
            raise UnsafeName(f"{name!r} leads outside the user's folder (a symlink?)")
        return path

    def listing(self, directory: str, recurse: bool, full_info: bool, split: bool) -> list[Any] | None:
        """ComfyUI's ``GET /userdata?dir=`` list: the files in ``directory`` (None if it does not exist), as
        relative paths, ``[path, *parts]`` (``split``) or ``{path, size, modified, created}`` (``full_info``)."""
        base = self.path(directory)
        if not base.is_dir():
            return None
        found = base.rglob("*") if recurse else base.glob("*")
        result: list[Any] = []
        for file in sorted(found):
            if not file.is_file() or file.name.startswith(".tmp-"):
                continue
            try:  # a symlink inside that points out is not listed
                self.path(file.relative_to(self.folder).as_posix())
            except UnsafeName:
                continue
            rel = file.relative_to(base).as_posix()
            if full_info:
                result.append(file_info(file, rel))
            else:
                result.append([rel, *rel.split("/")] if split else rel)
        return result

    def write(self, name: str, data: bytes, overwrite: bool = True) -> Path | None:
        """Store ``data`` as ``name`` (its folders made); None (nothing written) if it exists and not
        ``overwrite``."""
        path = self.path(name)
        if path.exists() and not overwrite:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path(name)  # the folders just made may not lead out either
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return path

    def move(self, source: str, dest: str, overwrite: bool = False) -> Path | None:
        """Rename ``source`` to ``dest``; None (nothing moved) if ``dest`` exists and not ``overwrite``.
        ``FileNotFoundError`` if ``source`` is not a file."""
        src, dst = self.path(source), self.path(dest)
        if not src.is_file():
            raise FileNotFoundError(source)
        if dst.exists() and not overwrite:
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        return dst

    def settings(self) -> dict[str, Any]:
        """The stored settings (an empty dict before the first is stored)."""
        path = self.path(SETTINGS_FILE)
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # a damaged file: the frontend starts from its defaults and writes it anew
        return value if isinstance(value, dict) else {}

    def store_settings(self, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into the stored settings."""
        merged = {**self.settings(), **changes}
        self.write(SETTINGS_FILE, json.dumps(merged, indent=2).encode())


def file_info(path: Path, rel: str) -> dict[str, Any]:
    """ComfyUI's FileInfo of a user-data file: relative path, size in bytes, times in milliseconds."""
    stat = path.stat()
    return {
        "path": rel,
        "size": stat.st_size,
        "modified": int(stat.st_mtime * 1000),
        "created": int(stat.st_ctime * 1000),
    }
