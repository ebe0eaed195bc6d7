"""Strongly typed FP16: a half-precision copy of a module whose normalization layers compute in fp32.

TensorRT 11 takes each tensor's precision from the ONNX graph, so an FP16 engine needs an FP16 graph. sdtrt
exports the half-precision module itself (weights and activations fp16) after swapping every GroupNorm and
LayerNorm for a wrapper that casts its input and parameters to fp32, normalizes, and casts back: the statistics
(mean, variance over thousands of values) are where fp16 loses most. Attention upcasting follows the model's
own config (``upcast_attention`` in SD 2.x), and the timestep stays fp32 (its sinusoid needs it).

Measured on the tiny model (ONNX Runtime CPU vs the PyTorch fp32 module) this keeps the UNet's relative error
near 1e-3; converting the fp32 ONNX graph afterwards with onnxconverter-common produced graphs that ONNX
Runtime rejects (a fp16/fp32 type clash on the timestep path).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Fp32GroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False) if norm.affine else None
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False) if norm.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Fp32LayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        w, b = norm.weight, norm.bias
        self.weight = nn.Parameter(w.detach().float(), requires_grad=False) if w is not None else None
        self.bias = nn.Parameter(b.detach().float(), requires_grad=False) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _swap_norms(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, Fp32GroupNorm(child))
        elif isinstance(child, nn.LayerNorm):
            setattr(module, name, Fp32LayerNorm(child))
        else:
            _swap_norms(child)


def half_with_fp32_norms(module: nn.Module, inplace: bool = False) -> nn.Module:
    """A half-precision version of ``module``; a deep copy unless ``inplace`` (which saves its memory).

    Norm parameters are kept fp32 and cast again inside ``forward``, so converting twice is harmless.
    """
    result = module if inplace else copy.deepcopy(module)
    _swap_norms(result)
    result.half()
    for sub in result.modules():
        if isinstance(sub, Fp32GroupNorm | Fp32LayerNorm):
            sub.float()
    return result.eval().requires_grad_(False)
