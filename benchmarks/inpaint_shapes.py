"""Inpainting on the trained ``shapes`` model: repaint the shape in another colour and keep everything else.

    python -m sdtrt.benchmarks.inpaint_shapes --cases 64 --json benchmarks/results/inpaint_shapes.json

Case ``i`` draws a scene (``shapes.data``, any combination), masks its filled shape (``control_data.filled_mask``)
grown by ``--grow`` pixels, and asks for the scene's caption with another shape colour (same shape, size and
background). The shapes artifact (fp32, ONNX Runtime on the CPU; exported into ``--out`` once, as
``sdtrt export shapes --precision fp32 --no-step-cache`` does) repaints it with ``inpaint=Inpaint(mask)`` at each
strength and fill, and plain img2img of the same prompt, strength and seed runs as the baseline. Each image is read
back with the shapes scorer: the shape's colour against the asked one, its class and its overlap (IoU) with the
original shape, and the pixels outside the mask against the scene: at the mask's edge (within the blur's reach,
where the composite mixes the generated image in) and beyond it (where it must be exactly the scene).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from sdtrt.shapes import data, score
from sdtrt.shapes.control_data import filled_mask

log = logging.getLogger(__name__)

CASE_SEED = 2121  # draws the scenes and the asked colours
IMAGE_SEED = 5000  # case i is generated from seed IMAGE_SEED + i
FILL_NAMES = {
    "original": "original",
    "fill": "fill",
    "latent-noise": "latent noise",
    "latent-nothing": "latent nothing",
}
CONTROL = "shapes-outline"  # the shipped outline ControlNet: pins the shape's outline where the mask is


@dataclass(frozen=True)
class InpaintSettings:
    """What to run: ``cases`` scenes, each at every strength with every fill, plus img2img at every strength."""

    cases: int = 64
    strengths: tuple[float, ...] = (0.5, 0.75, 1.0)
    fills: tuple[str, ...] = ("original", "latent noise")
    steps: int = 20  # the shapes model's usual settings (shapes.evaluate)
    guidance: float = 2.0
    sampler: str = "euler"
    grow: int = 4  # pixels the mask extends past the shape
    blur: int = 4  # A1111's mask_blur
    baseline: bool = True  # also run img2img without the mask
    control: bool = True  # also inpaint with the outline ControlNet fed the original shape's outline (first fill)

    def __post_init__(self) -> None:
        from sdtrt.runtime.inpaint import FILLS

        if self.cases < 1 or self.steps < 1 or not self.strengths:
            raise ValueError(
                f"expected cases >= 1, steps >= 1 and a strength, got {self.cases}, {self.steps}, {self.strengths}"
            )
        if any(not 0.0 < s <= 1.0 for s in self.strengths):
            raise ValueError(f"strengths must be in (0, 1], got {list(self.strengths)}")
        bad = [f for f in self.fills if f not in FILLS]
        if bad or not self.fills:
            raise ValueError(f"fills must be some of {', '.join(FILL_NAMES)}, got {list(self.fills)}")
        if not 0 <= self.grow <= 16 or not 0 <= self.blur <= 16:
            raise ValueError(f"grow and blur must be 0..16 pixels, got {self.grow} and {self.blur}")


@dataclass(frozen=True)
class Case:
    """One scene and the colour its shape is to be repainted in."""

    scene: data.Scene
    colour: str
    seed: int

    @property
    def prompt(self) -> str:
        return dataclasses.replace(self.scene, colour=self.colour).caption

    @property
    def held_out(self) -> bool:
        """Whether the asked combination (shape, new colour, background) never appeared in training."""
        return (self.scene.shape, self.colour, self.scene.background) in data.HELD_OUT


@dataclass(frozen=True)
class Zones:
    """Boolean [128, 128] pixel sets of one case: the original shape, the mask (what repaints), the part outside
    the mask within the blur's reach (``edge``) and beyond it (``beyond``: the composite keeps the scene there)."""

    shape: np.ndarray
    mask: np.ndarray
    edge: np.ndarray
    beyond: np.ndarray


