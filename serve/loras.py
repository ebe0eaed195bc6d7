"""LoRAs by name, as A1111 serves them: a folder of ``.safetensors`` files, ``<lora:NAME:WEIGHT>`` prompt tags.

``LoraLibrary`` lists the folder (name = file stem; ``GET /sdapi/v1/loras``, rescanned by ``POST
/sdapi/v1/refresh-loras``). ``resolve_tags`` removes the tags from ``prompt`` and ``hr_prompt`` (A1111 removes the
tag text and keeps the rest) and gives the request the (path, weight) pairs it runs with; each pipeline call
(``generate.call_pipeline``, on the plain server and the Ray replicas) first sets them with ``Pipeline.set_loras``
(``use_loras``), so a request without tags runs without LoRA.
Unlike A1111, which warns and continues, an unknown name is a 422 naming it and listing the known ones: running
without the LoRA would return another image than the one asked for.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdtrt.runtime.errors import ConfigError

from .a1111 import GenerateRequest
from .errors import RequestError

# A1111's extra-network syntax: <lora:name> or <lora:name:weight> (further ":" arguments are not supported)
TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>", re.IGNORECASE)


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` dict of a safetensors file's header ({} when none or unreadable)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def check_lora_dir(folder: str | Path | None) -> None:
    """``ConfigError`` unless ``folder`` is None or a folder (``--lora-dir``)."""
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"--lora-dir {folder} is not a folder; give a folder of .safetensors LoRAs")


class LoraLibrary:
    """The LoRA files of one folder by name (``None``: no folder, no LoRAs)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder (``POST /sdapi/v1/refresh-loras``)."""
        files = {}
        if self.folder is not None and self.folder.is_dir():
            files = {p.stem: p.resolve() for p in sorted(self.folder.glob("*.safetensors")) if p.is_file()}
        with self._lock:
            self._files = files

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def path(self, name: str, tag: str = "", where: str = "prompt") -> Path:
        """The file of ``name`` (``tag`` in ``where``); ``RequestError`` naming it and the known names."""
        with self._lock:
            found = self._files.get(name)
        if found is not None:
            return found
        if self.folder is None:
            raise RequestError(
                f"{where} holds {tag or name!r}, and this server has no LoRAs: start it with --lora-dir DIR (a folder "
                "of .safetensors LoRAs, named by file stem), or remove the tag"
            )
        known = ", ".join(self.names) or "none"
        raise RequestError(
            f"unknown LoRA {name!r} in <lora:...>; the LoRAs in {self.folder} are: {known} "
            "(a file added since start-up appears after POST /sdapi/v1/refresh-loras)"
        )

    def body(self) -> list[dict[str, Any]]:
        """``GET /sdapi/v1/loras``: A1111's [{name, alias, path, metadata}]."""
        with self._lock:
            files = dict(self._files)
        out = []
        for name, path in sorted(files.items()):
            meta = safetensors_metadata(path)
            alias = meta.get("ss_output_name") or name
            out.append({"name": name, "alias": alias, "path": str(path), "metadata": meta})
        return out


def strip_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """``text`` without its ``<lora:NAME:WEIGHT>`` tags, and the (name, weight) pairs (weight 1.0 by default)."""
    found = []
    for match in TAG.finditer(text):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = 1.0 if weight is None or weight.strip() == "" else float(weight)
        except ValueError:
            raise RequestError(
                f"{match.group(0)!r}: the weight must be a number, got {weight!r} (write <lora:{name}:0.8>)"
            ) from None
        found.append((name, value))
    return TAG.sub("", text), found


def resolve_tags(request: GenerateRequest, library: LoraLibrary) -> GenerateRequest:
    """``request`` with its prompt's LoRA tags removed and resolved to files in ``request.loras``.

    The same LoRA named twice adds up its weights (as A1111). ``hr_prompt``'s tags are removed too; a second pass
    with another LoRA set than the first is not supported (422)."""
    prompt, tags = strip_tags(request.prompt)
    if request.hires is not None and request.hires.prompt:
        hr_prompt, hr_tags = strip_tags(request.hires.prompt)
        if hr_tags and sorted(_merged(hr_tags)) != sorted(_merged(tags)):
            raise RequestError(
                "hr_prompt names other LoRAs than prompt; a second pass with another LoRA set is not supported: "
                "put the same <lora:...> tags in both, or leave them out of hr_prompt"
            )
        request = replace(request, hires=replace(request.hires, prompt=hr_prompt))
    if "<lora:" in prompt.lower():
        raise RequestError(
            "prompt holds a <lora:...> tag this server cannot read; write <lora:NAME> or <lora:NAME:WEIGHT> "
            "(separate text-encoder/UNet weights are not supported)"
        )
    if not tags:
        return replace(request, prompt=prompt) if prompt != request.prompt else request
    for match in TAG.finditer(request.prompt):  # every name known, before any work
        library.path(match.group(1).strip(), match.group(0))
    loras = tuple((str(library.path(name)), weight) for name, weight in _merged(tags))
    return replace(request, prompt=prompt, loras=loras)


def _merged(tags: list[tuple[str, float]]) -> list[tuple[str, float]]:
    weights: dict[str, float] = {}
    for name, weight in tags:
        weights[name] = weights.get(name, 0.0) + weight
    return list(weights.items())  # in order of first appearance, as the infotext lists them


def use_loras(pipe: Any, loras: tuple[tuple[str, float], ...]) -> None:
    """Make ``pipe`` run with exactly ``loras`` (path, weight), changing nothing when it already does.

    Sets are compared by path and weight: a file rewritten in place while its set is active is read again at the
    next change of set."""
    current = tuple((str(Path(f.path).resolve()), float(scale)) for f, scale in pipe.loras)
    if current != tuple((str(Path(p).resolve()), float(w)) for p, w in loras):
        pipe.set_loras(list(loras))


def add_lora_routes(app: Any, library: LoraLibrary) -> None:
    """``GET /sdapi/v1/loras`` and ``POST /sdapi/v1/refresh-loras``."""

    @app.get("/sdapi/v1/loras")
    async def loras() -> Any:
        return library.body()

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> Any:
        library.refresh()
        return None


__all__ = [
    "LoraLibrary",
    "add_lora_routes",
    "check_lora_dir",
    "resolve_tags",
    "safetensors_metadata",
    "strip_tags",
    "use_loras",
]
