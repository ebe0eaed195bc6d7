"""Prompt accuracy and image PSNR of the shapes model in every precision, on the same held-out prompts and seeds.

    python -m sdtrt.benchmarks.shapes_quality --out out/shapes-quality [--count 200] [--record]

Exports shapes in fp32 and fp16, calibrates int8 and fp8 UNets from the fp16 artifact, generates the held-out
prompts with each on ONNX Runtime (CPU) and with diffusers' own pipeline in PyTorch fp32, and reports accuracy per
aspect and the PSNR of each set against its reference (fp16 against fp32; int8/fp8 against fp16; fp32 against
PyTorch). ``--record`` stores the figures in the shipped shapes.json, where the tests read them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REFERENCES = {
    "onnxruntime_fp32": "pytorch_fp32",
    "onnxruntime_fp16": "onnxruntime_fp32",
    "onnxruntime_int8": "onnxruntime_fp16",
    "onnxruntime_fp8": "onnxruntime_fp16",
}


def _artifacts(out: Path) -> dict[str, Path]:
    from sdtrt.calibrate.artifacts import CalibrateRequest, calibrate_artifacts
    from sdtrt.calibrate.quantize import QuantizeConfig
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.models.sources import load_source
    from sdtrt.shapes.report import calibration_config

    bundle = load_source("shapes")
    folders = {}
    for precision in ("fp32", "fp16"):
        folder = out / f"shapes-{precision}"
        if not (folder / "manifest.json").is_file():
            export_artifacts(bundle, folder, ExportOptions(profile=default_profile(bundle), precision=precision))
        folders[precision] = folder
    for precision in ("int8", "fp8"):
        folder = out / f"shapes-{precision}"
        if not (folder / "manifest.json").is_file():
            request = calibration_config(CalibrateRequest(quantize=QuantizeConfig(precision)))
            calibrate_artifacts(folders["fp16"], folder, request)
        folders[precision] = folder
    return folders


def run(out: Path, count: int) -> dict[str, Any]:
    """Every precision's report, keyed ``onnxruntime_<precision>`` plus ``pytorch_fp32``."""
    from sdtrt.runtime.models.presets import load_shapes
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.shapes.evaluate import EvalSettings, diffusers_generator, evaluate, image_psnr, pipeline_generator

    folders = _artifacts(out)
    settings = EvalSettings(count=count)
    reports: dict[str, Any] = {}
    images: dict[str, list[Any]] = {}
    log.info("pytorch fp32 (diffusers) on %d prompts", count)
    reports["pytorch_fp32"], images["pytorch_fp32"] = evaluate(diffusers_generator(load_shapes(), settings), settings)
    for precision, folder in folders.items():
        key = f"onnxruntime_{precision}"
        log.info("%s on %d prompts", key, count)
        with Pipeline.from_artifacts(folder, backend="onnxruntime", device="cpu") as pipe:
            reports[key], images[key] = evaluate(pipeline_generator(pipe, settings), settings)
    for key, ref in REFERENCES.items():
        reports[key]["psnr_db"] = {f"vs_{ref}": round(image_psnr(images[key], images[ref]), 2)}
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdtrt.benchmarks.shapes_quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/shapes-quality"), help="folder for the artifacts (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the reports here")
    parser.add_argument("--record", action="store_true", help="store them in the shipped shapes.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    start = time.perf_counter()
    reports = run(args.out, args.count)
    meta = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m sdtrt.benchmarks.shapes_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - start, 1),
    }
    result = {"meta": meta, "reports": reports}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        from sdtrt.shapes.evaluate import record_quality

        for key, report in reports.items():
            record_quality(key, report | {"meta": meta})
    for key, report in reports.items():
        acc = report["accuracy"]
        extra = " ".join(f"{k} {v:.1f} dB" for k, v in report.get("psnr_db", {}).items())
        print(
            f"{key:<18} background {acc['background']:.1%} colour {acc['colour']:.1%} shape {acc['shape']:.1%} "
            f"size {acc['size']:.1%} all {acc['all']:.1%} {extra}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