def make_cases(count: int, seed: int = CASE_SEED) -> list[Case]:
    """``count`` cases: scenes of any combination, each with a new shape colour (not its own, not the background)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        scene = data.random_scene(rng, data.ALL_COMBINATIONS)
        others = [c for c in data.COLOURS if c not in (scene.colour, scene.background)]
        cases.append(Case(scene, others[int(rng.integers(len(others)))], IMAGE_SEED + i))
    return cases


def mask_of(scene: data.Scene, grow: int) -> Image.Image:
    """The inpainting mask of ``scene``: its filled shape grown by ``grow`` pixels (square reach), white on black."""
    mask = Image.fromarray(filled_mask(scene.shape, scene.centre, scene.radius).astype(np.uint8) * 255, "L")
    return mask.filter(ImageFilter.MaxFilter(2 * grow + 1)) if grow else mask


def zones_of(scene: data.Scene, mask: Image.Image, blur: int) -> Zones:
    """Where to measure: the blur's reach is where the mask blurred as the pipeline blurs it is above zero."""
    grown = np.asarray(mask) > 127
    reach = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur))) > 0 if blur else grown
    shape = filled_mask(scene.shape, scene.centre, scene.radius)
    return Zones(shape=shape, mask=grown, edge=reach & ~grown, beyond=~reach)


