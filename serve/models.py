"""The models one server offers, and the pipelines it keeps open.

``sdtrt serve PATH`` takes one artifact (or engine) folder, or a folder whose subfolders are artifact folders: the
checkpoints A1111 lists from its models folder. ``Checkpoints`` scans PATH (and again on ``/refresh-checkpoints``),
lists the models as ``/sdapi/v1/sd-models`` does, matches a name as A1111 does (title, model name, short hash,
sha256 or folder name, exactly), and holds the server's current model (``sd_model_checkpoint``), which requests
without their own ``override_settings.sd_model_checkpoint`` run on. A model is named after its folder when PATH
holds several (folder names are unique, as A1111's file names are), after its source otherwise.

``PipelinePool`` keeps up to ``max_loaded`` pipelines open, the least recently used closed first, and closes
before it opens, so at most ``max_loaded`` models are ever in memory.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.manifest import MANIFEST_NAME, model_display_name, read_manifest

from .errors import RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """One model a server offers: its A1111 name, its folder (absolute) and the sha256 of its source."""

    name: str
    folder: str
    sha256: str = ""
    controlnets: tuple[str, ...] = ()  # the ControlNets its artifact serves, sorted

    @property
    def short_hash(self) -> str:
        """A1111's short hash: the first 10 hex digits of the sha256 ("" when unknown)."""
        return self.sha256[:10]

    @property
    def title(self) -> str:
        """A1111's title, "name [short hash]"."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    def aliases(self) -> set[str]:
        """The names that select this model: title, name, folder name, short hash, sha256."""
        names = {self.title, self.name, Path(self.folder).name, self.short_hash, self.sha256}
        return {name for name in names if name}

    def sd_model(self) -> dict[str, Any]:
        """This model as one entry of ``/sdapi/v1/sd-models``."""
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": self.short_hash or None,
            "sha256": self.sha256 or None,
            "filename": self.folder,
            "config": None,
        }


def read_checkpoint(folder: Path, name: str | None = None) -> Checkpoint:
    """The ``Checkpoint`` of an artifact folder (``ArtifactError`` if its manifest is missing or bad); ``name``:
    its A1111 name (default: what its source is called)."""
    manifest = read_manifest(folder)
    controlnets = sorted(n for n, component in manifest.controlnets.items() if component in manifest.components)
    return Checkpoint(
        name or model_display_name(manifest, fallback=folder.resolve().name),
        str(folder.resolve()),
        str(manifest.source.get("sha256", "")),
        tuple(controlnets),
    )


def scan(root: Path) -> tuple[Checkpoint, ...]:
    """The checkpoints under ``root``: ``root`` itself when it is an artifact folder, else each subfolder that is
    one (sorted by name); ``ArtifactError`` when there is none, or one of them is broken."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return (read_checkpoint(root),)
    if not root.is_dir():
        raise ArtifactError(
            f"{root} is not a folder; pass an artifact or engine folder (with {MANIFEST_NAME}), or a folder of them"
        )
    found = tuple(read_checkpoint(sub, sub.name) for sub in sorted(root.iterdir()) if (sub / MANIFEST_NAME).is_file())
    if not found:
        raise ArtifactError(
            f"{root} holds no model: expected {MANIFEST_NAME} in it (one model) or in its subfolders (several); "
            f"export one with `sdtrt export MODEL {root / 'NAME'}`"
        )
    return found


class Checkpoints:
    """The models under one folder (``scan``), and the server's current one (the first, until changed)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._items = scan(self.root)
        self.current = self._items[0]
        self._lock = threading.Lock()

    @property
    def items(self) -> tuple[Checkpoint, ...]:
        return self._items

    def refresh(self) -> tuple[Checkpoint, ...]:
        """Scan again (``ArtifactError``: the list is left as it was). The current model stays current while its
        folder is still listed; when it is gone, the first model listed becomes current."""
        items = scan(self.root)
        with self._lock:
            self._items = items
            same = [c for c in items if c.folder == self.current.folder]
            self.current = same[0] if same else items[0]
        return items

    def find(self, value: Any) -> Checkpoint | None:
        """The model ``value`` names (title first, then name, folder name or hash), or None."""
        if not isinstance(value, str) or not value:
            return None
        exact = [c for c in self._items if c.title == value]
        return exact[0] if exact else next((c for c in self._items if value in c.aliases()), None)

    def resolve(self, value: Any, where: str = "sd_model_checkpoint") -> Checkpoint:
        """The model ``value`` names; ``RequestError`` listing the titles when it names none."""
        found = self.find(value)
        if found is None:
            shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
            titles = ", ".join(repr(c.title) for c in self._items)
            raise RequestError(
                f"{where} {shown} is not a model of this server; its models: {titles} (select one by title, name "
                "or hash; POST /sdapi/v1/refresh-checkpoints after adding a folder)"
            )
        return found

    def select(self, checkpoint: Checkpoint) -> None:
        """Make ``checkpoint`` the server's current model."""
        with self._lock:
            self.current = checkpoint


