"""The three folders ComfyUI's protocol names files in (``input``, ``output``, ``temp``), and path safety.

Every file a client names (``/view``, ``/upload/image``, ``LoadImage``) is a ``(type, subfolder, filename)``
triple; ``ComfyFolders.resolve`` turns it into a path that is inside that type's folder or refuses it: ``..``
parts, absolute paths, drive letters, NUL bytes, and symlinks that lead out of the folder are all ``UnsafePath``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KINDS = ("input", "output", "temp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class UnsafePath(ValueError):
    """A file name that would leave its folder, or names no folder."""


@dataclass(frozen=True)
class ComfyFolders:
    """``root/input``, ``root/output`` and ``root/temp``; ``create`` makes them."""

    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def temp(self) -> Path:
        return self.root / "temp"

    def create(self) -> ComfyFolders:
        for kind in KINDS:
            self.folder(kind).mkdir(parents=True, exist_ok=True)
        return self

    def folder(self, kind: str) -> Path:
        """The folder of ``kind`` ("input", "output" or "temp"); UnsafePath for anything else."""
        if kind not in KINDS:
            raise UnsafePath(f"type must be one of {', '.join(KINDS)}, got {kind!r}")
        return self.root / kind

    def resolve(self, kind: str, filename: str, subfolder: str = "") -> Path:
        """The path of ``filename`` in ``subfolder`` of ``kind``'s folder (which need not exist yet).

        Raises UnsafePath when the name is empty, absolute, has ``..`` or NUL, or resolves (following symlinks)
        outside the folder.
        """
        base = self.folder(kind)
        parts: list[str] = []
        for label, value in (("subfolder", subfolder), ("filename", filename)):
            if not isinstance(value, str):
                raise UnsafePath(f"{label} must be a string, got {type(value).__name__}")
            if "\0" in value:
                raise UnsafePath(f"{label} {value!r} has a NUL byte")
            if value.startswith(("/", "\\")) or (len(value) > 1 and value[1] == ":") or os.path.isabs(value):
                raise UnsafePath(f"{label} {value!r} is an absolute path; name a file inside the {kind} folder")
            pieces = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
            if ".." in pieces:
                raise UnsafePath(f"{label} {value!r} has a '..' part; name a file inside the {kind} folder")
            parts += pieces
        if not filename or not parts:
            raise UnsafePath("filename is empty; name a file")
        path = base.joinpath(*parts)
        real_base = base.resolve()
        real = path.resolve()
        if real != real_base and real_base not in real.parents:
            raise UnsafePath(f"{filename!r} in {kind} leads outside the {kind} folder (a symlink?)")
        return path

    def images(self, kind: str = "input") -> list[str]:
        """The image files directly in ``kind``'s folder, sorted (LoadImage's list), symlinks out excluded."""
        base = self.folder(kind)
        if not base.is_dir():
            return []
        names = []
        for entry in sorted(base.iterdir()):
            if entry.suffix.lower() not in IMAGE_SUFFIXES or not entry.is_file():
                continue
            try:
                self.resolve(kind, entry.name)
            except UnsafePath:
                continue
            names.append(entry.name)
        return names
