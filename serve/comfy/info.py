"""The informational answers of ComfyUI's protocol: ``/system_stats``, ``/models``, ``/models/{folder}``.

sdtrt serves engine folders, not ComfyUI's model files, so every model folder ComfyUI has is listed, and each
holds what the node that reads it offers (``checkpoints``: ``CheckpointLoaderSimple``'s ``ckpt_name`` list, the
served models; ``loras``: ``LoraLoader``'s; ``controlnet``: ``ControlNetLoader``'s) or nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# ComfyUI's folder_paths.folder_names_and_paths keys, in its order
MODEL_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "custom_nodes",
    "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
)  # fmt: skip
# folder -> (node class, input) whose choices are that folder's files
FOLDER_INPUTS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "controlnet": ("ControlNetLoader", "control_net_name"),
}


def combo_values(object_info: dict[str, Any], node: str, name: str) -> list[str]:
    """The choices of COMBO input ``name`` of ``node`` in an ``/object_info`` answer ([] if there is none)."""
    inputs = object_info.get(node, {}).get("input", {})
    for group in ("required", "optional"):
        spec = inputs.get(group, {}).get(name)
        if spec:
            values = spec[1].get("options") if spec[0] == "COMBO" and len(spec) > 1 else spec[0]
            return [str(v) for v in values] if isinstance(values, list) else []
    return []


def folder_files(object_info: dict[str, Any], folder: str) -> list[str] | None:
    """``/models/{folder}``: the names its node offers; None for a folder ComfyUI does not have."""
    if folder not in MODEL_FOLDERS:
        return None
    node_input = FOLDER_INPUTS.get(folder)
    return combo_values(object_info, *node_input) if node_input else []


def system_stats(device: str, argv: list[str] | None = None) -> dict[str, Any]:
    """``/system_stats`` with ComfyUI's keys; ``comfyui_version`` is sdtrt's version, ``device`` where the current
    model runs ("cpu", "cuda", "cuda:1", ...)."""
    import torch

    from sdtrt import __version__

    ram_total, ram_free = _ram()
    return {
        "system": {
            "os": os.name,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": f"sdtrt {__version__}",
            "python_version": sys.version,
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": list(sys.argv if argv is None else argv),
        },
        "devices": [_device(device or "cpu", ram_total, ram_free)],
    }


def _ram() -> tuple[int, int]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except ImportError:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * size
        return pages * size, free


def _device(device: str, ram_total: int, ram_free: int) -> dict[str, Any]:
    import torch

    kind, _, index = device.partition(":")
    entry = {"name": device, "type": kind, "index": int(index) if index.isdigit() else None}
    if kind == "cuda" and torch.cuda.is_available():
        number = int(index) if index.isdigit() else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(number)
        entry.update(name=f"cuda:{number} {torch.cuda.get_device_name(number)}", index=number)
        used_by_torch = torch.cuda.memory_reserved(number)
        entry.update(vram_total=total, vram_free=free, torch_vram_total=used_by_torch,
                     torch_vram_free=used_by_torch - torch.cuda.memory_allocated(number))  # fmt: skip
        return entry
    entry.update(vram_total=ram_total, vram_free=ram_free, torch_vram_total=ram_total, torch_vram_free=ram_free)
    return entry
