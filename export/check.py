"""``sdtrt check``: run every exported component with ONNX Runtime and compare it with the PyTorch source."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.compare import errors
from sdtrt.runtime.deps import require
from sdtrt.runtime.manifest import Manifest, read_manifest
from sdtrt.runtime.models.bundle import ModelBundle
from sdtrt.runtime.models.controlnet import recorded_controlnet
from sdtrt.runtime.models.wrappers import wrap
from sdtrt.runtime.progress import Progress
from sdtrt.runtime.specs import CLIP_SKIP, ComponentSpec, ModelInfo, component_spec, is_controlnet, resolve_dim
from sdtrt.runtime.verify import verify_files

log = logging.getLogger(__name__)

# Relative L2 error allowed against the fp32 PyTorch module, by the artifact's precision.
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}
CHECK_PHASE = "comparing components with PyTorch"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


@dataclass(frozen=True)
class CheckRow:
    component: str
    precision: str
    shape: str
    output: str
    max_abs: float
    rel_l2: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel_l2) and self.rel_l2 <= self.tolerance


def check_sizes(manifest: Manifest) -> list[tuple[int, int, int]]:
    """(batch, height, width): the profile's smallest size at batch 1, and a non-square size at batch 2."""
    p, m = manifest.profile, manifest.model.size_multiple
    second = (min(p.min_height + m, p.max_height), min(p.min_width + 2 * m, p.max_width))
    return [(min(1, p.max_batch), p.min_height, p.min_width), (min(2, p.max_batch), *second)]


def make_inputs(
    spec: ComponentSpec, model: ModelInfo, batch: int, height: int, width: int, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded fp32/int inputs shaped like real ones (token ids with start/end, latents at their scale)."""
    s = model.vae_scale_factor
    dims = {
        "batch": batch,
        "text_batch": batch,
        "unet_batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // s,
        "latent_width": width // s,
        "text_length": 77,
    }
    g = torch.Generator().manual_seed(seed)
    feeds: dict[str, torch.Tensor] = {}
    for tensor in spec.inputs:
        shape = [resolve_dim(d, dims) for d in tensor.shape]
        if tensor.name == "input_ids":
            ids = torch.full(shape, 49407, dtype=torch.int32)
            for row in range(shape[0]):
                n = int(torch.randint(1, shape[1] - 1, (1,), generator=g))
                ids[row, 0] = 49406
                ids[row, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=g, dtype=torch.int32)
            feeds[tensor.name] = ids
        elif tensor.name == CLIP_SKIP:  # batch 1 checks the last layer, batch 2 the one before (if any)
            feeds[tensor.name] = torch.tensor([min(batch, model.text_layers)], dtype=torch.int32)
        elif tensor.name == "timestep":
            feeds[tensor.name] = torch.randint(0, 1000, shape, generator=g).float()
        elif tensor.name == "image":
            feeds[tensor.name] = torch.rand(shape, generator=g) * 2 - 1
        elif tensor.name == "controlnet_cond":  # a ControlNet hint: RGB in [0, 1]
            feeds[tensor.name] = torch.rand(shape, generator=g)
        elif tensor.name == "latent":
            feeds[tensor.name] = torch.randn(shape, generator=g) / model.scaling_factor
        elif tensor.name == "time_ids":  # SDXL: original size, crop top-left, target size
            feeds[tensor.name] = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).repeat(
                shape[0], 1
            )
        else:
            feeds[tensor.name] = torch.randn(shape, generator=g)
    return feeds


def check_artifacts(
    folder: str | Path, bundle: ModelBundle | None = None, seed: int = 0, progress: Progress | None = None
) -> list[CheckRow]:
    """Compare every component of the artifact in ``folder`` with its PyTorch module at two sizes.

    ``progress`` hears (``CHECK_PHASE``, done, total) as each component is compared.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    total = len(manifest.components)
    if progress:
        progress(CHECK_PHASE, 0, total)  # before loading the PyTorch source, which takes seconds too
    ort = require("onnxruntime", "sdtrt check", "ort")
    if bundle is None:
        from sdtrt.runtime.models.sources import reload_source

        bundle = reload_source(manifest.source)
    rows: list[CheckRow] = []
    for index, (name, entry) in enumerate(manifest.components.items()):
        spec = component_spec(manifest.model, name)
        tolerance = TOLERANCES.get(entry.precision, 1e-1)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(folder / entry.file), options, providers=["CPUExecutionProvider"])
        module = recorded_controlnet(entry.extra, name) if is_controlnet(name) else bundle.module(name)
        reference = wrap(name, module, manifest.model)
        for batch, height, width in check_sizes(manifest):
            feeds = make_inputs(spec, manifest.model, batch, height, width, seed)
            with torch.no_grad():
                ref = reference(*feeds.values())
            refs = ref if isinstance(ref, tuple) else (ref,)
            ort_feeds: dict[str, Any] = {
                t.name: feeds[t.name].numpy().astype(NUMPY_DTYPES[t.dtype]) for t in entry.inputs
            }
            outs = session.run([t.name for t in entry.outputs], ort_feeds)
            for tensor, out, r in zip(entry.outputs, outs, refs, strict=True):
                max_abs, rel = errors(out, r)
                rows.append(
                    CheckRow(name, entry.precision, f"{batch}@{width}x{height}", tensor.name, max_abs, rel, tolerance)
                )
        del session
        if progress:
            progress(CHECK_PHASE, index + 1, total)
    return rows


def format_table(rows: list[CheckRow]) -> str:
    header = (
        f"{'component':<13} {'precision':<9} {'batch x size':<13} {'output':<18} {'max abs':>10} "
        f"{'rel L2':>10} {'tol':>7}  result"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.component:<13} {r.precision:<9} {r.shape:<13} {r.output:<18} {r.max_abs:>10.3g} "
            f"{r.rel_l2:>10.3g} {r.tolerance:>7.0e}  {'pass' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)
