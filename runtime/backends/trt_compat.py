"""The one place that knows how TensorRT 10.x and 11.x differ, and how sdtrt finds TensorRT and the GPU.

The engine builder (``sdtrt.export.trt_builder``) and the runtime backend (``sdtrt.runtime.backends.tensorrt``)
both go through these helpers, so an API that a TensorRT release renames is handled here and nowhere else:

==========================  ==========================================  ===========================================
what                        TensorRT 10.x                               TensorRT 11.x
==========================  ==========================================  ===========================================
strongly typed network      creation flag ``1 << STRONGLY_TYPED``       always; the flag (now member 0) is deprecated
                            (member 1)                                  and ignored, so sdtrt passes no flag
activation memory size      ``device_memory_size_v2`` (10.1+),          ``device_memory_size_v2`` (the old name was
                            ``device_memory_size`` before               removed)
context without memory      ``create_execution_context(USER_MANAGED)``  the same (``..._without_device_memory`` was
                            (10.0+; ``..._without_device_memory``       removed)
                            before 10)
give a context its memory   ``set_device_memory(ptr, size)`` (10.1+),   ``set_device_memory(ptr, size)``
                            the ``device_memory = ptr`` setter in 10.0
==========================  ==========================================  ===========================================

Precision builder flags (``BuilderFlag.FP16``, ``INT8``, ...) are never used: on both versions every tensor type
comes from the ONNX graph (11.x removed the flags). Sources: the TensorRT 10.x -> 11.x migration guide and the
Python API references of both versions.

Also here: which TensorRT wheel fits this torch (``tensorrt-cu12`` or ``tensorrt-cu13``, the ``trt-cu12`` /
``trt-cu13`` extras), turning TensorRT's "factory function returned nullptr" into an error that names the likely
cause, the 256-byte alignment TensorRT asks of every tensor address, and the one logger every call shares.

``tensorrt`` itself is imported only inside functions, so this module imports without it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from sdtrt.runtime.errors import MissingDependencyError, SdtrtError

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

# TensorRT's wheels per CUDA major version, as sdtrt's extras name them (the plain ``trt`` extra takes the
# ``tensorrt`` metapackage, which resolves to the CUDA 13 build since TensorRT 10.13.3).
CUDA_EXTRAS = {"12": "trt-cu12", "13": "trt-cu13"}
ALIGNMENT = 256  # bytes: TensorRT asks every tensor address (and the activation memory) to be a multiple of this
FIRST_ERRORS = 10  # the first errors of a call usually name the cause ...
LAST_ERRORS = 20  # ... the last ones where it stopped
LAST_WARNINGS = 10
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


def matching_extra(cuda: str | None) -> str | None:
    """The sdtrt extra whose TensorRT wheel is built for the CUDA version ``cuda`` (torch's), if there is one."""
    if not cuda:
        return None
    return CUDA_EXTRAS.get(cuda.split(".")[0])


def install_hint() -> str:
    """The pip command that installs the TensorRT wheel matching this torch's CUDA build."""
    cuda = torch.version.cuda
    extra = matching_extra(cuda)
    if cuda and extra is not None:
        return f'pip install "sdtrt[{extra}]" (TensorRT for CUDA {cuda.split(".")[0]}, like this torch)'
    found = f"CUDA {cuda}" if cuda else "a CPU-only build, which TensorRT cannot use"
    return (
        'pip install "sdtrt[trt-cu12]" or "sdtrt[trt-cu13]", the one matching the CUDA version of your torch '
        f"build (this torch is {found})"
    )


def extra_advice() -> str:
    """Which TensorRT extra fits this machine's torch, for ``sdtrt doctor``."""
    cuda = torch.version.cuda
    if not cuda:
        return "none can run here: this torch is a CPU-only build, and TensorRT needs a CUDA build of torch and a GPU"
    extra = matching_extra(cuda)
    if extra is None:
        return f"none fits torch's CUDA {cuda}: TensorRT wheels exist for CUDA 12 and 13; install such a torch"
    advice = f'{extra} (torch is built for CUDA {cuda}): pip install "sdtrt[{extra}]"'
    wheel = tensorrt_wheel_cuda()
    if wheel is not None and wheel != cuda.split(".")[0]:
        advice += f"; the TensorRT installed now is the CUDA {wheel} build, which does not match"
    return advice


def tensorrt_wheel_cuda() -> str | None:
    """The CUDA major version of the installed TensorRT wheel ("12", "13"), from its distribution name."""
    from importlib import metadata

    for major in sorted(CUDA_EXTRAS, reverse=True):
        for dist in (f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}"):
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            return major
    return None


def require_tensorrt(feature: str) -> None:
    """Import ``tensorrt`` or raise MissingDependencyError naming ``feature`` and how to install it."""
    try:
        importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but its CUDA libraries do not load
        raise MissingDependencyError(
            f"{feature} needs the Python module 'tensorrt', which failed to import ({exc}). "
            f"Install it with: {install_hint()} ({INDEX_NOTE})"
        ) from exc


def init_failure(call: str, exc: BaseException) -> str:
    """Why TensorRT could not create ``call`` (a nullptr from its factory): its log, and the likely cause."""
    messages = take_errors() + take_warnings()
    wheel = tensorrt_wheel_cuda()
    built = f"the CUDA {wheel} build of TensorRT {tensorrt_version()}" if wheel else f"TensorRT {tensorrt_version()}"
    torch_cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    return (
        f"TensorRT could not initialise: {call} failed ({exc}); TensorRT said: "
        + ("; ".join(messages) or "nothing")
        + f". Likely cause: the NVIDIA driver is too old for the CUDA version {built} was made for (nvidia-smi shows "
        f"the newest CUDA the driver supports), or the wheel is for another CUDA version than torch, which has "
        f"{torch_cuda}. Update the driver, or install the matching wheel: {install_hint()} (sdtrt doctor says which)"
    )


def create_builder(error: type[SdtrtError]) -> trt.Builder:
    """``trt.Builder`` with the shared logger; ``error`` naming the likely cause when TensorRT cannot initialise."""
    import tensorrt as trt

    take_warnings()  # only what this call logs belongs in its message
    try:
        return trt.Builder(logger())
    except TypeError as exc:  # "pybind11::init(): factory function returned nullptr"
        raise error(init_failure("trt.Builder(logger)", exc)) from exc


def create_runtime(error: type[SdtrtError]) -> trt.Runtime:
    """``trt.Runtime`` with the shared logger; ``error`` naming the likely cause when TensorRT cannot initialise."""
    import tensorrt as trt

    take_warnings()  # only what this call logs belongs in its message
    try:
        return trt.Runtime(logger())
    except TypeError as exc:
        raise error(init_failure("trt.Runtime(logger)", exc)) from exc


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


class MessageLog:
    """The first ``first`` and the last ``last`` messages since it was last taken, and how many fell between."""

    def __init__(self, first: int, last: int) -> None:
        self.first: list[str] = []
        self.last: collections.deque[str] = collections.deque(maxlen=last)
        self.limit = first
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.first) < self.limit:
            self.first.append(message)
            return
        if self.last.maxlen is not None and len(self.last) == self.last.maxlen:
            self.dropped += 1
        self.last.append(message)

    def take(self) -> list[str]:
        """Every message kept, in order (a marker where some were dropped); clears the log."""
        gap = [f"({self.dropped} more)"] if self.dropped else []
        taken = self.first + gap + list(self.last)
        self.first, self.dropped = [], 0
        self.last.clear()
        return taken


