"""How far one output is from another: PSNR of images, relative L2 and max abs error of tensors.

Every check that compares outputs (export against PyTorch, engines against ONNX Runtime, a quantized UNet against
its float reference, a pipeline against diffusers) measures with these, so one number means the same everywhere.
They take torch tensors or numpy arrays alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _float32(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu()
    return torch.from_numpy(np.array(value, dtype=np.float32))  # a copy: the input may be read-only


def psnr(image: Any, reference: Any, peak: float = 1.0) -> float:
    """PSNR in dB of ``image`` against ``reference`` (pixel values up to ``peak``); inf when identical.

    Torch tensors are compared in float32, numpy arrays in float64: the precision each caller's values carry.
    """
    if isinstance(image, torch.Tensor) or isinstance(reference, torch.Tensor):
        diff = torch.as_tensor(image).float() - torch.as_tensor(reference).float()
        mse = float((diff**2).mean())
    else:
        mse = float(np.mean((np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def rel_l2(out: Any, ref: Any) -> float:
    """``|out - ref| / |ref|`` over all elements, in float32 (a zero reference counts as norm 1e-12)."""
    o, r = _float32(out), _float32(ref)
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-12))


def max_abs(out: Any, ref: Any) -> float:
    """The largest absolute elementwise difference, in float32."""
    return float((_float32(out) - _float32(ref)).abs().max())


def errors(out: Any, ref: Any) -> tuple[float, float]:
    """(max abs, relative L2) of ``out`` against ``ref``; the relative error is nan when ``out`` is not finite,
    so that no tolerance can pass it."""
    worst = max_abs(out, ref)
    return worst, rel_l2(out, ref) if math.isfinite(worst) else float("nan")
