"""What the backends share: dtype names, feed checks, output shapes from symbolic shapes, engine bookkeeping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import torch

from sdtrt.runtime.engine import WeightUpdate
from sdtrt.runtime.errors import ArtifactError, BackendError, ShapeError
from sdtrt.runtime.manifest import TensorEntry

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

# Symbolic dimensions that outputs have but inputs may not: (the dimension they follow, scaled up or down).
DERIVED_DIMS: dict[str, tuple[str, bool]] = {
    "height": ("latent_height", True),
    "width": ("latent_width", True),
    "latent_height": ("height", False),
    "latent_width": ("width", False),
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name."""
    if name not in TORCH_DTYPES:
        raise ArtifactError(f"unsupported tensor dtype {name!r} in the manifest (expected one of {list(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def engine_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for CUDA, so it compares equal to the device of tensors on it."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {str(device)!r} was asked for but torch sees no CUDA GPU; use device 'cpu'")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    return device


def _shape_text(shape: Sequence[str | int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def bind_dims(
    component: str, inputs: Sequence[TensorEntry], feeds: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, int]:
    """Check ``feeds`` against the declared ``inputs`` and return the value of every symbolic dimension.

    Raises ShapeError for a missing or unknown name, a wrong dtype or rank, a fixed dimension that differs, or a
    symbolic dimension with two values; BackendError for a feed on another device.
    """
    expected = [entry.name for entry in inputs]
    missing = [name for name in expected if name not in feeds]
    unknown = [name for name in feeds if name not in expected]
    if missing or unknown:
        raise ShapeError(
            f"{component} expects inputs {expected}, found {list(feeds)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    dims: dict[str, int] = {}
    origin: dict[str, str] = {}
    for entry in inputs:
        tensor = feeds[entry.name]
        where = f"{component} input {entry.name!r}"
        if not isinstance(tensor, torch.Tensor):
            raise ShapeError(f"{where}: expected a torch.Tensor, found {type(tensor).__name__}")
        if tensor.dtype != torch_dtype(entry.dtype):
            raise ShapeError(f"{where}: expected dtype {entry.dtype}, found {dtype_name(tensor.dtype)}")
        found = tuple(tensor.shape)
        if len(found) != len(entry.shape):
            raise ShapeError(
                f"{where}: expected rank {len(entry.shape)} {_shape_text(entry.shape)}, "
                f"found rank {len(found)} {_shape_text(found)}"
            )
        for want, got in zip(entry.shape, found, strict=True):
            if isinstance(want, int):
                if want != got:
                    raise ShapeError(f"{where}: expected shape {_shape_text(entry.shape)}, found {_shape_text(found)}")
            elif got < 1:
                raise ShapeError(f"{where}: dimension {want!r} must be >= 1, found {_shape_text(found)}")
            elif want not in dims:
                dims[want], origin[want] = got, entry.name
            elif dims[want] != got:
                raise ShapeError(
                    f"{where}: dimension {want!r} is {got} (shape {_shape_text(found)}), but "
                    f"{dims[want]} in input {origin[want]!r}; they must agree"
                )
        if tensor.device != device:
            raise BackendError(f"{where} is on {tensor.device}, but the engine runs on {device}; move it there first")
    return dims


def resolve_shape(shape: Sequence[str | int], dims: Mapping[str, int], scale_factor: int) -> tuple[int, ...]:
    """Concrete shape of a declared (symbolic) shape, given the dimensions bound from the feeds.

    Image and latent sides follow each other through the VAE ``scale_factor`` (image = latent * factor).
    """
    result = []
    for dim in shape:
        if isinstance(dim, int):
            result.append(dim)
        elif dim in dims:
            result.append(dims[dim])
        elif "/" in dim and dim.partition("/")[0] in dims:  # a ControlNet residual: latent side / downscale
            base, _, factor = dim.partition("/")
            result.append(dims[base] // int(factor))
        elif dim in DERIVED_DIMS and DERIVED_DIMS[dim][0] in dims:
            base, upscale = DERIVED_DIMS[dim]
            value = dims[base]
            if not upscale and value % scale_factor:
                raise ShapeError(f"{base} must be a multiple of the VAE scale factor {scale_factor}, found {value}")
            result.append(value * scale_factor if upscale else value // scale_factor)
        else:
            raise ArtifactError(
                f"output dimension {dim!r} of shape {_shape_text(shape)} cannot be derived from the inputs; "
                "the manifest is inconsistent, re-export the artifact"
            )
    return tuple(result)


class EngineBase:
    """Lifecycle every engine shares: ``close`` (idempotent), context manager, refusal to run once closed."""

    graph_capturable: bool = False

    def __init__(
        self, name: str, inputs: Sequence[TensorEntry], outputs: Sequence[TensorEntry], device: torch.device
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.device = device
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free what the engine holds; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Free backend resources (called once, by ``close``)."""

    def update_weights(self, update: WeightUpdate) -> None:
        """Backends that can change an engine's weights override this."""
        raise BackendError(f"the {self.name} engine cannot change its weights")

    def check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the {self.name} engine is closed; open the engines again to run it")

    def __enter__(self) -> EngineBase:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name} on {self.device} ({state})>"


def close_all(engines: Mapping[str, EngineBase]) -> None:
    """Close every engine (used when opening a set of engines fails halfway)."""
    for engine in engines.values():
        engine.close()
