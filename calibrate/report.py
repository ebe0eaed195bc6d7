"""What a quality report of a quantized UNet holds: its config, its rows, its verdict, and the table it prints.

The measurement that fills it is ``sdtrt.calibrate.measure.quality_report``. A model with something to read back
from its images (a trained demo model, say) passes its own held-out prompts, sampler and size, and a scoring
function, as plain config: calibrate knows no model by name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.files import write_text_atomic

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
# (images as HxWx3 uint8 arrays, their prompts) -> fraction right per aspect, with "all" for everything right
ScoreImages = Callable[[Sequence[np.ndarray], Sequence[str]], dict[str, float]]


@dataclass(frozen=True)
class ReportConfig:
    """prompts: how many held-out prompts, taken in order from ``held_out`` (skipping any used for calibration);
    steps: denoising steps per trajectory; size in pixels (None: the calibration size, else the profile's
    smallest). Bounds: the report passes when the mean UNet error against fp32 is at most ``max_rel_l2`` and
    every image's PSNR is at least ``min_psnr_db``. With ``score``, each precision's images are also scored,
    and the quantized ones' "all" accuracy may trail the image reference's by at most ``max_accuracy_drop``."""

    prompts: int = 2
    steps: int = 10
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str = "euler_a"
    seed: int = 1000
    max_rel_l2: float = 0.15
    min_psnr_db: float = 15.0
    held_out: tuple[str, ...] = HELD_OUT_PROMPTS
    score: ScoreImages | None = None
    max_accuracy_drop: float = 0.10

    def __post_init__(self) -> None:
        for name in ("prompts", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"report {name} must be an integer >= 1, got {value!r}")
        if (self.height is None) != (self.width is None):
            raise ConfigError("give both height and width, or neither")
        if isinstance(self.held_out, str) or not all(isinstance(p, str) and p for p in self.held_out):
            raise ConfigError("held-out prompts must be a tuple of non-empty strings")
        if self.score is not None and not callable(self.score):
            raise ConfigError(f"score must be a function (images, prompts) -> accuracy per aspect, got {self.score!r}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ConfigError(f"max_accuracy_drop must be between 0 and 1, got {self.max_accuracy_drop}")


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
    # with a scoring function only: precision ("int8", "fp32", "fp16") -> accuracy per aspect on the prompts
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    max_accuracy_drop: float = 0.10

    @property
    def accuracy_ok(self) -> bool:
        """The quantized images' 'all' accuracy is at most ``max_accuracy_drop`` behind the image reference's."""
        if not self.accuracy:
            return True
        ref = self.accuracy.get("fp16") or self.accuracy[self.reference]
        return self.accuracy[self.precision]["all"] >= ref["all"] - self.max_accuracy_drop

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


def format_report(report: QualityReport) -> str:
    """The report as a table for a terminal; the "vs fp16" columns only when an fp16 reference was measured."""
    steps_fp16 = any(r.rel_l2_fp16 is not None for r in report.steps)
    images_fp16 = any(r.psnr_fp16_db is not None for r in report.images)
    lines = [
        f"{report.precision} UNet of {report.artifact} (unquantized layers: {report.unquantized_dtype}), "
        f"{report.size}, {len(report.steps)} steps, {len(report.images)} held-out prompts",
        f"{'step':>4} {'timestep':>9} {'rel L2 vs ' + report.reference:>15} {'(ORT kernels)':>14}"
        + (f" {'rel L2 vs fp16':>15}" if steps_fp16 else ""),
    ]
    for r in report.steps:
        half = f" {_number(r.rel_l2_fp16, '.4f'):>15}" if steps_fp16 else ""
        lines.append(f"{r.step:>4} {r.timestep:>9.1f} {r.rel_l2:>15.4f} {r.rel_l2_ort_kernels:>14.4f}{half}")
    lines.append(f"{'image PSNR (dB)':<48} {'vs ' + report.reference:>8}" + (f" {'vs fp16':>8}" if images_fp16 else ""))
    for image in report.images:
        half = f" {_number(image.psnr_fp16_db, '.1f'):>8}" if images_fp16 else ""
        lines.append(f"{image.prompt[:48]:<48} {image.psnr_db:>8.1f}{half}")
    if report.accuracy:
        aspects = list(next(iter(report.accuracy.values())))  # in the scoring function's order
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


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
