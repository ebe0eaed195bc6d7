"""The engines the quality report measures with: the quantized UNet as exact Q/DQ arithmetic, and a recorder of
the reference UNet's calls.

Numbers are of the Q/DQ arithmetic itself (quantize, dequantize, compute in float), which is what TensorRT
implements: the quantized graph runs in ONNX Runtime with its graph fusions off. With the fusions on, ONNX
Runtime's CPU int8 kernels can saturate on processors without VNNI instructions and add error of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.engine import Engine, WeightUpdate
from sdtrt.runtime.errors import BackendError
from sdtrt.runtime.manifest import Manifest
from sdtrt.runtime.verify import verified_model_file


class CallRecorder:
    """Wraps the reference UNet: keeps a float32 CPU copy of every call's feeds and output."""

    graph_capturable = False

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name, self.inputs, self.outputs, self.device = inner.name, inner.inputs, inner.outputs, inner.device
        self.calls: list[tuple[dict[str, np.ndarray], np.ndarray]] = []

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.inner.infer(feeds)
        kept = {n: feeds[n].detach().float().cpu().numpy().copy() for n in feeds}
        self.calls.append((kept, out["noise_pred"].detach().float().cpu().numpy().copy()))
        return out

    def update_weights(self, update: WeightUpdate) -> None:
        """Weight updates reach the wrapped engine."""
        self.inner.update_weights(update)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> CallRecorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class QdqEngine:
    """The quantized UNet in ONNX Runtime with graph fusions off: exact Q/DQ arithmetic, on the CPU."""

    graph_capturable = False

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        ort = require("onnxruntime", "the quantization report", "ort")
        entry = manifest.component("unet")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        path = verified_model_file(folder, entry)  # sha256 and external-data locations checked
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name, self.inputs, self.outputs = "unet", entry.inputs, entry.outputs
        self.device = torch.device("cpu")
        self.dtypes = {t.name: np.float16 if t.dtype == "float16" else np.float32 for t in entry.inputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        cast = {n: np.asarray(v, dtype=self.dtypes[n]) for n, v in feeds.items()}
        return np.asarray(self.session.run(["noise_pred"], cast)[0], dtype=np.float32)

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.run({n: feeds[n].detach().cpu().float().numpy() for n in feeds})
        dtype = torch.float16 if self.dtypes["sample"] == np.float16 else torch.float32
        return {"noise_pred": torch.from_numpy(out).to(dtype)}

    def update_weights(self, update: WeightUpdate) -> None:
        """The quantized graph is measured as calibrated: LoRAs are applied before calibration, not here."""
        raise BackendError("the Q/DQ reference engine of the quality report cannot change its weights")

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> QdqEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def torch_feeds(engine: Engine, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Recorded float32 feeds as tensors of the dtypes ``engine`` declares."""
    dtypes = {t.name: torch.float16 if t.dtype == "float16" else torch.float32 for t in engine.inputs}
    return {n: torch.from_numpy(feeds[n]).to(dtypes[n]) for n in feeds}
