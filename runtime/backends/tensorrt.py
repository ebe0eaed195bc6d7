"""TensorRT backend: runs the engine folder that ``sdtrt build`` writes (one ``NAME.plan`` per component).

Loading an engine folder checks, before a plan is deserialized:

* the manifest is an engine folder (kind "tensorrt"), not an ONNX artifact;
* every plan was built for the TensorRT version and the GPU compute capability running here (a plan is bound
  to both; TensorRT would refuse it with a bare ``None``);
* every plan's bytes match the manifest's sha256 (a plan is executable code with no integrity check of its own).

Memory: every context is created without activation memory of its own (user-managed), and the engines opened
together share ONE buffer, sized to the largest engine's need. The pipeline runs its stages one after another on
one stream, so they never use it at the same time; do not run two of these engines concurrently. ControlNet
engines (``controlnet_<name>``) are opened like the others and share that buffer: inside a step each ControlNet
runs before the UNet, one at a time, and its residual outputs live in its own output buffers, not in the shared
activation memory, so the UNet may reuse that memory while reading them. Their outputs are shaped by TensorRT from
the input shapes (``latent_height/2`` and the like), and, like every engine here, they enqueue on torch's current
stream without a host sync, so the step with its ControlNets is captured as one CUDA graph. With step caching the
full UNet (``unet``, whose second output ``cache_feature`` is bound like any output) and the shallow one
(``unet_shallow``) are two such engines: a step runs one or the other, never both, so they share the buffer too.

``infer`` makes the engine's GPU the current device (only when it is not), validates names, dtypes and shapes,
calls ``set_input_shape`` only when an input's shape changed, copies an input whose address is not 256-byte aligned
(TensorRT's requirement, e.g. a view at an odd offset) into an aligned buffer kept for the next call, writes into
preallocated output tensors and enqueues the engine on torch's current CUDA stream, with no host sync: it can be
captured in a CUDA graph. (On the legacy default stream, where TensorRT would synchronize on every call, it runs on
a side stream ordered after the caller's work, and the caller's stream waits for it.)

``refit`` replaces the weights of an engine built with ``sdtrt build --refittable`` (``supports_refit``), by ONNX
initializer name; see ``sdtrt.runtime.backends.trt_refit``. ``update_weights`` (the engine protocol's weight
update, e.g. a LoRA) refits through it.

Output buffers are reused: each engine keeps one set per input shape (the last ``MAX_CACHED_SHAPES``) and writes
into it on every call with that shape. Clone an output to keep it past the next ``infer``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdtrt.runtime.backends import trt_compat, trt_refit
from sdtrt.runtime.backends.common import EngineBase, bind_dims, close_all, torch_dtype
from sdtrt.runtime.engine import BackendOptions, WeightUpdate
from sdtrt.runtime.errors import ArtifactError, BackendError, ShapeError
from sdtrt.runtime.manifest import ComponentEntry, Manifest, resolve_file
from sdtrt.runtime.verify import check_sha256

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

NAME = "tensorrt"
MAX_CACHED_SHAPES = 4
Shapes = tuple[tuple[int, ...], ...]


def available() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and torch sees a CUDA GPU; never raises."""
    try:
        trt_compat.require_tensorrt("the tensorrt backend")
    except Exception as exc:
        return False, str(exc)
    if not trt_compat.gpu_present():
        return False, trt_compat.no_gpu_message()
    return True, ""


def rebuild_hint(entry: ComponentEntry, folder: Path) -> str:
    artifacts = entry.extra.get("artifacts") or "ARTIFACTS"
    return f"rebuild the engines on this machine: sdtrt build {artifacts} --out {folder}"


