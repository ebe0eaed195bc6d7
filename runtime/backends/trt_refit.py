"""Refit: replace the weights of a refittable TensorRT engine in place, without a rebuild (e.g. to apply a LoRA).

Weights are named after the ONNX initializers they came from (TensorRT's ONNX parser names every refittable weight
after its initializer) and given in the initializer's layout and dtype, as numpy arrays or torch tensors. A torch
tensor on the engine's GPU is handed to TensorRT where it is; anything else is read from host memory.

Everything that can be checked is checked before TensorRT holds a single new weight, on a refitter made for this
call: the engine was built refittable, every name is one of its refittable weights (all unknown names are reported),
every dtype and element count matches TensorRT's prototype of that weight, and no weight that TensorRT refits
together with a given one is missing. Only then does the refit run, enqueued on torch's current stream. If that
last call fails, TensorRT may have applied part of the weights (its documentation says so), and the error says so.

``tensorrt`` is imported inside the function, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdtrt.runtime.backends import trt_compat
from sdtrt.runtime.backends.common import dtype_name
from sdtrt.runtime.errors import BackendError

if TYPE_CHECKING:
    import tensorrt as trt

SHOWN = 5  # names listed in a message; the rest are counted
# TensorRT DataType member names -> torch dtypes (bfloat16 weights can come only as torch tensors)
TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}
Staged = tuple[str, torch.Tensor, Any, Any]  # (name, tensor kept alive, trt.Weights, trt.TensorLocation)


def listed(names: Iterable[str]) -> str:
    """Up to ``SHOWN`` names, then how many more."""
    names = list(names)
    text = ", ".join(repr(n) for n in names[:SHOWN])
    return text + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def refit_engine(
    component: str,
    engine: trt.ICudaEngine,
    weights: Mapping[str, np.ndarray | torch.Tensor],
    device: torch.device,
) -> None:
    """Replace the weights ``weights`` (ONNX initializer name -> new value) of ``engine``; BackendError otherwise."""
    import tensorrt as trt

    if not getattr(engine, "refittable", False):
        raise BackendError(
            f"the {component} engine was built without refitting enabled, so its weights cannot be replaced; "
            "rebuild the engines with `sdtrt build ARTIFACTS --out ENGINES --refittable`"
        )
    trt_compat.take_errors()
    try:
        refitter = trt.Refitter(engine, trt_compat.logger())
    except TypeError as exc:  # nullptr from createInferRefitter
        raise BackendError(
            f"TensorRT could not create a refitter for {component} (trt.Refitter: {exc}): {trt_compat.error_text()}"
        ) from exc
    check_names(component, refitter, weights)
    staged = stage(component, refitter, weights, device)
    for name, _, new, location in staged:
        if not refitter.set_named_weights(name, new, location):
            raise BackendError(
                f"TensorRT rejected the new weights {name!r} of {component} (set_named_weights): "
                f"{trt_compat.error_text()}; the engine is unchanged"
            )
    missing = list(refitter.get_missing_weights())
    if missing:
        named = [m for m in missing if m]
        raise BackendError(
            f"{component}: TensorRT refits some weights together, and {len(missing)} that go with the ones given are "
            f"missing: {listed(named) or 'unnamed weights'}{' and unnamed ones' if len(named) < len(missing) else ''}"
            ". Give those too (from the same ONNX initializers); the engine is unchanged"
        )
    if not run_refit(refitter, device):
        raise BackendError(
            f"TensorRT failed to refit {component} (refit_cuda_engine): {trt_compat.error_text()}. TensorRT may have "
            "applied part of the new weights: refit again with a complete set, or open the engines again"
        )
    keep_until_refitted(staged, device)


def check_names(component: str, refitter: trt.Refitter, weights: Mapping[str, Any]) -> None:
    """BackendError listing every name that is not a refittable weight of the engine (before anything is set)."""
    known = set(refitter.get_all_weights())
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise BackendError(
            f"{component}: {len(unknown)} of the {len(weights)} weights given are not refittable weights of this "
            f"engine: {listed(unknown)}. Names are the ONNX initializer names of {component}.onnx (this engine has "
            f"{len(known)}, e.g. {listed(sorted(known)[:3])}); the engine is unchanged"
        )


def stage(component: str, refitter: trt.Refitter, weights: Mapping[str, Any], device: torch.device) -> list[Staged]:
    """Each value as a contiguous tensor with its ``trt.Weights``; BackendError listing every dtype or size mismatch."""
    import tensorrt as trt

    staged: list[Staged] = []
    wrong: list[str] = []
    for name, value in weights.items():
        tensor = as_tensor(component, name, value, device)
        prototype = refitter.get_weights_prototype(name) if hasattr(refitter, "get_weights_prototype") else None
        if prototype is not None:
            expected = TORCH_DTYPES.get(prototype.dtype.name)
            if expected != tensor.dtype or int(prototype.size) != tensor.numel():
                wrong.append(
                    f"{name!r} is {dtype_name(tensor.dtype)} x {tensor.numel()}, the engine's is "
                    f"{trt_compat.dtype_name(prototype.dtype)} x {int(prototype.size)}"
                )
                continue
        kind = trt_dtype(tensor.dtype)
        location = trt.TensorLocation.DEVICE if tensor.is_cuda else trt.TensorLocation.HOST
        staged.append((name, tensor, trt.Weights(kind, tensor.data_ptr(), tensor.numel()), location))
    if wrong:
        raise BackendError(
            f"{component}: {len(wrong)} weights do not match the engine's: {'; '.join(wrong[:SHOWN])}"
            + (f"; and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else "")
            + ". Give each in the dtype and layout of its ONNX initializer; the engine is unchanged"
        )
    return staged


def as_tensor(component: str, name: str, value: Any, device: torch.device) -> torch.Tensor:
    """``value`` as a contiguous tensor: on the engine's GPU if it is on a GPU, else in host memory."""
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_cuda and tensor.device != device:
            tensor = tensor.to(device)
    else:
        raise BackendError(
            f"{component}: weights {name!r} must be a numpy array or a torch tensor, found {type(value).__name__}"
        )
    return tensor.contiguous()


def trt_dtype(dtype: torch.dtype) -> trt.DataType:
    import tensorrt as trt

    for name, candidate in TORCH_DTYPES.items():
        if candidate == dtype:
            return getattr(trt.DataType, name)  # type: ignore[no-any-return]
    raise BackendError(f"TensorRT has no weights of dtype {dtype_name(dtype)}")


def run_refit(refitter: trt.Refitter, device: torch.device) -> bool:
    """Refit on torch's current stream (after the engine's queued work), or synchronously where there is no async."""
    refit_async = getattr(refitter, "refit_cuda_engine_async", None)
    if refit_async is None:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the engine must have no pending work
        return bool(refitter.refit_cuda_engine())
    return bool(refit_async(trt_compat.stream_handle(device)))


def keep_until_refitted(staged: list[Staged], device: torch.device) -> None:
    """Host weights may go once the refit call returns; device ones only after the stream has run the refit."""
    if device.type != "cuda":
        return
    stream = torch.cuda.current_stream(device)
    for _, tensor, _, _ in staged:
        if tensor.is_cuda:
            tensor.record_stream(stream)
