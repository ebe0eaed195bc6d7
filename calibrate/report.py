"""Quality of a quantized UNet: per-step error against the float artifacts, and image PSNR from the same seed.

For each held-out prompt (none of them in the calibration set) the fp32 reference artifact runs a whole
trajectory while every UNet input is recorded. The quantized UNet (and the fp16 one, when given) then runs on
exactly those inputs, so each step's error is that of one UNet call, not an accumulation: relative L2 against
the fp32 output, and against the fp16 output when an fp16 reference is given. Then the quantized pipeline runs
the same prompt from the same seed and its image is compared with the fp16 image (or the fp32 one) as PSNR.

Numbers are of the Q/DQ arithmetic itself (quantize, dequantize, compute in float), which is what TensorRT
implements: the quantized graph runs in ONNX Runtime with its graph fusions off. With the fusions on, ONNX
Runtime's CPU int8 kernels can saturate on processors without VNNI instructions and add error of their own; that
error is shown separately ("ORT kernels"). Speed is not measured here: TensorRT speed can only be measured where
TensorRT and an NVIDIA GPU exist (`sdtrt build`, then `sdtrt bench --backends tensorrt`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.deps import require
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.files import write_text_atomic
from sdtrt.runtime.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "fp8")
# Written for the report and kept apart from calibrate/data/prompts.txt (different subjects and wording).
HELD_OUT_PROMPTS = (
    "a brass diving helmet resting on a wooden pier, gouache painting",
    "two barn owls on a fence post in winter, linocut print",
    "a farmers market stall piled with pumpkins, documentary photograph",
    "an origami crane on a windowsill, soft morning light, photograph",
    "a mountain cabin with smoke from the chimney, matte painting",
    "a plate of sushi on a slate board, food photography",
    "a knight in rusty armor resting under a tree, fantasy illustration",
    "a neon-lit arcade at night, synthwave poster",
)
Progress = Callable[[str, int, int], None]
StepValues = tuple[float, float, float | None, float]  # (rel L2, rel L2 with ORT kernels, rel L2 vs fp16, timestep)


@dataclass(frozen=True)
class ReportConfig:
    """prompts: how many held-out prompts; steps: denoising steps per trajectory; size in pixels (None: the
    calibration size, else the profile's smallest). Bounds: the report passes when the mean UNet error against
    fp32 is at most ``max_rel_l2`` and every image's PSNR is at least ``min_psnr_db``."""

    prompts: int = 2
    steps: int = 10
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str = "euler_a"
    seed: int = 1000
    max_rel_l2: float = 0.15
    min_psnr_db: float = 15.0
    shapes: bool = False  # held-out shapes captions, and prompt accuracy read from the images

    @classmethod
    def for_shapes(cls, prompts: int = 20) -> ReportConfig:
        """The report for the trained ``shapes`` model: its own held-out captions, size, sampler and CFG."""
        from sdtrt.shapes.data import IMAGE_SIZE
        from sdtrt.shapes.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SEED

        return cls(
            prompts=prompts,
            steps=DEFAULT_STEPS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            guidance_scale=DEFAULT_GUIDANCE,
            scheduler="euler",
            seed=IMAGE_SEED,
            shapes=True,
        )

    def __post_init__(self) -> None:
        for name in ("prompts", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"report {name} must be an integer >= 1, got {value!r}")
        if (self.height is None) != (self.width is None):
            raise ConfigError("give both height and width, or neither")


@dataclass
class StepRow:
    step: int
    timestep: float
    rel_l2: float  # against the primary reference (fp32, else fp16), mean over prompts
    rel_l2_ort_kernels: float
    rel_l2_fp16: float | None  # against the fp16 reference when the primary one is fp32


@dataclass
class ImageRow:
    prompt: str
    seed: int
    psnr_db: float  # against the primary reference
    psnr_fp16_db: float | None


@dataclass
class QualityReport:
    artifact: str
    precision: str
    unquantized_dtype: str
    reference: str  # precision of the primary reference: fp32, or fp16 when no fp32 artifact was given
    references: dict[str, str]  # "fp32"/"fp16" -> folder
    size: str
    steps: list[StepRow]
    images: list[ImageRow]
    max_rel_l2: float
    min_psnr_db: float
    notes: list[str] = field(default_factory=list)
    # shapes only: precision ("int8", "fp32", "fp16") -> accuracy per aspect on the held-out prompts
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def accuracy_ok(self) -> bool:
        """The quantized images' 'all three right' is at most MAX_ACCURACY_DROP behind the image reference's."""
        if not self.accuracy:
            return True
        from sdtrt.shapes.report import MAX_ACCURACY_DROP

        ref = self.accuracy.get("fp16") or self.accuracy[self.reference]
        return self.accuracy[self.precision]["all"] >= ref["all"] - MAX_ACCURACY_DROP

    @property
    def mean_rel_l2(self) -> float:
        return float(np.mean([r.rel_l2 for r in self.steps]))

    @property
    def image_psnr(self) -> float:
        """Worst image PSNR against the image reference (fp16 when given, else fp32)."""
        values = [r.psnr_fp16_db if r.psnr_fp16_db is not None else r.psnr_db for r in self.images]
        return float(min(values))

    @property
    def passed(self) -> bool:
        return (
            math.isfinite(self.mean_rel_l2)
            and self.mean_rel_l2 <= self.max_rel_l2
            and self.image_psnr >= self.min_psnr_db
            and self.accuracy_ok
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(mean_rel_l2=self.mean_rel_l2, image_psnr_db=self.image_psnr, passed=self.passed)
        return data

    def save(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(self.to_dict(), indent=2) + "\n")


class _Recorder:
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

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _Recorder:
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
        from sdtrt.runtime.backends.onnxruntime import verified_model_file

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

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> QdqEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    diff = np.linalg.norm((out - ref).ravel())
    return float(diff / max(float(np.linalg.norm(ref.ravel())), 1e-12))


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]; inf when identical."""
    mse = float(torch.mean((image.float() - reference.float()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


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


def held_out_prompts(manifest: Manifest, count: int, shapes: bool = False) -> list[str]:
    """``count`` built-in held-out prompts, skipping any that were used for calibration.

    With ``shapes``, captions of the shapes model's held-out combinations (never in training or calibration).
    """
    if shapes:
        from sdtrt.shapes.evaluate import prompts as shapes_prompts

        return shapes_prompts(count)
    used = set(manifest.components["unet"].extra.get("calibration", {}).get("prompts", []))
    free = [p for p in HELD_OUT_PROMPTS if p not in used]
    if count > len(free):
        raise ConfigError(f"at most {len(free)} held-out prompts are available, asked for {count}")
    return free[:count]


def _size(manifest: Manifest, config: ReportConfig) -> tuple[int, int]:
    if config.height is not None and config.width is not None:
        return config.height, config.width
    size = manifest.components["unet"].extra.get("calibration", {}).get("size", "")
    if isinstance(size, str) and "x" in size:
        width, height = (int(v) for v in size.split("x"))
        return height, width
    return manifest.profile.min_height, manifest.profile.min_width


def _torch_feeds(engine: Engine, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    dtypes = {t.name: torch.float16 if t.dtype == "float16" else torch.float32 for t in engine.inputs}
    return {n: torch.from_numpy(feeds[n]).to(dtypes[n]) for n in feeds}


def quality_report(
    folder: str | os.PathLike[str],
    references: Sequence[str | os.PathLike[str]] = (),
    config: ReportConfig | None = None,
    progress: Progress | None = None,
) -> QualityReport:
    """Measure the quantized UNet of ``folder`` against the fp32 (and fp16) ``references`` on held-out prompts.

    Without ``references`` the artifact the UNet was calibrated from is used, if it is still there unchanged.
    """
    from sdtrt.runtime.pipeline import Pipeline

    config = config or ReportConfig()
    root = Path(folder)
    manifest = read_manifest(root)
    entry = manifest.component("unet")
    if entry.precision not in QUANTIZED:
        raise ConfigError(
            f"the UNet of {str(root)!r} is {entry.precision}, not int8/fp8: the quality report is for quantized "
            "artifacts (make one with `sdtrt calibrate`)"
        )
    if not references:
        found = default_reference(manifest)
        if found is None:
            raise ConfigError(
                "the artifact this UNet was calibrated from is gone or changed; pass the fp32 artifact with "
                "--reference DIR"
            )
        references = [found]
    refs = _references(references)
    prompts = held_out_prompts(manifest, config.prompts, config.shapes)
    height, width = _size(manifest, config)
    run = {
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "height": height,
        "width": width,
        "scheduler": config.scheduler,
    }
    primary = "fp32" if "fp32" in refs else "fp16"
    per_step: dict[int, list[StepValues]] = {}
    images: list[ImageRow] = []
    pixels: dict[str, list[torch.Tensor]] = {}
    pipes: dict[str, Pipeline] = {}
    qdq = QdqEngine(root, manifest)
    try:
        for key, path in {"quant": root, **refs}.items():
            pipes[key] = Pipeline.from_artifacts(path, backend="onnxruntime", device="cpu", cuda_graph=False)
        kernels = pipes["quant"].engines["unet"]
        pipes["quant"].wrap_engine("unet", lambda _: qdq)
        recorder = pipes[primary].wrap_engine("unet", _Recorder)
        for k, prompt in enumerate(prompts):
            row, made = _measure(pipes, primary, qdq, kernels, recorder, prompt, config.seed + k, run, per_step)
            images.append(row)
            for key, value in made.items():
                pixels.setdefault(entry.precision if key == "quant" else key, []).append(value)
            if progress:
                progress("report", k + 1, len(prompts))
        kernels.close()
    finally:
        for pipe in pipes.values():
            pipe.close()
        qdq.close()
    rows = [_step_row(i, values) for i, values in sorted(per_step.items())]
    dtype = entry.extra.get("quantization", {}).get("unquantized_dtype", "unknown")
    accuracy = _accuracy(pixels, prompts) if config.shapes else {}
    return QualityReport(
        artifact=str(root),
        precision=entry.precision,
        unquantized_dtype=dtype,
        reference=primary,
        references={k: str(v) for k, v in refs.items()},
        size=f"{width}x{height}",
        steps=rows,
        images=images,
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
        accuracy=accuracy,
    )


def _accuracy(pixels: dict[str, list[torch.Tensor]], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Prompt accuracy of each precision's images (shapes model), read back from the pixels."""
    from sdtrt.shapes.score import accuracy

    def to_uint8(unit: torch.Tensor) -> np.ndarray:
        return (unit[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)

    return {key: accuracy([to_uint8(p) for p in values], prompts) for key, values in pixels.items()}


def _measure(
    pipes: dict[str, Any],
    primary: str,
    qdq: QdqEngine,
    kernels: Engine,
    recorder: _Recorder,
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
        ort_out = kernels.infer(_torch_feeds(kernels, feeds))["noise_pred"].float().numpy()
        half = None
        if second is not None:
            unet16 = second.engines["unet"]
            half = rel_l2(quant, unet16.infer(_torch_feeds(unet16, feeds))["noise_pred"].float().numpy())
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


def format_report(report: QualityReport) -> str:
    """The report as a table for a terminal."""
    lines = [
        f"{report.precision} UNet of {report.artifact} (unquantized layers: {report.unquantized_dtype}), "
        f"{report.size}, {len(report.steps)} steps, {len(report.images)} held-out prompts",
        f"{'step':>4} {'timestep':>9} {'rel L2 vs ' + report.reference:>15} {'(ORT kernels)':>14} "
        f"{'rel L2 vs fp16' if report.reference == 'fp32' else '':>15}",
    ]
    for r in report.steps:
        half = "-" if r.rel_l2_fp16 is None else f"{r.rel_l2_fp16:.4f}"
        lines.append(f"{r.step:>4} {r.timestep:>9.1f} {r.rel_l2:>15.4f} {r.rel_l2_ort_kernels:>14.4f} {half:>15}")
    lines.append(
        f"{'image PSNR (dB)':<48} {'vs ' + report.reference:>8} {'vs fp16' if report.reference == 'fp32' else '':>8}"
    )
    for image in report.images:
        half = "-" if image.psnr_fp16_db is None else f"{image.psnr_fp16_db:.1f}"
        lines.append(f"{image.prompt[:48]:<48} {image.psnr_db:>8.1f} {half:>8}")
    if report.accuracy:
        aspects = ("background", "colour", "shape", "size", "all")
        lines.append(f"{'prompt accuracy':<16}" + "".join(f"{a:>11}" for a in aspects))
        for key, acc in report.accuracy.items():
            lines.append(f"{key:<16}" + "".join(f"{acc[a]:>11.0%}" for a in aspects))
    verdict = "pass" if report.passed else "FAIL"
    lines.append(
        f"mean UNet rel L2 vs {report.reference} {report.mean_rel_l2:.4f} (bound {report.max_rel_l2:g}); "
        f"worst image PSNR {report.image_psnr:.1f} dB (bound {report.min_psnr_db:g} dB): {verdict}"
    )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