def logger() -> trt.ILogger:
    """The process's one TensorRT logger: forwards to ``logging`` and keeps errors and warnings for messages."""
    import tensorrt as trt

    for module, instance in _loggers:
        if module is trt:
            return instance  # type: ignore[no-any-return]

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors = MessageLog(FIRST_ERRORS, LAST_ERRORS)
            self.warnings = MessageLog(0, LAST_WARNINGS)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.add(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.add(msg)
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    instance = Logger()
    _loggers.append((trt, instance))
    return instance


def take_errors() -> list[str]:
    """The TensorRT errors logged since the last call (the first and the last ones, for messages); clears them."""
    errors: MessageLog | None = getattr(logger(), "errors", None)
    return errors.take() if errors is not None else []


def take_warnings() -> list[str]:
    """The latest TensorRT warnings since the last call (e.g. a CUDA initialisation failure); clears them."""
    warnings: MessageLog | None = getattr(logger(), "warnings", None)
    return warnings.take() if warnings is not None else []


def error_text() -> str:
    """The TensorRT errors logged since the last take, joined for a message (and cleared)."""
    return "; ".join(take_errors()) or "no message from TensorRT (run with -vv for its log)"


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


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` the current CUDA device for the block, only when it is not already (cheap per call)."""
    if device.type != "cuda" or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % ALIGNMENT == 0


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose address is a multiple of ``ALIGNMENT`` on any device.

    (torch's CUDA allocator aligns to 512 bytes already; its CPU allocator only to 64, which the test double sees.)
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def stream_handle(device: torch.device) -> int:
    """The raw handle of torch's current CUDA stream on ``device`` (0 off CUDA, which only the test double sees)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)
