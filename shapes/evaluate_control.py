"""How well an outline ControlNet puts the ``shapes`` model's shape where its hint says, at scale 1 and at 0.

    python -m sdtrt.shapes.evaluate_control ARTIFACT [--count 100] [--record NAME]
    python -m sdtrt.shapes.evaluate_control torch:CONTROLNET_FOLDER     # diffusers' pipeline, PyTorch modules

The pairs are ``control_data.eval_examples``: hints at sizes and positions the training never used, a third with
a caption whose shape word contradicts the outline. Pair ``i`` is generated from seed ``IMAGE_SEED + i`` at both
scales, so the only difference between the two runs is the ControlNet's scale; at scale 0 the figures must drop
(the proof that the ControlNet, not chance, puts the shape there). ``--record NAME`` stores the report as
``quality[NAME]`` in the shipped ``shapes-outline.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import control_data, data
from .control_score import control_accuracy, meets_targets

log = logging.getLogger(__name__)

IMAGE_SEED = 3000
STEPS = 20
GUIDANCE = 2.0
SCALES = (1.0, 0.0)
CONTROL_NAME = "outline"

# (prompts, hints (uint8 [128, 128, 3]), seeds, scale) -> images
ControlGenerate = Callable[[Sequence[str], Sequence[np.ndarray], Sequence[int], float], list[Image.Image]]


def evaluate_control(
    generate: ControlGenerate, count: int = 100, scales: Sequence[float] = SCALES
) -> tuple[dict, dict[float, list[Image.Image]]]:
    """(report, images per scale): per scale, ``control_accuracy`` of ``count`` held-out pairs and the time
    taken; at scale 1, whether each target is met."""
    examples = control_data.eval_examples(count)
    prompts = [e.caption for e in examples]
    hints = [control_data.hint_of(e.scene) for e in examples]
    seeds = [IMAGE_SEED + i for i in range(count)]
    made: dict[float, list[Image.Image]] = {}
    report: dict[str, Any] = {"count": count, "steps": STEPS, "guidance": GUIDANCE, "image_seed": IMAGE_SEED}
    for scale in scales:
        start = time.perf_counter()
        images = made[scale] = generate(prompts, hints, seeds, scale)
        accuracy = control_accuracy(images, examples)
        accuracy["seconds"] = round(time.perf_counter() - start, 1)
        report[f"scale_{scale:g}"] = accuracy
        log.info("scale %g: %s", scale, accuracy)
    if "scale_1" in report:
        report["targets_met"] = meets_targets(report["scale_1"])
    return report, made


def hint_sheet(images: Sequence[Image.Image], count: int = 40) -> Image.Image:
    """The first ``count`` images, each with its hint drawn over it in grey, 10 per row."""
    examples = control_data.eval_examples(count)
    side = data.IMAGE_SIZE
    sheet = Image.new("RGB", (10 * side, -(-min(count, len(images)) // 10) * side))
    for i, (image, example) in enumerate(zip(images[:count], examples, strict=False)):
        pixels = np.asarray(image.convert("RGB")).copy()
        pixels[control_data.hint_of(example.scene)[:, :, 0] > 0] = 128
        sheet.paste(Image.fromarray(pixels), ((i % 10) * side, (i // 10) * side))
    return sheet


def pipeline_control_generator(pipe: Any, name: str = CONTROL_NAME) -> ControlGenerate:
    """An sdtrt ``Pipeline`` with the ControlNet ``name`` as a ``ControlGenerate``, one image per call."""
    from sdtrt.runtime.control.inputs import ControlInput

    def generate(prompts: Sequence[str], hints: Sequence[np.ndarray], seeds: Sequence[int], scale: float) -> list:
        out = []
        for prompt, hint, seed in zip(prompts, hints, seeds, strict=True):
            control = ControlInput(name, Image.fromarray(hint), scale=scale, resize_mode="just_resize")
            result = pipe(
                prompt,
                negative_prompt="",
                steps=STEPS,
                guidance_scale=GUIDANCE,
                seed=seed,
                height=data.IMAGE_SIZE,
                width=data.IMAGE_SIZE,
                controls=[control],
            )
            out.append(result.images[0])
        return out

    return generate


def diffusers_control_generator(bundle: Any, controlnet: Any, batch: int = 25) -> ControlGenerate:
    """diffusers' ``StableDiffusionControlNetPipeline`` over the shapes modules and ``controlnet`` (a
    ``ControlNetModel``); each image's starting noise is drawn on the CPU from its own seed, as sdtrt draws it."""
    import diffusers
    import torch

    from sdtrt.runtime.models.reference import clip_tokenizer_hf

    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=clip_tokenizer_hf(),
        unet=bundle.unet,
        controlnet=controlnet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(bundle.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    shape = (4, data.IMAGE_SIZE // 8, data.IMAGE_SIZE // 8)

    def generate(prompts: Sequence[str], hints: Sequence[np.ndarray], seeds: Sequence[int], scale: float) -> list:
        out: list[Image.Image] = []
        for first in range(0, len(prompts), batch):
            chunk = list(prompts[first : first + batch])
            noise = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[first : first + batch]]
            )
            with torch.no_grad():
                result = pipe(
                    chunk,
                    image=[Image.fromarray(h) for h in hints[first : first + batch]],
                    negative_prompt=[""] * len(chunk),
                    num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE,
                    controlnet_conditioning_scale=scale,
                    latents=noise,
                    height=data.IMAGE_SIZE,
                    width=data.IMAGE_SIZE,
                )
            out += result.images
        return out

    return generate


def record_control_quality(name: str, report: dict, folder: Path | None = None) -> None:
    """Store ``report`` as ``quality[name]`` in the shipped ControlNet's record (its weights are untouched)."""
    from sdtrt.runtime.files import write_text_atomic
    from sdtrt.runtime.models.presets import SHIPPED_CONTROLNETS

    shipped = SHIPPED_CONTROLNETS["shapes-outline"]
    path = (folder or shipped.parent) / f"{shipped.name}.json"
    record = json.loads(path.read_text())
    record.setdefault("quality", {})[name] = report
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _run(source: str, backend: str, count: int, scales: Sequence[float]) -> tuple[dict, dict[float, list[Image.Image]]]:
    if source.startswith("torch:"):
        from sdtrt.runtime.models.controlnet import load_controlnet
        from sdtrt.runtime.models.presets import load_shapes

        controlnet = load_controlnet(source[len("torch:") :]).model
        return evaluate_control(diffusers_control_generator(load_shapes(), controlnet), count, scales)
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(source, backend=backend) as pipe:
        return evaluate_control(pipeline_control_generator(pipe), count, scales)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtrt.shapes.evaluate_control", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="an artifact with an 'outline' ControlNet, or 'torch:CONTROLNET_FOLDER'")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--scales", default="1,0", help="ControlNet scales to run, comma-separated (default 1,0)")
    parser.add_argument("--sheet", type=Path, help="write the first 40 images at scale 1 here (hint beside each)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--record", metavar="NAME", help="store the report as quality[NAME] in shapes-outline.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sdtrt.runtime.errors import SdtrtError

    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    try:
        scales = tuple(float(v) for v in args.scales.split(","))
        report, images = _run(args.source, args.backend, args.count, scales)
    except (ValueError, SdtrtError) as exc:
        parser.error(str(exc))
    if args.sheet:
        hint_sheet(images[scales[0]]).save(args.sheet)
    report["source"] = args.source
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    if args.record:
        record_control_quality(args.record, report)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
