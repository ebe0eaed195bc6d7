"""The one place that knows how TensorRT 10.x and 11.x differ, and how sdtrt finds TensorRT and the GPU.

The engine builder (``sdtrt.export.trt_builder``) and the runtime backend (``sdtrt.runtime.backends.tensorrt``)
both go through these helpers, so an API that a TensorRT release renames is handled here and nowhere else:

==========================  ==========================================  ===========================================
what                        TensorRT 10.x                               TensorRT 11.x
==========================  ==========================================  ===========================================
strongly typed network      creation flag ``1 << STRONGLY_TYPED``       always; the flag is deprecated and ignored
activation memory size      ``device_memory_size_v2`` (10.1+),          ``device_memory_size_v2`` (the old name was
                            ``device_memory_size`` before               removed)
context without memory      ``create_execution_context(USER_MANAGED)``  the same (``..._without_device_memory`` was
                            (``..._without_device_memory`` before)      removed)
give a context its memory   ``set_device_memory(ptr, size)`` (10.1+),   ``set_device_memory(ptr, size)``
                            ``device_memory = ptr`` before
==========================  ==========================================  ===========================================

Precision builder flags (``BuilderFlag.FP16``, ``INT8``, ...) are never used: on both versions every tensor type
comes from the ONNX graph (11.x removed the flags). Sources: the TensorRT 10.x -> 11.x migration guide and the
Python API references of both versions.

``tensorrt`` itself is imported only inside functions, so this module imports without it.
"""

from __future__ import annotations

import collections
import importlib
import logging
from typing import TYPE_CHECKING, Any

import torch

from sdtrt.runtime.errors import MissingDependencyError, SdtrtError

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "sdtrt[trt]"'
INDEX_NOTE = (
    "TensorRT's wheels are published on NVIDIA's package index (pypi.nvidia.com); "
    "if pip does not find them, add --extra-index-url https://pypi.nvidia.com"
)
# The tensorrt DataType member names, as the manifest spells dtypes.
DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
    "FP8": "float8",
}

# Tests that run the orchestration on a recording double of tensorrt set this to (GPU name, compute capability):
# the CPU is then accepted as a device and reported as that GPU. Library code never sets it.
_test_device: tuple[str, str] | None = None
_loggers: list[tuple[Any, Any]] = []


def require_tensorrt(feature: str) -> None:
    """Import ``tensorrt`` or raise MissingDependencyError naming ``feature`` and how to install it."""
    try:
        importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but its CUDA libraries do not load
        raise MissingDependencyError(
            f"{feature} needs the Python module 'tensorrt', which failed to import ({exc}). "
            f"Install it with: {INSTALL_HINT} ({INDEX_NOTE})"
        ) from exc


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def major_version(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def network_flags() -> int:
    """``Builder.create_network`` flags for a strongly typed network (the only kind TensorRT 11 builds)."""
    import tensorrt as trt

    if major_version(tensorrt_version()) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def device_memory_size(engine: trt.ICudaEngine) -> int:
    """Bytes of activation memory one execution context of ``engine`` needs."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = engine.device_memory_size
    return int(size)


def create_context_without_memory(engine: trt.ICudaEngine) -> trt.IExecutionContext | None:
    """An execution context whose activation memory the caller provides (``set_context_memory``)."""
    import tensorrt as trt

    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


def set_context_memory(context: trt.IExecutionContext, address: int, size: int) -> None:
    """Give ``context`` the activation buffer at ``address`` of ``size`` bytes."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:
        setattr(context, "device_memory", address)  # noqa: B010 - property missing from the 10.x stubs


def dtype_name(dtype: trt.DataType) -> str:
    """The manifest's name of a TensorRT data type (``float16``, ``int32``, ...)."""
    name = str(dtype.name)
    return DTYPE_NAMES.get(name, name.lower())


def dims(shape: trt.Dims) -> tuple[int, ...]:
    return tuple(int(shape[i]) for i in range(len(shape)))


def logger() -> trt.ILogger:
    """The process's one TensorRT logger: forwards to ``logging`` and keeps the latest errors for messages."""
    import tensorrt as trt

    for module, instance in _loggers:
        if module is trt:
            return instance  # type: ignore[no-any-return]

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=20)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    instance = Logger()
    _loggers.append((trt, instance))
    return instance


def take_errors() -> list[str]:
    """The TensorRT errors logged since the last call (for error messages); clears them."""
    instance = logger()
    errors: collections.deque[str] = getattr(instance, "errors", collections.deque())
    taken = list(errors)
    errors.clear()
    return taken


def no_gpu_message() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"TensorRT needs an NVIDIA GPU, and torch sees none (torch {torch.__version__}, {build}); run on a machine "
        "with an NVIDIA GPU, its driver and a CUDA build of torch"
    )


def gpu_present() -> bool:
    return _test_device is not None or torch.cuda.is_available()


def engine_device(device: torch.device | str | None, error: type[SdtrtError]) -> torch.device:
    """The CUDA device TensorRT will use (with its index); ``error`` when there is none or ``device`` is not one."""
    if _test_device is not None and (device is None or torch.device(device).type == "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise error(no_gpu_message())
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise error(f"TensorRT runs on NVIDIA GPUs, so device {str(dev)!r} cannot be used; use device 'cuda'")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability such as "8.9") of ``device``."""
    if _test_device is not None and device.type == "cpu":
        return _test_device
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def environment(device: torch.device) -> dict[str, str]:
    """What a TensorRT engine is bound to: the TensorRT version and the GPU (name, compute capability)."""
    name, capability = gpu_identity(device)
    return {"tensorrt": tensorrt_version(), "gpu": name, "compute_capability": capability}


def stream_handle(device: torch.device) -> int:
    """The raw handle of torch's current CUDA stream on ``device`` (0 off CUDA, which only the test double sees)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)
