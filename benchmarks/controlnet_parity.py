"""ControlNet images against diffusers' ControlNet pipelines, on the tiny preset: PSNR per case and backend.

    python -m sdtrt.benchmarks.controlnet_parity

The cases of ``tests/runtime/control/test_control_pipeline.py`` (which assert >= 40 dB), printed as a table for
``benchmarks/RESULTS.md``: one ControlNet, two with different scales, start/end, guess mode, CFG off with two
images, img2img; and each against the image without control (how much the ControlNet changes it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtrt.export.controlnet import ControlNetArg, load_controlnets
from sdtrt.export.onnx_export import ExportOptions, export_artifacts
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.control.inputs import ControlInput
from sdtrt.runtime.models.controlnet import TINY_HINT_CHANNELS, controlnet_from_unet
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.models.reference import controlnet_pipeline
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.profile import ShapeProfile

PROMPT, NEGATIVE, SIZE, STEPS, SEED = "a photo of a cat on a red sofa", "blurry", 64, 4, 3
SEEDS = {"edges": 1, "depth": 2}


def _hint(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(((rng.random((SIZE, SIZE, 3)) > 0.8) * 255).astype(np.uint8))


HINTS = {name: _hint(seed) for name, seed in SEEDS.items()}
INIT = Image.fromarray((np.random.default_rng(5).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
# case: ([(name, ControlInput options)], sdtrt call options, diffusers call options)
CASES: dict[str, tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], dict[str, Any]]] = {
    "one ControlNet": ([("edges", {})], {}, {}),
    "two (MultiControlNetModel, scales 0.6 / 1.3)": (
        [("edges", {"scale": 0.6}), ("depth", {"scale": 1.3})], {}, {"controlnet_conditioning_scale": [0.6, 1.3]}
    ),
    "start/end 0.2/0.8 (10 steps)": (
        [("edges", {"start": 0.2, "end": 0.8})], {"steps": 10},
        {"control_guidance_start": 0.2, "control_guidance_end": 0.8, "num_inference_steps": 10},
    ),
    "guess mode": ([("edges", {"guess_mode": True})], {}, {"guess_mode": True}),
    "CFG off, 2 images": (
        [("depth", {})], {"guidance_scale": 1.0, "num_images": 2}, {"guidance_scale": 1.0, "images": 2}
    ),
    "img2img, strength 0.75 (8 steps)": (
        [("edges", {})], {"image": INIT, "strength": 0.75, "steps": 8},
        {"img2img": INIT, "strength": 0.75, "num_inference_steps": 8, "controlnet_conditioning_scale": 1.0},
    ),
}  # fmt: skip


def reference(models: dict[str, Any], names: list[str], img2img: Any = None, images: int = 1, **kw: Any) -> Any:
    """diffusers' ControlNet pipeline over fresh tiny weights; image k from seed SEED + k, as sdtrt draws them."""
    chosen = [models[n] for n in names]
    pipe = controlnet_pipeline(
        load_preset("tiny"), "euler", chosen if len(chosen) > 1 else chosen[0], img2img is not None
    )
    hints = [HINTS[n] for n in names]
    hint: Any = hints if len(hints) > 1 else hints[0]
    given = {"image": img2img, "control_image": hint} if img2img is not None else {"image": hint}
    args = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "height": SIZE, "width": SIZE, **kw}
    generators = [torch.Generator().manual_seed(SEED + k) for k in range(images)]
    with torch.no_grad():
        return pipe(
            PROMPT, generator=generators, num_images_per_prompt=images, output_type="pt", **given, **args
        ).images


def main() -> None:
    bundle = load_preset("tiny")
    folder = Path(tempfile.mkdtemp(prefix="sdtrt-controlnet-parity-"))
    models = {}
    for name, seed in SEEDS.items():
        models[name] = controlnet_from_unet(bundle.unet, seed=seed, hint_channels=TINY_HINT_CHANNELS, gain=3.0)
        models[name].save_pretrained(folder / name)
    args = [ControlNetArg(str(folder / name), name) for name in SEEDS]
    profile = ShapeProfile.square(64, 128, 256, max_batch=4)
    export_artifacts(
        bundle, folder / "A", ExportOptions(profile=profile), controlnets=load_controlnets(args, bundle.model)
    )
    pipes = {backend: Pipeline.from_artifacts(folder / "A", backend=backend) for backend in ("onnxruntime", "torch")}
    print("| case | ONNX Runtime | torch | vs no control |\n|---|---|---|---|")
    for case, (controls, call, diffusers_call) in CASES.items():
        want = reference(models, [n for n, _ in controls], **diffusers_call)
        run = {"negative_prompt": NEGATIVE, "steps": STEPS, "seed": SEED, "height": SIZE, "width": SIZE, **call}
        inputs = [ControlInput(n, HINTS[n], resize_mode="just_resize", **o) for n, o in controls]
        got = {b: p(PROMPT, scheduler="euler", controls=inputs, **run).pixels for b, p in pipes.items()}
        plain = pipes["onnxruntime"](PROMPT, scheduler="euler", **run).pixels
        ort, tch = psnr(got["onnxruntime"], want), psnr(got["torch"], want)
        print(f"| {case} | {ort:.1f} dB | {tch:.1f} dB | {psnr(got['onnxruntime'], plain):.1f} dB |")


if __name__ == "__main__":
    main()
