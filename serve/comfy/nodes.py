"""The ComfyUI nodes an sdtrt server runs, and their ``/object_info`` description.

``NodeLibrary(checkpoints, loras, folders)`` holds the node classes by ComfyUI class_type and the server state
their COMBO lists come from: ``ckpt_name`` lists the served models, ``lora_name`` the LoRA folder's files,
``image`` the input folder's images, ``sampler_name``/``scheduler`` what the runtime's ComfyUI sampling runs.
Every node is declared as ComfyUI's nodes.py declares it (inputs, defaults, ranges, outputs, category, display
name); values sdtrt does not run are left out of the lists, so a graph naming one fails validation.
"""

from __future__ import annotations

from typing import Any

from .folders import ComfyFolders
from .node import Node
from .nodes_image import IMAGE_NODES
from .nodes_latent import LATENT_NODES
from .nodes_model import MODEL_NODES
from .nodes_sampling import SAMPLING_NODES

NODE_CLASSES: tuple[type[Node], ...] = (*MODEL_NODES, *SAMPLING_NODES, *LATENT_NODES, *IMAGE_NODES)


class NodeLibrary:
    """The node types of one server, by class_type, with the models, LoRAs and folders they list."""

    def __init__(self, checkpoints: Any, loras: Any, folders: ComfyFolders) -> None:
        self.checkpoints = checkpoints  # serve.models.Checkpoints
        self.loras = loras  # serve.loras.LoraLibrary
        self.folders = folders
        self.nodes: dict[str, type[Node]] = {cls.NAME: cls for cls in NODE_CLASSES}

    def get(self, class_type: Any) -> type[Node] | None:
        """The node class of ``class_type``, or None when this server has none of that name."""
        return self.nodes.get(class_type) if isinstance(class_type, str) else None

    @property
    def names(self) -> list[str]:
        return sorted(self.nodes)

    def object_info(self) -> dict[str, dict]:
        """ComfyUI's ``GET /object_info``: every node's description (server.py node_info's schema)."""
        return {name: cls.info(self) for name, cls in self.nodes.items()}

    def node_info(self, class_type: str) -> dict[str, dict]:
        """``GET /object_info/{class_type}``: {class_type: description}, or {} for an unknown name (as ComfyUI)."""
        cls = self.get(class_type)
        return {} if cls is None else {class_type: cls.info(self)}
