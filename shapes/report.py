"""Prompt adherence of a ``shapes`` artifact against its PyTorch source, and the shapes model's config for
``sdtrt calibrate`` and the quality report of its quantized UNets.

The artifact (any precision, ONNX Runtime) and diffusers' own pipeline over the fp32 PyTorch modules generate
the same held-out prompts from the same seeds. The report gives each one's accuracy per aspect and the PSNR of
the artifact's images against the PyTorch ones: an artifact can keep a high PSNR and still lose shapes (or the
reverse), so both are shown, and the check fails when the artifact's accuracy falls behind PyTorch's.

Calibration knows no model by name: for a shapes artifact the CLI passes :func:`calibration_config` (its
training captions, sampler and CFG) and :func:`quality_config` (its held-out captions, size, sampler, CFG and
scorer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sdtrt.calibrate.artifacts import CalibrateRequest
from sdtrt.calibrate.capture import CaptureConfig
from sdtrt.calibrate.report import ReportConfig
from sdtrt.runtime.progress import Progress

from . import score
from .data import IMAGE_SIZE
from .evaluate import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    IMAGE_SEED,
    EvalSettings,
    diffusers_generator,
    evaluate,
    image_psnr,
    pipeline_generator,
)
from .evaluate import prompts as held_out_captions

MAX_ACCURACY_DROP = 0.10  # the artifact may be this much behind PyTorch on "all three right", no more
# Every caption of the training combinations, none of the held-out ones: what its UNet is calibrated on.
CALIBRATION_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.txt"
DISTINCT_DRAWS = 500  # held-out scenes drawn to meet every held-out caption at least once
SAMPLER = EvalSettings.scheduler  # the sampler its recorded accuracy was measured with


@dataclass(frozen=True)
class AdherenceReport:
    artifact: str
    precision: str
    prompts: int
    steps: int
    guidance: float
    accuracy: dict[str, float]  # the artifact's, per aspect
    reference_accuracy: dict[str, float]  # PyTorch fp32 (diffusers), same prompts and seeds
    psnr_db: float  # artifact images against the PyTorch ones

    @property
    def passed(self) -> bool:
        return self.accuracy["all"] >= self.reference_accuracy["all"] - MAX_ACCURACY_DROP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "max_accuracy_drop": MAX_ACCURACY_DROP}


def is_shapes(source: dict[str, Any]) -> bool:
    """Whether a manifest's ``source`` is the trained shapes preset."""
    return source.get("kind") == "preset" and source.get("name") == "shapes"


def calibration_config(request: CalibrateRequest) -> CalibrateRequest:
    """``request`` for a shapes artifact: its own training captions, and its sampler and CFG unless the request
    already sets others. A request that names a prompt file is kept as it is."""
    if request.prompts_file is not None:
        return request
    capture = request.capture
    if (capture.guidance_scale, capture.scheduler) == (CaptureConfig.guidance_scale, CaptureConfig.scheduler):
        capture = replace(capture, guidance_scale=DEFAULT_GUIDANCE, scheduler=SAMPLER)
    return replace(request, capture=capture, prompts_file=str(CALIBRATION_PROMPTS))


def quality_config(prompts: int = 20) -> ReportConfig:
    """The quality report for a quantized shapes UNet: ``prompts`` held-out captions at the model's size,
    sampler and CFG, each precision's images scored for what they show."""
    return ReportConfig(
        prompts=prompts,
        steps=DEFAULT_STEPS,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=DEFAULT_GUIDANCE,
        scheduler=SAMPLER,
        seed=IMAGE_SEED,
        held_out=distinct_held_out_captions(),
        score=score.accuracy,
        max_accuracy_drop=MAX_ACCURACY_DROP,
    )


def distinct_held_out_captions() -> tuple[str, ...]:
    """Every caption of the held-out combinations, each once, in the order the evaluation draws them.

    The evaluation draws scenes at random, so its captions repeat (the same caption from another seed); the
    quality report measures each prompt once.
    """
    return tuple(dict.fromkeys(held_out_captions(DISTINCT_DRAWS)))


def adherence_report(
    folder: str | Path,
    prompts: int = 20,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    bundle: Any = None,
    progress: Progress | None = None,
) -> AdherenceReport:
    """Generate ``prompts`` held-out prompts with the artifact in ``folder`` and with PyTorch; compare.

    ``progress`` hears ("artifact images", done, total), then ("pytorch reference steps", done, total).
    """
    from sdtrt.runtime.manifest import read_manifest
    from sdtrt.runtime.models.presets import load_shapes
    from sdtrt.runtime.pipeline import Pipeline

    manifest = read_manifest(Path(folder))
    settings = EvalSettings(count=prompts, steps=steps, guidance=guidance)
    with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu", cuda_graph=False) as pipe:
        ours, our_images = evaluate(pipeline_generator(pipe, settings, progress), settings)
    reference = diffusers_generator(bundle or load_shapes(), settings, progress=progress)
    theirs, their_images = evaluate(reference, settings)
    precisions = sorted({e.precision for e in manifest.components.values()})
    return AdherenceReport(
        artifact=str(folder),
        precision="/".join(precisions),
        prompts=prompts,
        steps=steps,
        guidance=guidance,
        accuracy=ours["accuracy"],
        reference_accuracy=theirs["accuracy"],
        psnr_db=round(image_psnr(our_images, their_images), 2),
    )


def format_adherence(report: AdherenceReport) -> str:
    """The report as a few lines for a terminal."""
    aspects = ("background", "colour", "shape", "size", "all")
    head = f"{'prompt adherence':<22}" + "".join(f"{a:>11}" for a in aspects)
    ours = f"{'artifact ' + report.precision:<22}" + "".join(f"{report.accuracy[a]:>11.0%}" for a in aspects)
    ref = f"{'pytorch fp32':<22}" + "".join(f"{report.reference_accuracy[a]:>11.0%}" for a in aspects)
    verdict = "pass" if report.passed else "FAIL"
    tail = (
        f"{report.prompts} held-out prompts, {report.steps} steps, CFG {report.guidance:g}; image PSNR vs pytorch "
        f"{report.psnr_db:.1f} dB; 'all' may trail pytorch by at most {MAX_ACCURACY_DROP:.0%}: {verdict}"
    )
    return "\n".join([head, ours, ref, tail])
