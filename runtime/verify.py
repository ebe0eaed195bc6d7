"""Files of an artifact folder checked against its manifest before anything reads them.

A file that does not match the sha256 the manifest records was changed or damaged after it was written; an ONNX
graph whose external-data locations point anywhere but the data file the manifest names would read a file the
manifest does not describe. Every reader (the backends, ``sdtrt check``, ``sdtrt build``, calibration) goes
through these checks; the graph scan needs the ``onnx`` package, and without it only the manifest's own names
and hashes are checked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sdtrt.runtime.errors import ArtifactError
from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.manifest import ComponentEntry, Manifest, check_relative_name, resolve_file

log = logging.getLogger(__name__)

REEXPORT = "the file was changed or damaged after export; re-export the artifact"


def check_sha256(file: str, found: str, expected: str, fix: str = REEXPORT) -> None:
    """ArtifactError unless the digest ``found`` of ``file`` is the sha256 ``expected`` by the manifest."""
    if found != expected:
        raise ArtifactError(
            f"{file} does not match the manifest (sha256 {found[:12]}..., expected {expected[:12]}...): {fix}"
        )


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Refuse an artifact any of whose component files (and data files) were changed after export."""
    for entry in manifest.components.values():
        for file, digest in ((entry.file, entry.sha256), (entry.data_file, entry.data_sha256)):
            if file is not None and digest:
                check_sha256(file, sha256_file(resolve_file(folder, file)), digest)


def verified_model_file(folder: Path, entry: ComponentEntry) -> Path:
    """Path of the component's ONNX file once it and its data file match the manifest and are safe to load."""
    path = resolve_file(folder, entry.file)
    check_sha256(entry.file, sha256_file(path), entry.sha256)
    if entry.data_file is not None:
        data = resolve_file(folder, entry.data_file)
        if entry.data_sha256:
            check_sha256(entry.data_file, sha256_file(data), entry.data_sha256)
    check_external_data(folder, path, entry)
    return path


def check_external_data(folder: Path, path: Path, entry: ComponentEntry) -> None:
    """Refuse a graph whose weights point anywhere but the data file the manifest names (needs ``onnx``)."""
    try:
        import onnx
    except ImportError:
        log.debug("onnx is not installed; relying on the manifest's data file check for %s", entry.file)
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"{entry.file} is not a readable ONNX model ({exc}); re-export the artifact") from exc
    allowed = None if entry.data_file is None else os.path.normpath(entry.data_file)
    for location in external_locations(onnx, model):
        try:
            check_relative_name(location)
            resolve_file(path.parent, location)
        except ArtifactError as exc:
            raise ArtifactError(f"{entry.file} keeps weights at {location!r}, which is refused: {exc}") from exc
        relative = Path(os.path.relpath(path.parent / location, folder)).as_posix()
        if os.path.normpath(relative) != allowed:
            raise ArtifactError(
                f"{entry.file} keeps weights in {location!r}, but the manifest names "
                f"{entry.data_file or 'no data file'}; refusing a file the manifest does not describe "
                "(re-export the artifact)"
            )


def external_locations(onnx: ModuleType, model: Any) -> Iterator[str]:
    """The external-data ``location`` of every tensor in the model, its subgraphs and its functions."""
    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        tensors.extend(_node_tensors(function.node))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations = [item.value for item in tensor.external_data if item.key == "location"]
            yield from locations or [""]


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for graph in subgraphs:
                yield from _graph_tensors(graph)
