"""``sdtrt check ENGINES``: run each TensorRT engine and ONNX Runtime on the ONNX file it was built from, and compare.

For every engine of an engine folder (manifest kind "tensorrt"), the ONNX file it was built from (in the artifact
folder ``extra["artifacts"]`` names, with the sha256 the engine's build key records) runs with ONNX Runtime on the
CPU, and the engine with TensorRT, on the same seeded inputs (``sdtrt.export.check.make_inputs``) at the engine
profile's min, opt and max shapes, through Polygraphy's runners (``OnnxrtRunner``, ``TrtRunner``) and
``Comparator.run``. Each output at each shape gives one :class:`~sdtrt.export.check.CheckRow` (max abs error,
relative L2 error against ONNX Runtime, tolerance, pass/fail): ``format_table`` prints them as ``sdtrt check``
prints an ONNX artifact's. The errors are computed here, with ``sdtrt check``'s own formula, rather than by
``Comparator.compare_accuracy``, whose per-element atol/rtol verdict is not the number the table reports.

Tolerances (relative L2): fp16 engines 1e-2, as for an fp16 artifact; fp32 engines 1e-3, because TensorRT runs fp32
convolutions and matrix products in TF32 by default; quantized engines 1e-1.

Needs tensorrt and an NVIDIA GPU, Polygraphy and ONNX Runtime. Polygraphy's ``TrtRunner`` accepts only a real
``trt.ICudaEngine`` and allocates through CUDA, so it cannot run over the tests' tensorrt double: ``runner`` lets a
caller pass the factory of the TensorRT-side runner (the tests pass one over the double).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.runtime.backends import tensorrt as trt_backend
from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.compare import errors
from sdtrt.runtime.deps import require
from sdtrt.runtime.errors import ArtifactError, BackendError, MissingDependencyError
from sdtrt.runtime.manifest import MANIFEST_NAME, ComponentEntry, Manifest, read_manifest
from sdtrt.runtime.specs import ComponentSpec, TensorSpec, component_spec
from sdtrt.runtime.verify import verified_model_file

from .check import NUMPY_DTYPES, CheckRow, make_inputs

log = logging.getLogger(__name__)

ENGINE_TOLERANCES = {"fp32": 1e-3, "fp16": 1e-2}
QUANTIZED_TOLERANCE = 1e-1
POINTS = ("min", "opt", "max")
RunnerFactory = Callable[[str, Any], Any]  # (component, deserialized engine) -> a Polygraphy runner
Feed = dict[str, np.ndarray]
ELSEWHERE = "run `sdtrt check ENGINES` on a machine with an NVIDIA GPU and TensorRT"


def trt_runner(component: str, engine: Any) -> Any:
    """Polygraphy's TensorRT runner over a deserialized engine."""
    from polygraphy.backend.trt import TrtRunner

    return TrtRunner(engine, name=f"tensorrt-{component}")


def onnxrt_runner(component: str, path: Path) -> Any:
    """Polygraphy's ONNX Runtime runner (CPU) over the ONNX file at ``path``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=f"onnxruntime-{component}")


def check_engines(folder: str | os.PathLike[str], seed: int = 0, runner: RunnerFactory | None = None) -> list[CheckRow]:
    """Compare every engine of the engine folder ``folder`` with ONNX Runtime at its profile's min/opt/max shapes."""
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest.kind != "tensorrt":
        raise ArtifactError(
            f"{str(root)!r} is an ONNX artifact (manifest kind {manifest.kind!r}), not an engine folder; "
            "`sdtrt check` compares it with PyTorch instead (sdtrt.export.check.check_artifacts)"
        )
    require_engine_machine()
    require("polygraphy", "checking TensorRT engines", "trt")
    require("onnxruntime", "checking TensorRT engines", "ort")
    device = trt_compat.engine_device(None, BackendError)
    running = trt_compat.environment(device)
    rows: list[CheckRow] = []
    with trt_compat.device_guard(device):
        trt_compat.take_errors()
        runtime = trt_compat.create_runtime(BackendError)
        for name, entry in manifest.components.items():
            rows += check_engine(root, manifest, name, entry, runtime, running, runner or trt_runner, seed)
    return rows


def require_engine_machine() -> None:
    """One clear error unless tensorrt imports and there is a GPU: engines can be checked only there."""
    try:
        trt_compat.require_tensorrt("checking TensorRT engines")
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"TensorRT engines cannot be checked on this machine: {exc}; {ELSEWHERE}") from exc
    if not trt_compat.gpu_present():
        raise BackendError(
            f"TensorRT engines cannot be checked on this machine: {trt_compat.no_gpu_message()}; {ELSEWHERE}"
        )