def blur_reach(zones: Zones) -> int:
    """How many pixels past the mask the blur reaches (the largest Chebyshev distance of an ``edge`` pixel)."""
    reach, grown = 0, zones.mask
    while (zones.edge & ~grown).any():
        grown = np.asarray(Image.fromarray(grown.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 127
        reach += 1
    return reach


def measure(image: Image.Image, case: Case, zones: Zones) -> dict[str, Any]:
    """One image against its case: what the scorer reads, the IoU of the read shape region with the original
    shape, and the abs pixel error against the scene outside the mask, at the edge and beyond the blur's reach."""
    pixels = data.to_array(image)
    reading = score.read_image(pixels)
    _, region = score.shape_region(pixels)
    union = int((region | zones.shape).sum())
    error = np.abs(pixels.astype(np.int16) - data.to_array(data.draw(case.scene)).astype(np.int16)).max(axis=2)
    outside = ~zones.mask
    return {
        "colour": reading.colour,
        "shape": reading.shape,
        "background": reading.background,
        "iou": round(int((region & zones.shape).sum()) / union, 4) if union else 0.0,
        "outside_max": int(error[outside].max()),
        "outside_sq": float((error[outside].astype(np.float64) ** 2).mean()),
        "outside_mean": round(float(error[outside].mean()), 3),
        "edge_max": int(error[zones.edge].max()) if zones.edge.any() else 0,
        "edge_mean": round(float(error[zones.edge].mean()), 3) if zones.edge.any() else 0.0,
        "beyond_max": int(error[zones.beyond].max()) if zones.beyond.any() else 0,
    }


def summarise(readings: Sequence[dict[str, Any]], cases: Sequence[Case]) -> dict[str, Any]:
    """One setting's figures over its cases (``readings[i]`` is case ``i``'s ``measure``)."""

    def share(test: Any) -> float:
        return round(sum(bool(test(r, c)) for r, c in zip(readings, cases, strict=True)) / len(cases), 4)

    mse = statistics.fmean(r["outside_sq"] for r in readings)
    ious = sorted(r["iou"] for r in readings)
    return {
        "colour_accuracy": share(lambda r, c: r["colour"] == c.colour),
        "kept_old_colour": share(lambda r, c: r["colour"] == c.scene.colour),
        "no_shape": share(lambda r, c: r["shape"] == "none"),
        "shape_kept": share(lambda r, c: r["shape"] == c.scene.shape),
        "background_kept": share(lambda r, c: r["background"] == c.scene.background),
        "iou_mean": round(statistics.fmean(ious), 4),
        "iou_p10": ious[len(ious) // 10],
        "outside_max": max(r["outside_max"] for r in readings),
        "outside_mean": round(statistics.fmean(r["outside_mean"] for r in readings), 3),
        "outside_psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse else None,
        "edge_max": max(r["edge_max"] for r in readings),
        "edge_mean": round(statistics.fmean(r["edge_mean"] for r in readings), 3),
        "beyond_max": max(r["beyond_max"] for r in readings),
    }


def colour_accuracy_by(readings: Sequence[dict[str, Any]], cases: Sequence[Case], key: Any) -> dict[str, float]:
    """Colour accuracy per value of ``key(case)`` (e.g. the asked colour), for where the failures lie."""
    groups: dict[str, list[bool]] = {}
    for r, c in zip(readings, cases, strict=True):
        groups.setdefault(str(key(c)), []).append(r["colour"] == c.colour)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(groups.items())}


def export_shapes(out: Path, control: bool) -> Path:
    """The shapes artifact in fp32 (no shallow UNet: step caching is not measured), with the outline ControlNet
    when ``control``; exported once into ``out``. Without a ControlNet its UNet runs as the plain artifact's."""
    folder = out / ("shapes-fp32-outline" if control else "shapes-fp32")
    if (folder / "manifest.json").is_file():
        return folder
    from sdtrt.export.controlnet import ControlNetArg, load_controlnets
    from sdtrt.export.onnx_export import export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.export.trace import ExportOptions
    from sdtrt.runtime.models.sources import load_source

    bundle = load_source("shapes")
    controlnets = load_controlnets([ControlNetArg(CONTROL)], bundle.model) if control else []
    log.info("exporting %s", folder)
    options = ExportOptions(profile=default_profile(bundle), step_cache=False)
    export_artifacts(bundle, folder, options, controlnets=controlnets)
    return folder


def settings_list(settings: InpaintSettings) -> list[tuple[str, float, str | None]]:
    """Every (mode, strength, fill) to run, per strength: inpaint per fill, inpaint with the outline ControlNet
    ("inpaint+outline", first fill), then img2img (fill None)."""
    out: list[tuple[str, float, str | None]] = []
    for strength in settings.strengths:
        out += [("inpaint", strength, fill) for fill in settings.fills]
        if settings.control:
            out.append(("inpaint+outline", strength, settings.fills[0]))
        if settings.baseline:
            out.append(("img2img", strength, None))
    return out


def run_cases(pipe: Any, cases: Sequence[Case], settings: InpaintSettings) -> dict[str, Any]:
    """Generate and measure every case at every setting: {"rows": one summary per setting, "cases": per case,
    "images": {setting key: images}} (the images for a contact sheet)."""
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.inpaint import Inpaint
    from sdtrt.shapes.control_data import hint_of

    runs = settings_list(settings)
    keys = [f"{mode} {strength:g} {fill or '-'}" for mode, strength, fill in runs]
    readings: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    images: dict[str, list[Image.Image]] = {k: [] for k in keys}
    seconds = dict.fromkeys(keys, 0.0)
    control_name = next(iter(pipe.controlnets), None)
    for i, case in enumerate(cases):
        mask = mask_of(case.scene, settings.grow)
        zones, scene = zones_of(case.scene, mask, settings.blur), data.draw(case.scene)
        hint = (
            ControlInput(control_name, Image.fromarray(hint_of(case.scene)), resize_mode="just_resize")
            if (control_name)
            else None
        )
        for key, (mode, strength, fill) in zip(keys, runs, strict=True):
            inpaint = Inpaint(mask, blur=settings.blur, fill=fill) if fill else None
            start = time.perf_counter()
            result = pipe(
                case.prompt,
                negative_prompt="",
                steps=settings.steps,
                guidance_scale=settings.guidance,
                seed=case.seed,
                scheduler=settings.sampler,
                image=scene,
                strength=strength,
                inpaint=inpaint,
                controls=[hint] if mode == "inpaint+outline" else [],
            )
            seconds[key] += time.perf_counter() - start
            images[key].append(result.images[0])
            readings[key].append(measure(result.images[0], case, zones))
        log.info("case %d/%d: %s -> %s", i + 1, len(cases), case.scene.caption, case.colour)
    rows = []
    for key, (mode, strength, fill) in zip(keys, runs, strict=True):
        row = {"mode": mode, "strength": strength, "fill": fill, "cases": len(cases)}
        row |= summarise(readings[key], cases)
        row["colour_by_asked"] = colour_accuracy_by(readings[key], cases, lambda c: c.colour)
        row["seconds_per_image"] = round(seconds[key] / len(cases), 3)
        rows.append(row)
    per_case = [
        {"caption": c.scene.caption, "prompt": c.prompt, "seed": c.seed, "held_out": c.held_out}
        | {"results": {k: _brief(readings[k][i]) for k in keys}}
        for i, c in enumerate(cases)
    ]
    return {"rows": rows, "cases": per_case, "images": images}


def _brief(reading: dict[str, Any]) -> dict[str, Any]:
    return {k: reading[k] for k in ("colour", "shape", "iou", "outside_mean", "edge_max", "beyond_max")}


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = (
        "| mode | strength | fill | colour right | old colour | no shape | shape kept | IoU mean (p10) "
        "| outside: max / mean abs err, PSNR | edge max / mean | beyond blur max | s/image |"
    )
    out = [head, "|" + "---|" * 12]
    for r in rows:
        psnr = "inf" if r["outside_psnr_db"] is None else f"{r['outside_psnr_db']:.1f} dB"
        out.append(
            f"| {r['mode']} | {r['strength']:g} | {r['fill'] or '-'} | {_pct(r['colour_accuracy'])} "
            f"| {_pct(r['kept_old_colour'])} | {_pct(r['no_shape'])} | {_pct(r['shape_kept'])} "
            f"| {r['iou_mean']:.2f} ({r['iou_p10']:.2f}) | {r['outside_max']} / {r['outside_mean']:.2f}, {psnr} "
            f"| {r['edge_max']} / {r['edge_mean']:.1f} | {r['beyond_max']} | {r['seconds_per_image']:.2f} |"
        )
    return "\n".join(out)


def sheet(cases: Sequence[Case], images: dict[str, list[Image.Image]], count: int) -> Image.Image:
    """A contact sheet of the first ``count`` cases: the scene, its mask, then one image per setting, a row each."""
    from sdtrt.shapes.evaluate import contact_sheet

    tiles, labels = [], []
    for i, case in enumerate(cases[:count]):
        mask = mask_of(case.scene, 0).convert("RGB")
        tiles += [data.draw(case.scene), mask] + [images[k][i] for k in images]
        labels += [case.scene.caption, f"-> {case.colour}"] + list(images)
    return contact_sheet(tiles, columns=2 + len(images), captions=labels)


def parse(argv: Sequence[str] | None) -> tuple[InpaintSettings, argparse.Namespace]:
    """The command line as ``InpaintSettings`` (exit 2 with one line on a bad setting) and the parsed arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m sdtrt.benchmarks.inpaint_shapes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("out/inpaint-shapes"), help="folder for the artifact")
    parser.add_argument("--cases", type=int, default=64, help="scenes to repaint (default: %(default)s)")
    parser.add_argument("--strengths", default="0.5,0.75,1.0", help="denoising strengths, comma-separated")
    parser.add_argument("--fills", default="original,latent-noise", help=f"of {', '.join(FILL_NAMES)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grow", type=int, default=4, help="pixels the mask extends past the shape")
    parser.add_argument("--blur", type=int, default=4, help="mask blur in pixels")
    parser.add_argument("--no-baseline", action="store_true", help="skip plain img2img")
    parser.add_argument("--no-control", action="store_true", help="skip inpainting with the outline ControlNet")
    parser.add_argument("--json", type=Path, help="write the rows, the cases and the run's metadata here")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet of the first 12 cases here (PNG)")
    args = parser.parse_args(argv)
    try:
        unknown = [f for f in args.fills.split(",") if f not in FILL_NAMES]
        if unknown:
            raise ValueError(f"fills must be some of {', '.join(FILL_NAMES)}, got {unknown}")
        settings = InpaintSettings(
            cases=args.cases,
            strengths=tuple(float(s) for s in args.strengths.split(",") if s.strip()),
            fills=tuple(FILL_NAMES[f] for f in args.fills.split(",")),
            steps=args.steps,
            grow=args.grow,
            blur=args.blur,
            baseline=not args.no_baseline,
            control=not args.no_control,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sdtrt.benchmarks.records import write_record
    from sdtrt.runtime.pipeline import Pipeline

    start = time.perf_counter()
    cases = make_cases(settings.cases)
    folder = export_shapes(args.out, settings.control)
    with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu") as pipe:
        result = run_cases(pipe, cases, settings)
    reach = max(blur_reach(zones_of(c.scene, mask_of(c.scene, settings.grow), settings.blur)) for c in cases)
    table = format_table(result["rows"])
    if args.json:
        command = "python -m sdtrt.benchmarks.inpaint_shapes " + " ".join(sys.argv[1:] if argv is None else argv)
        summary = {"blur_reach_px": reach, "held_out_cases": sum(c.held_out for c in cases), "table": table}
        extra = {"command": command, "seconds": round(time.perf_counter() - start, 1), "versions": _versions()}
        extra["cases"] = result["cases"]
        write_record(args.json, "inpaint_shapes", dataclasses.asdict(settings), result["rows"], summary, **extra)
    if args.sheet:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet(cases, result["images"], 12).save(args.sheet)
    print(table)
    print(f"blur reach: {reach} px past the mask")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