class SharedDeviceMemory:
    """One activation buffer, used by every context of the engines opened together (one at a time)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.tensor = trt_compat.aligned_empty((max(size, trt_compat.ALIGNMENT),), torch.uint8, device)

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())


class TensorRTEngine(EngineBase):
    """One component run by a TensorRT execution context.

    ``infer`` returns tensors the engine reuses on the next call with the same input shapes: clone what you keep.
    """

    graph_capturable = True

    def __init__(
        self,
        name: str,
        entry: ComponentEntry,
        engine: trt.ICudaEngine,
        context: trt.IExecutionContext,
        memory: SharedDeviceMemory,
        device: torch.device,
    ) -> None:
        super().__init__(name, entry.inputs, entry.outputs, device)
        self.graph_capturable = device.type == "cuda"
        self._engine: Any = engine
        self._context: Any = context
        self._memory: SharedDeviceMemory | None = memory
        self._ranges = {
            t.name: tuple(trt_compat.dims(d) for d in engine.get_tensor_profile_shape(t.name, 0)) for t in self.inputs
        }
        self._context_shapes: dict[str, tuple[int, ...]] = {}
        self._buffers: OrderedDict[Shapes, dict[str, torch.Tensor]] = OrderedDict()
        self._staging: dict[str, torch.Tensor] = {}  # aligned copies of misaligned inputs, reused
        self._side_stream: torch.cuda.Stream | None = None
        self._changed_weights: set[str] = set()  # initializers an update set to other values than the file's

    @property
    def supports_refit(self) -> bool:
        """True when the engine was built refittable (``sdtrt build --refittable``), so ``refit`` can run."""
        return self._engine is not None and bool(getattr(self._engine, "refittable", False))

    def refit(self, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Replace weights of the engine in place: ONNX initializer name -> new value in its layout and dtype.

        Enqueued on torch's current stream after the engine's earlier calls; later calls use the new weights.
        Raises BackendError (the engine unchanged) for a non-refittable engine, unknown names (all listed), a dtype
        or size that differs from the engine's, or weights TensorRT needs together with these that are missing.
        """
        self.check_open()
        with trt_compat.device_guard(self.device):
            trt_refit.refit_engine(self.name, self._engine, weights, self.device)

    def update_weights(self, update: WeightUpdate) -> None:
        """Refit to ``update``'s initializer values (LoRA), putting back the file's values of the weights an earlier
        update changed and this one leaves alone; only engines built with ``--refittable`` (else BackendError)."""
        changed = dict(update.initializer_values())
        restore = sorted(self._changed_weights - changed.keys())
        values = {**changed, **update.base_initializers(restore)}
        if values:
            self.refit(values)
        self._changed_weights = set(changed)

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once; the returned tensors are buffers reused by the next call with the same input shapes."""
        self.check_open()
        with trt_compat.device_guard(self.device):
            return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bind_dims(self.name, self.inputs, feeds, self.device)
        shapes = tuple(tuple(int(d) for d in feeds[t.name].shape) for t in self.inputs)
        self._set_shapes(shapes)
        outputs = self._output_buffers(shapes)
        context = self._context
        # Keep the (possibly copied) contiguous inputs alive until the engine is enqueued; later reuse of their
        # memory is ordered after it on the same stream.
        bound = [self._bindable(t.name, feeds[t.name]) for t in self.inputs]
        for entry, tensor in zip(self.inputs, bound, strict=True):
            self._address(context, entry.name, tensor)
        for name, tensor in outputs.items():
            self._address(context, name, tensor)
        if not self._enqueue(context):
            raise BackendError(
                f"TensorRT failed to run {self.name} (execute_async_v3 returned False): {trt_compat.error_text()}"
            )
        return dict(outputs)

    def _bindable(self, name: str, feed: torch.Tensor) -> torch.Tensor:
        """``feed`` as a contiguous tensor at a 256-byte aligned address (copied into a kept buffer if not)."""
        tensor = feed.contiguous()
        if trt_compat.is_aligned(tensor):
            return tensor
        staging = self._staging.get(name)
        if staging is None or staging.shape != tensor.shape or staging.dtype != tensor.dtype:
            staging = trt_compat.aligned_empty(tuple(tensor.shape), tensor.dtype, self.device)
            self._staging[name] = staging
        staging.copy_(tensor)
        return staging

    def _enqueue(self, context: Any) -> bool:
        """Enqueue on torch's current stream; off the legacy default stream, which TensorRT would sync each call."""
        if self.device.type != "cuda" or torch.cuda.current_stream(self.device).cuda_stream != 0:
            return bool(context.execute_async_v3(trt_compat.stream_handle(self.device)))
        current = torch.cuda.current_stream(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(current)  # inputs written by queued torch kernels are ready
        done = bool(context.execute_async_v3(side.cuda_stream))
        current.wait_stream(side)  # whatever runs next on the caller's stream sees the outputs
        return done

    def _address(self, context: Any, name: str, tensor: torch.Tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise BackendError(f"TensorRT refused the buffer of {self.name} tensor {name!r} (set_tensor_address)")

    def _set_shapes(self, shapes: Shapes) -> None:
        """Check every input against the engine's profile, then set only the shapes that changed."""
        current = self._context_shapes
        changed = [(t.name, s) for t, s in zip(self.inputs, shapes, strict=True) if current.get(t.name) != s]
        for name, shape in changed:
            self.check_profile(name, shape)
        for name, shape in changed:
            if not self._context.set_input_shape(name, shape):
                raise BackendError(
                    f"TensorRT refused shape {list(shape)} for {self.name} input {name!r} (set_input_shape): "
                    + trt_compat.error_text()
                )
            self._context_shapes[name] = shape

    def check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        """ShapeError naming the allowed range unless ``shape`` lies inside the engine's optimization profile."""
        low, _, high = self._ranges[name]
        if len(shape) == len(low) and all(lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            return
        raise ShapeError(
            f"{self.name} input {name!r} has shape {list(shape)}, outside this engine's profile: "
            f"min {list(low)} .. max {list(high)}. Ask for a size and batch inside the range the engines were "
            "built for, or rebuild them with a wider one (sdtrt build --dynamic --min-size/--max-size, --max-batch)"
        )

    def _output_buffers(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        buffers = self._buffers.get(shapes)
        if buffers is not None:
            self._buffers.move_to_end(shapes)
            return buffers
        buffers = {}
        for entry in self.outputs:
            shape = trt_compat.dims(self._context.get_tensor_shape(entry.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"TensorRT left output {entry.name!r} of {self.name} unresolved: {list(shape)}")
            buffers[entry.name] = trt_compat.aligned_empty(shape, torch_dtype(entry.dtype), self.device)
        self._buffers[shapes] = buffers
        while len(self._buffers) > MAX_CACHED_SHAPES:
            self._buffers.popitem(last=False)
        return buffers

    def _release(self) -> None:
        self._buffers.clear()
        self._staging.clear()
        self._context = None  # before its engine
        self._engine = None
        self._memory = None


def open_engines(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    components: Sequence[str],
    device: torch.device | str,
    options: BackendOptions | None = None,
) -> dict[str, TensorRTEngine]:
    """One engine per component of the engine folder ``folder``, on a CUDA ``device``, sharing one activation buffer."""
    trt_compat.require_tensorrt("the tensorrt backend")

    root = Path(folder)
    if manifest.kind != "tensorrt":
        raise ArtifactError(
            f"{str(root)!r} is an ONNX artifact (manifest kind {manifest.kind!r}), not a TensorRT engine folder; "
            f"build engines with `sdtrt build {root} --out ENGINES` and open ENGINES with the tensorrt backend"
        )
    dev = trt_compat.engine_device(device, BackendError)
    trt_compat.take_errors()  # only errors from here on belong in this call's messages
    entries = {name: manifest.component(name) for name in dict.fromkeys(components)}
    for name, entry in entries.items():
        check_precision(name, entry, options or BackendOptions())
    running = trt_compat.environment(dev)
    for entry in entries.values():
        check_environment(root, entry, running)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        runtime = trt_compat.create_runtime(BackendError)
        loaded = {name: load_engine(runtime, root, entry, running) for name, entry in entries.items()}
        size = max((trt_compat.device_memory_size(e) for e in loaded.values()), default=0)
        engines = create_engines(entries, loaded, SharedDeviceMemory(size, dev), dev)
    log.info(
        "opened %d TensorRT engine(s) on %s, sharing one %.1f MiB activation buffer", len(engines), dev, size / 2**20
    )
    return engines


def create_engines(
    entries: Mapping[str, ComponentEntry], loaded: Mapping[str, Any], memory: SharedDeviceMemory, device: torch.device
) -> dict[str, TensorRTEngine]:
    """A context per deserialized engine, all given the same activation buffer ``memory``."""
    engines: dict[str, TensorRTEngine] = {}
    try:
        for name, engine in loaded.items():
            context = trt_compat.create_context_without_memory(engine)
            if context is None:
                raise BackendError(
                    f"TensorRT could not create an execution context for {name} (create_execution_context): "
                    + trt_compat.error_text()
                )
            trt_compat.set_context_memory(context, memory.address, memory.size)
            engines[name] = TensorRTEngine(name, entries[name], engine, context, memory, device)
    except BaseException:
        close_all(engines)
        raise
    return engines


def check_precision(name: str, entry: ComponentEntry, options: BackendOptions) -> None:
    """An engine runs the types it was built with; refuse a request for another precision."""
    if options.precision not in ("auto", entry.precision):
        raise BackendError(
            f"the {name} engine was built from a {entry.precision} graph, but precision {options.precision} "
            "was asked for; a TensorRT engine runs the types it was built with: build engines from an "
            f"artifact exported with --precision {options.precision}, or use precision auto"
        )


def check_environment(folder: Path, entry: ComponentEntry, running: Mapping[str, str]) -> None:
    """BackendError unless ``entry`` was built for the TensorRT version and compute capability running here."""
    key = entry.extra.get("key")
    if not isinstance(key, dict):
        raise ArtifactError(f"{entry.file} has no build key in the manifest; {rebuild_hint(entry, folder)}")
    built = {k: str(key.get(k)) for k in ("tensorrt", "compute_capability", "gpu")}
    if built["tensorrt"] != running["tensorrt"] or built["compute_capability"] != running["compute_capability"]:
        raise BackendError(f"{mismatch_text(entry, built, running)}; {rebuild_hint(entry, folder)}")
    if built["gpu"] != running["gpu"]:
        log.warning(
            "%s was built on a %s and runs on a %s (same compute capability %s): it works, but may be slower than "
            "an engine built here",
            entry.file,
            built["gpu"],
            running["gpu"],
            running["compute_capability"],
        )


def mismatch_text(entry: ComponentEntry, built: Mapping[str, str], running: Mapping[str, str]) -> str:
    return (
        f"{entry.file} was built for TensorRT {built['tensorrt']} on a GPU of compute capability "
        f"{built['compute_capability']} ({built['gpu']}); this machine runs TensorRT {running['tensorrt']} on "
        f"compute capability {running['compute_capability']} ({running['gpu']}). A TensorRT engine loads only on the "
        "TensorRT version and GPU architecture it was built for"
    )


def read_verified_plan(folder: Path, entry: ComponentEntry) -> bytes:
    """The plan's bytes, once they match the manifest's sha256 (the very bytes that will be deserialized)."""
    data = resolve_file(folder, entry.file).read_bytes()
    fix = f"the plan was changed or damaged after it was built; refusing to load it. {rebuild_hint(entry, folder)}"
    check_sha256(entry.file, hashlib.sha256(data).hexdigest(), entry.sha256, fix)
    return data


def load_engine(runtime: trt.Runtime, folder: Path, entry: ComponentEntry, running: Mapping[str, str]) -> Any:
    """Deserialize the verified plan of ``entry`` and check its interface against the manifest."""
    data = read_verified_plan(folder, entry)
    engine = runtime.deserialize_cuda_engine(data)
    del data
    if engine is None:
        key = entry.extra.get("key", {})
        built = {k: str(key.get(k)) for k in ("tensorrt", "compute_capability", "gpu")}
        raise BackendError(
            f"TensorRT could not deserialize {entry.file} (deserialize_cuda_engine returned None: "
            f"{trt_compat.error_text()}). "
            f"{mismatch_text(entry, built, running)}; {rebuild_hint(entry, folder)}"
        )
    check_interface(entry, engine)
    return engine


def engine_interface(engine: trt.ICudaEngine) -> tuple[dict[str, str], dict[str, str]]:
    """({input: dtype}, {output: dtype}) of a deserialized engine."""
    import tensorrt as trt

    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        target = inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs
        target[name] = trt_compat.dtype_name(engine.get_tensor_dtype(name))
    return inputs, outputs


def check_interface(entry: ComponentEntry, engine: trt.ICudaEngine) -> None:
    """ArtifactError unless the engine's inputs/outputs and dtypes are the ones the manifest declares."""
    found = engine_interface(engine)
    declared = ({t.name: t.dtype for t in entry.inputs}, {t.name: t.dtype for t in entry.outputs})
    if found != declared:
        raise ArtifactError(
            f"{entry.file} has inputs {found[0]} and outputs {found[1]}, but the manifest declares inputs "
            f"{declared[0]} and outputs {declared[1]}; rebuild the engines"
        )
