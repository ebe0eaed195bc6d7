"""ONNX graph cleanup and saving: constant folding, dead-node removal, topological order, one data file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import require

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB: larger graphs keep their weights in one external file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
FOLD_SIZE_LIMIT = 64 * 1024**2  # don't materialize folded constants larger than this
# In-memory shape inference serializes and re-parses the whole model (two transient copies); above this size
# it runs on the saved file instead.
IN_MEMORY_INFERENCE_LIMIT = 512 * 1024**2


def weight_bytes(model: Any) -> int:
    """Bytes of the initializers (``ByteSize()`` itself fails on protos over 2 GiB)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def clean_graph(model: Any) -> Any:
    """Fold constants, drop dead nodes and sort topologically with onnx-graphsurgeon; infer shapes."""
    gs = require("onnx_graphsurgeon", "ONNX graph cleanup", "export")
    onnx = require("onnx", "ONNX graph cleanup", "export")
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    graph.fold_constants(size_threshold=FOLD_SIZE_LIMIT, error_ok=True).cleanup().toposort()
    result = gs.export_onnx(graph)
    del result.opset_import[:]
    result.opset_import.extend(model.opset_import)
    result.ir_version = model.ir_version
    if weight_bytes(result) < IN_MEMORY_INFERENCE_LIMIT:
        result = onnx.shape_inference.infer_shapes(result)
    log.debug("graph cleanup: %d -> %d nodes", before, len(result.graph.node))
    return result


def save_model(model: Any, path: Path) -> tuple[Path, Path | None]:
    """Save ``model`` to ``path``; weights go to one ``<name>.data`` file when the graph is too large."""
    onnx = require("onnx", "saving ONNX", "export")
    weights = weight_bytes(model)
    if weights < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        if weights >= IN_MEMORY_INFERENCE_LIMIT:
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
        return path, None
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.unlink(data)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    return path, data
