"""ONNX Runtime backend: one ``InferenceSession`` per component, fed and read through I/O binding on torch tensors.

Inputs are bound straight from the caller's tensors and outputs are written into preallocated torch tensors, on
the CPU and on CUDA alike, so a step on the GPU makes no host round trip. Output shapes follow from the manifest's
symbolic shapes and the feed shapes.

Output buffers are reused: each engine keeps one set of output tensors per output shape (the last
``MAX_CACHED_SHAPES`` shapes) and writes into it on every call with that shape. Clone an output to keep it past
the next ``infer``.

CUDA synchronization: ONNX Runtime runs on its own stream. ``infer`` waits for the caller's current torch stream
before the run (so inputs written by queued torch kernels are complete), and ONNX Runtime synchronizes its own
stream before ``run_with_iobinding`` returns, so the outputs are ready for any stream. This costs a host sync per
call; binding ONNX Runtime to torch's stream instead (``user_compute_stream``) would fix the stream when the
session is made and break callers that switch streams. The engine is not CUDA-graph capturable either way.

Safety: before a session is made, the ``.onnx`` file (and its external-data file) must match the manifest's
sha256, and every external-data location in the graph must be the data file the manifest names, a plain relative
name inside the folder (``sdtrt.runtime.verify``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.backends.common import EngineBase, bind_dims, close_all, engine_device, resolve_shape, torch_dtype
from sdtrt.runtime.deps import require
from sdtrt.runtime.engine import BackendOptions, WeightUpdate
from sdtrt.runtime.errors import ArtifactError, BackendError
from sdtrt.runtime.manifest import ComponentEntry, Manifest
from sdtrt.runtime.verify import verified_model_file

log = logging.getLogger(__name__)

NAME = "onnxruntime"
INSTALL_HINT = 'pip install "sdtrt[ort]"'
GPU_INSTALL_HINT = 'pip install "sdtrt[ort-gpu]"'
MAX_CACHED_SHAPES = 4
LOG_SEVERITY_ERROR = 3

# ONNX Runtime's element type for each manifest dtype: numpy types, or the ONNX enum where numpy has none.
ELEMENT_TYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": 16,  # onnx.TensorProto.BFLOAT16
    "int32": np.int32,
    "int64": np.int64,
}
ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
}


def available() -> tuple[bool, str]:
    """(True, "") when onnxruntime imports; never raises."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, f"onnxruntime is not installed: {INSTALL_HINT}"
    return True, ""