def check_engine(
    folder: Path,
    manifest: Manifest,
    name: str,
    entry: ComponentEntry,
    runtime: Any,
    running: dict[str, str],
    runner: RunnerFactory,
    seed: int,
) -> list[CheckRow]:
    """The rows of one engine: every output at the profile's min, opt and max shapes."""
    trt_backend.check_environment(folder, entry, running)
    onnx_path = source_onnx(folder, name, entry)
    engine = trt_backend.load_engine(runtime, folder, entry, running)
    feeds = profile_feeds(manifest, name, entry, engine, seed)
    reference, found = run_pair(name, onnxrt_runner(name, onnx_path), runner(name, engine), [f for _, f in feeds])
    tolerance = ENGINE_TOLERANCES.get(entry.precision, QUANTIZED_TOLERANCE)
    rows = []
    for (label, _), want, got in zip(feeds, reference, found, strict=True):
        for tensor in entry.outputs:
            max_abs, rel = errors(got[tensor.name], want[tensor.name])
            rows.append(CheckRow(name, entry.precision, label, tensor.name, max_abs, rel, tolerance))
    del engine
    return rows


def source_onnx(folder: Path, name: str, entry: ComponentEntry) -> Path:
    """The verified ONNX file the engine of ``name`` was built from; ArtifactError if it is gone or changed."""
    artifacts = entry.extra.get("artifacts")
    rebuild = f"rebuild the engines from the artifact: sdtrt build ARTIFACTS --out {folder}"
    if not isinstance(artifacts, str) or not (Path(artifacts) / MANIFEST_NAME).is_file():
        raise ArtifactError(
            f"{entry.file} does not name the ONNX artifact it was built from, or it is not there any more "
            f"({artifacts!r}); the check runs the same ONNX file with ONNX Runtime: {rebuild}"
        )
    source = read_manifest(artifacts)
    onnx_entry = source.components.get(name)
    built_from = entry.extra.get("key", {}).get("onnx_sha256")
    if onnx_entry is None or onnx_entry.sha256 != built_from:
        found = onnx_entry.sha256[:12] + "..." if onnx_entry else "no such component"
        raise ArtifactError(
            f"{entry.file} was built from a {name} ONNX file with sha256 {str(built_from)[:12]}..., but the artifact "
            f"{artifacts} now has {found}; {rebuild}"
        )
    return verified_model_file(Path(artifacts), onnx_entry)


def profile_feeds(
    manifest: Manifest, name: str, entry: ComponentEntry, engine: Any, seed: int
) -> list[tuple[str, Feed]]:
    """(label, seeded inputs) at the min, opt and max shapes of the engine's optimization profile."""
    spec = component_spec(manifest.model, name)
    ranges = {
        t.name: tuple(trt_compat.dims(d) for d in engine.get_tensor_profile_shape(t.name, 0)) for t in entry.inputs
    }
    feeds = []
    for index, point in enumerate(POINTS):
        shapes = {tensor: bounds[index] for tensor, bounds in ranges.items()}
        # every dimension concrete, so make_inputs takes the shapes as they are (height/width: SDXL's time ids)
        concrete = ComponentSpec(name, tuple(TensorSpec(t.name, t.dtype, shapes[t.name]) for t in spec.inputs), ())
        height, width = getattr(manifest.profile, f"{point}_height"), getattr(manifest.profile, f"{point}_width")
        tensors = make_inputs(concrete, manifest.model, 0, height, width, seed)
        feed = {t.name: tensors[t.name].numpy().astype(NUMPY_DTYPES[t.dtype]) for t in entry.inputs}
        feeds.append((f"{point}:{shapes[entry.inputs[0].name][0]}@{width}x{height}", feed))
    return feeds


def run_pair(name: str, reference: Any, engine: Any, feeds: Sequence[Feed]) -> tuple[list[Any], list[Any]]:
    """The outputs of both runners on every feed (Polygraphy's Comparator.run), per feed."""
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    quiet = contextlib.nullcontext() if log.isEnabledFor(logging.DEBUG) else G_LOGGER.verbosity(G_LOGGER.ERROR)
    try:
        with quiet:
            results = Comparator.run([reference, engine], data_loader=list(feeds))
    except PolygraphyException as exc:
        raise BackendError(
            f"running the {name} engine and ONNX Runtime through Polygraphy failed: {exc}; TensorRT said: "
            + trt_compat.error_text()
        ) from exc
    return list(results[reference.name]), list(results[engine.name])
