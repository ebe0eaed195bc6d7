"""Where each PyTorch weight a LoRA can change ends up in the exported ONNX graph.

The exporter renames weights (a Linear weight that feeds a MatMul becomes ``onnx::MatMul_123``) and transposes
them (MatMul takes ``x @ W.T``), so a LoRA delta computed for ``down_blocks.0...to_q.weight`` cannot be applied
to the ONNX file, or to a TensorRT engine built from it, by name. The map is found by content: every Linear and
Conv2d weight of the module is hashed as it is and transposed, in the precision it was exported in, and matched
against the initializers of the cleaned graph. It is recorded in the manifest (``extra["lora_map"]``) with the
module's config (``extra["module_config"]``), so the runtime can apply LoRAs to ONNX Runtime sessions and refit
TensorRT engines from the artifact alone.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["called_weights", "lora_map", "module_config", "target_digests"]


def _digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().cpu().contiguous()
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"", digest_size=16).digest()


def target_digests(module: nn.Module) -> dict[bytes, list[tuple[str, bool]]]:
    """Content hash -> [(parameter name, transposed)] of every Linear / Conv2d weight of ``module``."""
    found: dict[bytes, list[tuple[str, bool]]] = {}
    for path, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if not isinstance(child, nn.Linear | nn.Conv2d) or not isinstance(weight, torch.Tensor):
            continue
        name = f"{path}.weight" if path else "weight"
        found.setdefault(_digest(weight), []).append((name, False))
        if weight.ndim == 2:
            found.setdefault(_digest(weight.t()), []).append((name, True))
    return found


def called_weights(wrapper: nn.Module, inner: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """The Linear / Conv2d weights of ``inner`` (names as in its state dict) that run when ``wrapper`` runs on
    ``inputs``: what a LoRA must change in a network that uses only part of a module (the shallow UNet)."""
    called: set[str] = set()
    handles = []
    for path, child in inner.named_modules():
        if isinstance(child, nn.Linear | nn.Conv2d):
            name = f"{path}.weight" if path else "weight"
            handles.append(child.register_forward_pre_hook(lambda *_, name=name: called.add(name)))
    try:
        with torch.no_grad():
            wrapper(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(called)


def _initializer_digest(onnx: Any, tensor: Any) -> bytes:
    if tensor.raw_data:
        raw = tensor.raw_data
    else:
        raw = onnx.numpy_helper.to_array(tensor).tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()


def lora_map(digests: dict[bytes, list[tuple[str, bool]]], graph: Any) -> dict[str, dict[str, Any]]:
    """Parameter name -> {"initializer": name, "transposed": bool} for every weight found in ``graph``.

    ``graph`` is the cleaned ONNX model with its weights in memory (before it is saved with external data).
    A weight whose content matches more than one initializer, or an initializer matching several weights (equal
    values), is left out: a LoRA that touches it is refused at run time rather than applied to the wrong tensor.
    """
    import onnx
    import onnx.numpy_helper  # noqa: F401  (the submodule, for to_array)

    matches: dict[str, list[tuple[str, bool]]] = {}
    for tensor in graph.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(tensor.dims) not in (2, 4):
            continue
        for name, transposed in digests.get(_initializer_digest(onnx, tensor), []):
            matches.setdefault(name, []).append((tensor.name, transposed))
    result: dict[str, dict[str, Any]] = {}
    claimed: dict[str, int] = {}
    for places in matches.values():
        for initializer, _ in places:
            claimed[initializer] = claimed.get(initializer, 0) + 1
    for name, places in sorted(matches.items()):
        if len(places) == 1 and claimed[places[0][0]] == 1:
            result[name] = {"initializer": places[0][0], "transposed": places[0][1]}
    missing = sum(1 for entries in digests.values() for n, t in entries if not t) - len(result)
    if missing:
        log.debug("%d weights have no unique ONNX initializer (folded or shared); LoRAs cannot change them", missing)
    return result


def module_config(module: Any) -> dict[str, Any]:
    """The module's config as plain JSON data (diffusers' ``config`` or transformers' ``config.to_dict()``)."""
    import json

    config = module.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Through JSON: tuples become lists, and anything else (a path in ``_name_or_path``) its text.
    plain = json.loads(json.dumps(data, default=str))
    return {k: v for k, v in plain.items() if k not in ("torch_dtype", "_name_or_path")}