class OnnxRuntimeEngine(EngineBase):
    """One component run by an ONNX Runtime session.

    ``infer`` returns tensors the engine reuses on the next call with the same output shapes: clone what you keep.
    One caller at a time: the engine holds one I/O binding.
    """

    graph_capturable = False

    def __init__(
        self,
        name: str,
        entry: ComponentEntry,
        session: Any,
        device: torch.device,
        scale_factor: int,
        reopen: Any = None,
    ):
        super().__init__(name, entry.inputs, entry.outputs, device)
        self._session = session
        self._reopen = reopen  # initializer overrides -> a new session of the same file, or None
        self._overrides: dict[str, Any] = {}
        self._binding = session.io_binding()
        self._scale_factor = scale_factor
        self._device_type = device.type
        self._device_id = device.index or 0
        self._buffers: OrderedDict[tuple[tuple[int, ...], ...], dict[str, torch.Tensor]] = OrderedDict()

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once; the returned tensors are buffers reused by the next call with the same shapes."""
        self.check_open()
        dims = bind_dims(self.name, self.inputs, feeds, self.device)
        outputs = self._output_buffers(dims)
        binding = self._binding
        # Keep the (possibly copied) contiguous inputs alive until the run has read them.
        bound = [feeds[entry.name].contiguous() for entry in self.inputs]
        for entry, tensor in zip(self.inputs, bound, strict=True):
            self._bind(binding.bind_input, entry.name, entry.dtype, tensor)
        for entry in self.outputs:
            self._bind(binding.bind_output, entry.name, entry.dtype, outputs[entry.name])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run {self.name} (run_with_iobinding): {exc}") from exc
        finally:
            binding.clear_binding_inputs()
        return dict(outputs)

    def update_weights(self, update: WeightUpdate) -> None:
        """Run with ``update``'s initializer values instead of the file's (LoRA): a new session, the file unchanged.

        An update without changes runs the file's own weights again. The arrays are kept alive as long as the
        session uses them.
        """
        self.check_open()
        if self._reopen is None:
            raise BackendError(f"{self.name}: this engine cannot change its weights (it was not opened from a file)")
        values = dict(update.initializer_values())
        if not values and not self._overrides:
            return
        session = self._reopen(values)
        self._session, self._binding = session, session.io_binding()
        self._overrides = values

    def _bind(self, bind: Any, name: str, dtype: str, tensor: torch.Tensor) -> None:
        bind(name, self._device_type, self._device_id, ELEMENT_TYPES[dtype], tuple(tensor.shape), tensor.data_ptr())

    def _output_buffers(self, dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        shapes = tuple(resolve_shape(entry.shape, dims, self._scale_factor) for entry in self.outputs)
        buffers = self._buffers.get(shapes)
        if buffers is not None:
            self._buffers.move_to_end(shapes)
            return buffers
        buffers = {
            entry.name: torch.empty(shape, dtype=torch_dtype(entry.dtype), device=self.device)
            for entry, shape in zip(self.outputs, shapes, strict=True)
        }
        self._buffers[shapes] = buffers
        while len(self._buffers) > MAX_CACHED_SHAPES:
            self._buffers.popitem(last=False)
        return buffers

    def _release(self) -> None:
        self._buffers.clear()
        self._binding.clear_binding_outputs()
        self._binding = None
        self._session = None


def open_engines(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    components: Sequence[str],
    device: torch.device | str,
    options: BackendOptions | None = None,
) -> dict[str, OnnxRuntimeEngine]:
    """One engine per component of the artifact ``folder``, on ``device`` (cpu or cuda)."""
    ort = require("onnxruntime", "the onnxruntime backend", "ort")
    options = options or BackendOptions()
    root = Path(folder)
    if manifest.kind != "onnx":
        raise ArtifactError(
            f"{str(root)!r} holds {manifest.kind} engines, not ONNX files; run it with the {manifest.kind} backend"
        )
    providers = execution_providers(ort, torch.device(device))
    device = engine_device(device)
    entries = {name: manifest.component(name) for name in dict.fromkeys(components)}
    for name, entry in entries.items():
        check_precision(name, entry, options)
    engines: dict[str, OnnxRuntimeEngine] = {}
    try:
        for name, entry in entries.items():
            path = verified_model_file(root, entry)
            quantized = entry.precision in ("int8", "fp8")
            # The shallow UNet runs between full UNet steps: its pool's threads spinning after each run took the CPU
            # from the next full step (on 2 cores, shapes N=3: full step 18.3 ms instead of 12.2 ms).
            spin = options.spin and name != "unet_shallow"
            make = partial(create_session, ort, path, providers, options, quantized=quantized, spin=spin)
            session = make()
            check_interface(name, entry, session, device)

            def reopen(values: Mapping[str, np.ndarray], make: Callable[..., Any] = make) -> Any:
                return make(initializers=values)

            engines[name] = OnnxRuntimeEngine(name, entry, session, device, manifest.model.vae_scale_factor, reopen)
    except BaseException:
        close_all(engines)
        raise
    return engines


def execution_providers(ort: ModuleType, device: torch.device) -> list[Any]:
    """ONNX Runtime providers for ``device``; BackendError when this onnxruntime cannot run there."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise BackendError(f"the onnxruntime backend runs on 'cpu' or 'cuda' devices, got {str(device)!r}")
    found = ort.get_available_providers()
    if "CUDAExecutionProvider" not in found:
        raise BackendError(
            f"this onnxruntime has no CUDA provider (it has {', '.join(found)}); to run on {device}, replace the "
            f"CPU-only onnxruntime with onnxruntime-gpu: pip uninstall onnxruntime && {GPU_INSTALL_HINT}"
        )
    index = engine_device(device).index
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def check_precision(name: str, entry: ComponentEntry, options: BackendOptions) -> None:
    """The ONNX file fixes the precision; refuse a request for another one."""
    if options.precision not in ("auto", entry.precision):
        raise BackendError(
            f"this artifact is {entry.precision} ({name}), but precision {options.precision} was asked for; "
            f"onnxruntime runs the precision the ONNX file was exported in: re-export with "
            f"--precision {options.precision}, or use precision auto"
        )


def create_session(
    ort: ModuleType,
    path: Path,
    providers: list[Any],
    options: BackendOptions,
    quantized: bool = False,
    initializers: Mapping[str, np.ndarray] | None = None,
    spin: bool = True,
) -> Any:
    """An InferenceSession of ``path``; ``initializers`` replace the file's values of those names. ``spin=False``:
    its thread pool's threads sleep as soon as a run ends instead of spinning for the next one."""
    session_options = ort.SessionOptions()
    session_options.log_severity_level = LOG_SEVERITY_ERROR
    if not spin:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # add_initializer does not copy: the OrtValues (and their numpy arrays) must outlive the session.
    kept = {key: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for key, v in (initializers or {}).items()}
    for key, value in kept.items():
        session_options.add_initializer(key, value)
    if quantized:
        # Keep Q/DQ pairs as written: ORT's fused int8 CPU kernels overflow on CPUs without VNNI, and the unfused
        # graph computes what TensorRT computes from the same Q/DQ nodes.
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif kept:
        # ONNX Runtime's layout optimizations (NCHWc convolutions on the CPU, level ORT_ENABLE_ALL) read the file's
        # weights, not the overrides: measured on onnxruntime 1.32, a replaced conv weight had no effect at all.
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if options.threads > 0:
        session_options.intra_op_num_threads = options.threads
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    except Exception as exc:
        raise BackendError(f"onnxruntime could not load {path.name} (InferenceSession): {exc}") from exc
    session.sdtrt_initializers = kept
    return session


def check_interface(name: str, entry: ComponentEntry, session: Any, device: torch.device) -> None:
    """The session's inputs/outputs and provider must be what the manifest and the caller expect."""
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendError(
            f"onnxruntime could not start its CUDA provider for {name} (it fell back to {session.get_providers()}); "
            "check that the CUDA and cuDNN libraries match your onnxruntime-gpu version"
        )
    declared = {t.name: ORT_TYPES.get(t.dtype, t.dtype) for t in entry.inputs + entry.outputs}
    found = {t.name: t.type for t in list(session.get_inputs()) + list(session.get_outputs())}
    if declared != found:
        raise ArtifactError(
            f"{entry.file} has inputs/outputs {found}, but the manifest declares {declared}; re-export the artifact"
        )
