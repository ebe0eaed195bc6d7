"""What a node is to the interpreter: its ComfyUI declaration (inputs, outputs, category) and how it runs.

A node class declares what ComfyUI's node class does (``input_types`` is ComfyUI's ``INPUT_TYPES`` with the
COMBO lists of this server, ``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_NODE``, ``CATEGORY``, ...), so that
``/object_info`` and validation read the same declaration. ``check`` is ComfyUI's ``VALIDATE_INPUTS`` (messages
for bad values that a type and range cannot express), ``changed`` its ``IS_CHANGED`` (what besides the inputs makes
a cached output stale: a file's content), and ``run`` its function: it gets a ``NodeRun`` (this node's id, the
pipeline opener, progress and cancel) and the inputs as keywords, and returns a tuple of outputs, or for an output
node ``{"ui": {...}, "result": (...)}``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .folders import ComfyFolders

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
SEED_MAX = 0xFFFFFFFFFFFFFFFF


class NodeInterrupted(Exception):
    """A node stopped because the prompt's cancel event was set (the interpreter reports ExecutionInterrupted)."""


@dataclass
class NodeRun:
    """What a running node may use besides its inputs."""

    node_id: str
    pipeline: Callable[[Any], Any]  # Checkpoint -> open Pipeline
    cancel: threading.Event
    folders: ComfyFolders
    library: Any = None  # the NodeLibrary running this node
    progress: Callable[[int, int, Any], None] = lambda value, maximum, preview: None
    previews: bool = False
    prompt: dict[str, Any] = field(default_factory=dict)
    extra_pnginfo: dict[str, Any] | None = None


class Node:
    """One ComfyUI node type; subclasses set the class attributes and ``run``."""

    NAME: ClassVar[str]
    DISPLAY_NAME: ClassVar[str]
    CATEGORY: ClassVar[str]
    DESCRIPTION: ClassVar[str] = ""
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_TOOLTIPS: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_NODE: ClassVar[bool] = False
    PYTHON_MODULE: ClassVar[str] = "nodes"  # ComfyUI's own nodes; sdtrt's say "custom_nodes.sdtrt"
    # Inputs the ComfyUI frontend sends that carry no value for the node (LoadImage's "upload" button)
    FRONTEND_INPUTS: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @classmethod
    def input_types(cls, library: Any) -> dict[str, dict[str, tuple]]:
        """ComfyUI's INPUT_TYPES: {"required": {name: (type, options)}, "optional": ..., "hidden": ...}."""
        raise NotImplementedError

    @classmethod
    def check(cls, library: Any, inputs: dict[str, Any]) -> list[tuple[str, str]]:
        """(input name, message) for each literal input value this node refuses beyond its declared type/range.
        Only literal inputs are in ``inputs`` (linked ones are not known before running)."""
        return []

    @classmethod
    def changed(cls, library: Any, inputs: dict[str, Any]) -> Any:
        """What makes this node's cached output stale besides its inputs (a file's digest); None: nothing."""
        return None

    def run(self, run: NodeRun, **inputs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def info(cls, library: Any) -> dict[str, Any]:
        """This node in ComfyUI's ``/object_info`` schema (server.py node_info)."""
        inputs = cls.input_types(library)
        info: dict[str, Any] = {
            "input": inputs,
            "input_order": {kind: list(spec) for kind, spec in inputs.items()},
            "is_input_list": False,
            "output": list(cls.RETURN_TYPES),
            "output_is_list": [False] * len(cls.RETURN_TYPES),
            "output_name": list(cls.RETURN_NAMES or cls.RETURN_TYPES),
            "name": cls.NAME,
            "display_name": cls.DISPLAY_NAME,
            "description": cls.DESCRIPTION,
            "python_module": cls.PYTHON_MODULE,
            "category": cls.CATEGORY,
            "output_node": cls.OUTPUT_NODE,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }
        if cls.OUTPUT_TOOLTIPS is not None:
            info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
        return info


def declared_inputs(spec: dict[str, dict[str, tuple]]) -> dict[str, tuple[str, tuple]]:
    """name -> ("required" | "optional", (type, options)) of the inputs a graph may set (hidden ones excluded)."""
    out = {}
    for kind in ("required", "optional"):
        for name, entry in spec.get(kind, {}).items():
            out[name] = (kind, entry)
    return out


def full_type_name(cls: type) -> str:
    """ComfyUI's exception_type: "module.QualName", builtins by name only."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