class PipelinePool:
    """Open pipelines by checkpoint, at most ``max_loaded`` at once, least recently used closed first.

    ``get`` opens (and may close) pipelines: call it from one thread (the worker's). ``peek`` and ``loaded`` may
    be called from any thread; ``lock`` is held while a pipeline is closed, so a caller holding it can use what
    ``peek`` returned.
    """

    def __init__(self, open_pipeline: Callable[[Checkpoint], Any], max_loaded: int = 1) -> None:
        check_max_loaded(max_loaded)
        self.open_pipeline, self.max_loaded = open_pipeline, max_loaded
        self.lock = threading.RLock()
        self._open: OrderedDict[Checkpoint, Any] = OrderedDict()

    def get(self, checkpoint: Checkpoint) -> Any:
        """The open pipeline of ``checkpoint`` (opened now, after closing the least recently used if full)."""
        with self.lock:
            pipe = self._open.get(checkpoint)
            if pipe is not None:
                self._open.move_to_end(checkpoint)
                return pipe
            while len(self._open) >= self.max_loaded:
                self._close(*self._open.popitem(last=False))
        pipe = self.open_pipeline(checkpoint)
        with self.lock:
            self._open[checkpoint] = pipe
        log.info("model %s opened (%d of at most %d open)", checkpoint.title, len(self._open), self.max_loaded)
        return pipe

    def peek(self, checkpoint: Checkpoint) -> Any | None:
        """The pipeline of ``checkpoint`` if it is open (its place in the order unchanged), else None."""
        with self.lock:
            return self._open.get(checkpoint)

    def loaded(self) -> list[Checkpoint]:
        """The open models, least recently used first."""
        with self.lock:
            return list(self._open)

    def close_all(self) -> None:
        with self.lock:
            while self._open:
                self._close(*self._open.popitem(last=False))

    def _close(self, checkpoint: Checkpoint, pipe: Any) -> None:
        pipe.close()
        del pipe
        gc.collect()  # the engines' buffers go now, not at some later collection: the next model needs the room
        trim_heap()
        log.info("model %s closed", checkpoint.title)


def trim_heap() -> None:
    """Hand the heap memory freed by a closed model back to the system: glibc keeps freed blocks for reuse, so
    without this the process's RSS stays at two models' worth after a switch (a no-op where there is no glibc)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl): nothing to trim with
        return


def request_checkpoint(payload: dict[str, Any], checkpoints: Checkpoints) -> Checkpoint:
    """The model an A1111 payload runs on: its ``override_settings.sd_model_checkpoint`` (``RequestError`` naming
    the models if it names none), else the server's current one."""
    overrides = payload.get("override_settings")
    chosen = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
    if chosen is None:
        return checkpoints.current
    return checkpoints.resolve(chosen, "override_settings.sd_model_checkpoint")


def keep_checkpoint(payload: dict[str, Any], checkpoints: Checkpoints, checkpoint: Checkpoint) -> None:
    """With ``override_settings_restore_afterwards`` false, a request's ``sd_model_checkpoint`` stays the server's
    current model after it, as in A1111 (the request has passed every check by now)."""
    overrides = payload.get("override_settings")
    if isinstance(overrides, dict) and overrides.get("sd_model_checkpoint") is not None:
        if payload.get("override_settings_restore_afterwards") is False:
            checkpoints.select(checkpoint)


def check_defaults(folder: str | Path, cache: Any, clip_skip: int) -> None:
    """``ArtifactError``/``ConfigError`` if the model in ``folder`` cannot run the server's step-caching default
    (``cache``: a ``caching.CacheDefaults``) or its clip-skip default; reads the manifest only."""
    from sdtrt.runtime.clip_skip import check_clip_skip

    manifest = read_manifest(folder)
    cache.check_artifact(manifest.components, f"the artifact {folder}")
    check_clip_skip(manifest.model, clip_skip)


def check_max_loaded(max_loaded: int) -> None:
    if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
        raise ConfigError(f"--max-loaded must be an integer >= 1 (models kept open at once), got {max_loaded!r}")


__all__ = [
    "Checkpoint",
    "Checkpoints",
    "PipelinePool",
    "check_defaults",
    "check_max_loaded",
    "keep_checkpoint",
    "read_checkpoint",
    "request_checkpoint",
    "scan",
]
