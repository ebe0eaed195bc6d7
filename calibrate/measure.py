"""Quality of a quantized UNet: per-step error against the float artifacts, and image PSNR from the same seed.

For each held-out prompt (none of them in the calibration set) the fp32 reference artifact runs a whole
trajectory while every UNet input is recorded. The quantized UNet (and the fp16 one, when given) then runs on
exactly those inputs, so each step's error is that of one UNet call, not an accumulation: relative L2 against
the fp32 output, and against the fp16 output when an fp16 reference is given. Then the quantized pipeline runs
the same prompt from the same seed and its image is compared with the fp16 image (or the fp32 one) as PSNR.

The quantized UNet runs as exact Q/DQ arithmetic (``sdtrt.calibrate.qdq``); ONNX Runtime's own fused CPU int8
kernels are measured beside it ("ORT kernels"). Speed is not measured here: TensorRT speed can only be measured
where TensorRT and an NVIDIA GPU exist (`sdtrt build`, then `sdtrt bench --backends tensorrt`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.compare import psnr, rel_l2
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.manifest import Manifest, read_manifest
from sdtrt.runtime.progress import Progress

from .qdq import CallRecorder, QdqEngine, torch_feeds
from .report import HELD_OUT_PROMPTS, QUANTIZED, ImageRow, QualityReport, ReportConfig, ScoreImages, StepRow

log = logging.getLogger(__name__)

REPORT_PHASE = "quality report prompts"
StepValues = tuple[float, float, float | None, float]  # (rel L2, rel L2 with ORT kernels, rel L2 vs fp16, timestep)


@dataclass
class _Measured:
    """What the runs over all prompts produced."""

    per_step: dict[int, list[StepValues]] = field(default_factory=dict)
    images: list[ImageRow] = field(default_factory=list)
    pixels: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # precision -> [1, 3, H, W] in [0, 1]


def quantized_component(manifest: Manifest) -> str | None:
    """The name of the first int8/fp8 component of ``manifest``, or None."""
    return next((name for name, e in manifest.components.items() if e.precision in QUANTIZED), None)


def default_reference(manifest: Manifest) -> Path | None:
    """The artifact the UNet was calibrated from, if it is still there unchanged."""
    source = manifest.components["unet"].extra.get("source", {})
    path = Path(source.get("artifact", "")) if source.get("artifact") else None
    if path is None or not (path / "manifest.json").is_file():
        return None
    try:
        unet = read_manifest(path).components.get("unet")
    except ArtifactError:
        return None
    return path if unet is not None and unet.sha256 == source.get("unet_sha256") else None


def _references(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    refs: dict[str, Path] = {}
    for p in paths:
        folder = Path(p)
        unet = read_manifest(folder).component("unet")
        if unet.precision not in ("fp32", "fp16"):
            raise ConfigError(f"reference {str(folder)!r} has a {unet.precision} UNet; give fp32 or fp16 artifacts")
        if unet.precision in refs:
            raise ConfigError(f"two {unet.precision} references given ({refs[unet.precision]}, {folder}); give one")
        refs[unet.precision] = folder
    if not refs:
        raise ConfigError("the quality report needs a reference: pass the fp32 (or fp16) artifact with --reference")
    return refs


def held_out_prompts(manifest: Manifest, count: int, candidates: Sequence[str] = HELD_OUT_PROMPTS) -> list[str]:
    """The first ``count`` distinct ``candidates`` that were not used for calibration.

    A prompt given twice is measured once: a repeated row would only weigh that prompt double.
    """
    used = set(manifest.components["unet"].extra.get("calibration", {}).get("prompts", []))
    free = [p for p in dict.fromkeys(candidates) if p not in used]
    if count > len(free):
        raise ConfigError(
            f"at most {len(free)} distinct held-out prompts are available, asked for {count}; ask for {len(free)} "
            "or fewer"
        )
    return free[:count]


def _size(manifest: Manifest, config: ReportConfig) -> tuple[int, int]:
    if config.height is not None and config.width is not None:
        return config.height, config.width
    size = manifest.components["unet"].extra.get("calibration", {}).get("size", "")
    if isinstance(size, str) and "x" in size:
        width, height = (int(v) for v in size.split("x"))
        return height, width
    return manifest.profile.min_height, manifest.profile.min_width


def _quantized_unet(root: Path, manifest: Manifest) -> str:
    entry = manifest.component("unet")
    if entry.precision not in QUANTIZED:
        raise ConfigError(
            f"the UNet of {str(root)!r} is {entry.precision}, not int8/fp8: the quality report is for quantized "
            "artifacts (make one with `sdtrt calibrate`)"
        )
    return entry.precision


def _calibrated_from(manifest: Manifest) -> Path:
    found = default_reference(manifest)
    if found is None:
        raise ConfigError(
            "the artifact this UNet was calibrated from is gone or changed; pass the fp32 artifact with --reference DIR"
        )
    return found


def quality_report(
    folder: str | os.PathLike[str],
    references: Sequence[str | os.PathLike[str]] = (),
    config: ReportConfig | None = None,
    progress: Progress | None = None,
) -> QualityReport:
    """Measure the quantized UNet of ``folder`` against the fp32 (and fp16) ``references`` on held-out prompts.

    Without ``references`` the artifact the UNet was calibrated from is used, if it is still there unchanged.
    ``progress`` hears ("quality report prompts", done, total) from 0 (opening the pipelines) to the last prompt.
    """
    config = config or ReportConfig()
    root = Path(folder)
    manifest = read_manifest(root)
    precision = _quantized_unet(root, manifest)
    refs = _references(references or [_calibrated_from(manifest)])
    prompts = held_out_prompts(manifest, config.prompts, config.held_out)
    height, width = _size(manifest, config)
    run = {
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "height": height,
        "width": width,
        "scheduler": config.scheduler,
    }
    primary = "fp32" if "fp32" in refs else "fp16"
    measured = _run_prompts(root, manifest, refs, primary, prompts, config.seed, run, progress)
    dtype = manifest.components["unet"].extra.get("quantization", {}).get("unquantized_dtype", "unknown")
    return QualityReport(
        artifact=str(root),
        precision=precision,
        unquantized_dtype=dtype,
        reference=primary,
        references={k: str(v) for k, v in refs.items()},
        size=f"{width}x{height}",
        steps=[_step_row(i, values) for i, values in sorted(measured.per_step.items())],
        images=measured.images,
        max_rel_l2=config.max_rel_l2,
        min_psnr_db=config.min_psnr_db,
        notes=[
            f"layers left unquantized compute in {dtype}",
            f"UNet errors are per call on the {primary} trajectory's inputs; prompts are held out from calibration",
            "errors are of the exact Q/DQ arithmetic (what TensorRT computes); 'ORT kernels' is ONNX Runtime's "
            "own fused CPU int8 path",
            "speed is not measured here: TensorRT speed can only be measured where TensorRT and an NVIDIA GPU "
            "exist (sdtrt build, then sdtrt bench --backends tensorrt)",
        ],
        accuracy=_accuracy(config.score, measured.pixels, prompts) if config.score else {},
        max_accuracy_drop=config.max_accuracy_drop,
    )


def _run_prompts(
    root: Path,
    manifest: Manifest,
    refs: dict[str, Path],
    primary: str,
    prompts: list[str],
    seed: int,
    run: dict[str, Any],
    progress: Progress | None,
) -> _Measured:
    """Open the quantized and reference pipelines and measure every prompt (prompt ``k`` from ``seed + k``)."""
    from sdtrt.runtime.pipeline import Pipeline

    precision = manifest.component("unet").precision
    measured = _Measured()
    pipes: dict[str, Pipeline] = {}
    if progress:
        progress(REPORT_PHASE, 0, len(prompts))
    qdq = QdqEngine(root, manifest)
    try:
        for key, path in {"quant": root, **refs}.items():
            pipes[key] = Pipeline.from_artifacts(path, backend="onnxruntime", device="cpu", cuda_graph=False)
        kernels = pipes["quant"].engines["unet"]
        pipes["quant"].wrap_engine("unet", lambda _: qdq)
        recorder = pipes[primary].wrap_engine("unet", CallRecorder)
        for k, prompt in enumerate(prompts):
            row, made = _measure(pipes, primary, qdq, kernels, recorder, prompt, seed + k, run, measured.per_step)
            measured.images.append(row)
            for key, value in made.items():
                measured.pixels.setdefault(precision if key == "quant" else key, []).append(value)
            if progress:
                progress(REPORT_PHASE, k + 1, len(prompts))
        kernels.close()
    finally:
        for pipe in pipes.values():
            pipe.close()
        qdq.close()
    return measured


def _accuracy(
    score: ScoreImages, pixels: dict[str, list[torch.Tensor]], prompts: list[str]
) -> dict[str, dict[str, float]]:
    """Each precision's accuracy as ``score`` reads it from the images."""

    def to_uint8(unit: torch.Tensor) -> np.ndarray:
        return (unit[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)

    return {key: score([to_uint8(p) for p in values], prompts) for key, values in pixels.items()}


def _measure(
    pipes: dict[str, Any],
    primary: str,
    qdq: QdqEngine,
    kernels: Engine,
    recorder: CallRecorder,
    prompt: str,
    seed: int,
    run: dict[str, Any],
    per_step: dict[int, list[StepValues]],
) -> tuple[ImageRow, dict[str, torch.Tensor]]:
    """One held-out prompt: per-step UNet errors on the reference trajectory, then the images from ``seed``.

    Returns the row and the images ([1, 3, H, W] in [0, 1]) by pipeline: "quant", the primary reference, "fp16".
    """
    recorder.calls.clear()
    reference = pipes[primary](prompt, seed=seed, **run).pixels
    second = pipes.get("fp16") if primary == "fp32" else None
    for i, (feeds, ref) in enumerate(recorder.calls):
        quant = qdq.run(feeds)
        ort_out = kernels.infer(torch_feeds(kernels, feeds))["noise_pred"].float().numpy()
        half = None
        if second is not None:
            unet16 = second.engines["unet"]
            half = rel_l2(quant, unet16.infer(torch_feeds(unet16, feeds))["noise_pred"].float().numpy())
        timestep = float(feeds["timestep"].ravel()[0])
        per_step.setdefault(i, []).append((rel_l2(quant, ref), rel_l2(ort_out, ref), half, timestep))
    image = pipes["quant"](prompt, seed=seed, **run).pixels
    image16 = second(prompt, seed=seed, **run).pixels if second is not None else None
    row = ImageRow(prompt, seed, psnr(image, reference), psnr(image, image16) if image16 is not None else None)
    made = {"quant": image, primary: reference} | ({"fp16": image16} if image16 is not None else {})
    return row, made


def _step_row(step: int, values: list[StepValues]) -> StepRow:
    halves = [v[2] for v in values if v[2] is not None]
    return StepRow(
        step=step,
        timestep=values[0][3],
        rel_l2=float(np.mean([v[0] for v in values])),
        rel_l2_ort_kernels=float(np.mean([v[1] for v in values])),
        rel_l2_fp16=float(np.mean(halves)) if halves else None,
    )
