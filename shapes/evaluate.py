"""Prompt adherence of a ``shapes`` model: generate held-out prompts, read the images back, report accuracy.

    python -m sdtrt.shapes.evaluate ARTIFACT_FOLDER [--count 200] [--steps 20] [--record]

The prompts come from combinations never seen in training (``data.HELD_OUT``); prompt ``i`` uses seed
``seed + i``, so two runs, backends or precisions generate from the same noise and can be compared image by
image (PSNR) as well as by accuracy. ``--record`` writes the result into the shipped ``shapes.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.progress import Progress

from . import data, score

log = logging.getLogger(__name__)

EVAL_SEED = 2024  # draws the held-out prompts
IMAGE_SEED = 1000  # prompt i is generated from seed IMAGE_SEED + i
DEFAULT_GUIDANCE = 2.0  # chosen on training prompts (1.5-8 tried; 2 best), never on the held-out ones
DEFAULT_STEPS = 20

ARTIFACT_PHASE = "artifact images"
REFERENCE_PHASE = "pytorch reference steps"

Generate = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


@dataclass(frozen=True)
class EvalSettings:
    count: int = 200
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = "euler"
    held_out: bool = True
    prompt_seed: int = EVAL_SEED
    image_seed: int = IMAGE_SEED

    def __post_init__(self) -> None:
        if self.count < 1 or self.steps < 1:
            raise ValueError(f"count and steps must be >= 1, got {self.count} and {self.steps}")


def prompts(count: int, held_out: bool = True, seed: int = EVAL_SEED) -> list[str]:
    """``count`` captions: of held-out combinations, or (``held_out=False``) of training ones."""
    return [s.caption for s in data.scenes(seed, count, held_out=held_out)]


def evaluate(generate: Generate, settings: EvalSettings) -> tuple[dict[str, Any], list[Image.Image]]:
    """(report, images): accuracy per aspect over ``settings.count`` prompts, and the images generated."""
    captions = prompts(settings.count, settings.held_out, settings.prompt_seed)
    seeds = [settings.image_seed + i for i in range(len(captions))]
    start = time.perf_counter()
    images = generate(captions, seeds)
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {
        "accuracy": score.accuracy(images, captions),
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
    }
    return report, images


def image_psnr(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> float:
    """PSNR in dB of image set ``a`` against ``b`` (pairwise, over all pixels together)."""
    x = np.stack([np.asarray(i.convert("RGB")) for i in a])
    y = np.stack([np.asarray(i.convert("RGB")) for i in b])
    return psnr(x, y, peak=255.0)


def pipeline_generator(pipe: Any, settings: EvalSettings, progress: Progress | None = None) -> Generate:
    """An sdtrt ``Pipeline`` as a ``Generate``: one prompt per call, negative prompt empty.

    ``progress`` hears ("artifact images", done, total) per image.
    """

    def generate(captions: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        out = []
        if progress:
            progress(ARTIFACT_PHASE, 0, len(captions))
        for caption, seed in zip(captions, seeds, strict=True):
            result = pipe(
                caption,
                negative_prompt="",
                steps=settings.steps,
                guidance_scale=settings.guidance,
                seed=seed,
                height=data.IMAGE_SIZE,
                width=data.IMAGE_SIZE,
                scheduler=settings.scheduler,
            )
            out.append(result.images[0])
            if progress:
                progress(ARTIFACT_PHASE, len(out), len(captions))
        return out

    return generate


def diffusers_generator(
    bundle: Any, settings: EvalSettings, batch: int = 25, progress: Progress | None = None
) -> Generate:
    """diffusers' own ``StableDiffusionPipeline`` over the PyTorch modules (the reference), same seeds and noise.

    Each image's starting noise is drawn on the CPU from its own seed, as the sdtrt pipeline draws it.
    ``progress`` hears ("pytorch reference steps", done, total) per denoising step of each batch.
    """
    import torch

    from sdtrt.runtime.models.reference import diffusers_pipeline

    pipe = diffusers_pipeline(bundle, settings.scheduler)
    shape = (4, data.IMAGE_SIZE // 8, data.IMAGE_SIZE // 8)

    def generate(captions: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        out: list[Image.Image] = []
        total = -(-len(captions) // batch) * settings.steps
        done = 0

        def on_step(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            if progress:
                progress(REFERENCE_PHASE, done, total)
            return tensors

        if progress:
            progress(REFERENCE_PHASE, 0, total)
        for first in range(0, len(captions), batch):
            chunk, chunk_seeds = list(captions[first : first + batch]), seeds[first : first + batch]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk_seeds])
            with torch.no_grad():
                result = pipe(
                    chunk,
                    negative_prompt=[""] * len(chunk),
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    latents=noise,
                    height=data.IMAGE_SIZE,
                    width=data.IMAGE_SIZE,
                    callback_on_step_end=on_step,
                )
            out += result.images
        return out

    return generate


def record_quality(name: str, report: dict[str, Any], folder: Path | None = None) -> None:
    """Store ``report`` as ``quality[name]`` in shapes.json (the weights and their sha256 are untouched)."""
    from sdtrt.runtime.files import write_text_atomic
    from sdtrt.runtime.models.presets import DATA_DIR, SHAPES_RECORD_NAME, read_shapes_record

    folder = folder or DATA_DIR
    record = read_shapes_record(folder)
    record.setdefault("quality", {})[name] = report
    write_text_atomic(folder / SHAPES_RECORD_NAME, json.dumps(record, indent=2) + "\n")


def contact_sheet(
    images: Sequence[Image.Image], columns: int = 10, captions: Sequence[str] | None = None
) -> Image.Image:
    """A grid of ``images`` (all the same size), row-major; with ``captions``, each is written under its image."""
    from PIL import ImageDraw, ImageFont

    w, h = images[0].size
    label = 30 if captions else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * (h + label)), (255, 255, 255))
    pen, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, image in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + label)
        sheet.paste(image, (x, y))
        if captions:
            words = captions[i].split(" on a ")
            lines = [words[0], "on a " + words[1]] if len(words) == 2 else [captions[i]]
            for k, line in enumerate(lines):
                pen.text((x + 3, y + h + 2 + 13 * k), line, fill=(0, 0, 0), font=font)
    return sheet


def _run(source: str, backend: str, settings: EvalSettings) -> tuple[dict[str, Any], list[Image.Image]]:
    if source.startswith("torch:"):
        from sdtrt.runtime.models.presets import load_shapes

        return evaluate(diffusers_generator(load_shapes(Path(source[6:])), settings), settings)
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(source, backend=backend) as pipe:
        return evaluate(pipeline_generator(pipe, settings), settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtrt.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="an artifact folder (run with sdtrt's pipeline) or 'torch:FOLDER' of weights")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--train-prompts", action="store_true", help="prompts of training combinations")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet of the first 40 images here")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--record", metavar="NAME", help="store the report as quality[NAME] in the shipped shapes.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sdtrt.runtime.errors import SdtrtError

    try:
        settings = EvalSettings(
            count=args.count, steps=args.steps, guidance=args.guidance, held_out=not args.train_prompts
        )
        report, images = _run(args.source, args.backend, settings)
    except (ValueError, SdtrtError) as exc:
        parser.error(str(exc))
    if args.sheet:
        contact_sheet(images[:40]).save(args.sheet)
    text = json.dumps(report, indent=2)
    if args.json:
        from sdtrt.runtime.files import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    if args.record:
        record_quality(args.record, report | {"source": args.source})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
