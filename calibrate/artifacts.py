"""``sdtrt calibrate``: capture calibration data, quantize the UNet, and write a new artifact folder."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdtrt.runtime.deps import version_of
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.files import sha256_file, staging_dir
from sdtrt.runtime.manifest import MANIFEST_NAME, ComponentEntry, Manifest, read_manifest, resolve_file
from sdtrt.runtime.verify import verified_model_file, verify_files

from .capture import (
    CalibrationData,
    CaptureConfig,
    capture_calibration_data,
    check_unet_artifact,
    load_prompts,
    prompt_source,
)
from .quantize import Progress, QuantizeConfig, QuantizeResult, load_onnx, quantize_unet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrateRequest:
    """Everything ``calibrate_artifacts`` needs besides the folders: what to record and how to quantize."""

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prompts_file: str | None = None  # None: the prompt set that ships with sdtrt (calibrate/data/prompts.txt)
    backend: str = "onnxruntime"
    device: str | None = None
    save_data: str | None = None  # also write the captured calibration data (.npz) here


def calibrate_artifacts(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    request: CalibrateRequest,
    data: CalibrationData | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Write a copy of the artifact ``folder`` to ``out`` with its UNet quantized to int8 or fp8.

    Calibration data is captured from real trajectories unless ``data`` is given. The new folder appears under
    its final name only once complete. Its manifest marks the UNet precision and records, under ``extra``, the
    calibration settings, the data hash, the quantized and excluded nodes and the quantizer. Prompts, sampler,
    guidance and size are ``request``'s: a model with its own (the demo ``shapes`` model) supplies them, e.g.
    ``sdtrt.shapes.report.calibration_config(request)``, as ``sdtrt calibrate`` does.
    """
    source_dir, out_dir = Path(folder), Path(out)
    check_unet_artifact(source_dir)
    manifest = read_manifest(source_dir)
    _check_output(source_dir, out_dir)
    verify_files(source_dir, manifest)
    prompts = load_prompts(request.prompts_file)
    if data is None:
        data = capture_calibration_data(
            source_dir,
            request.capture,
            prompts,
            backend=request.backend,
            device=request.device,
            progress=(lambda done, total: progress("capturing", done, total)) if progress else None,
        )
    if request.save_data:
        data.save(request.save_data)
    source = manifest.components["unet"]
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if request.device == "cuda" else ["CPUExecutionProvider"]
    )
    unet_path = verified_model_file(source_dir, source)  # sha256 and external-data locations checked
    result = quantize_unet(unet_path, data, request.quantize, providers, progress)
    with staging_dir(out_dir) as stage:
        for name in _files_to_copy(manifest):
            shutil.copyfile(resolve_file(source_dir, name), stage / name)
        entry = _write_unet(stage, source, result)
        entry = replace(entry, extra=_extra(source_dir, source, request, data, result))
        new = replace(
            manifest,
            components={**manifest.components, "unet": entry},
            versions={**manifest.versions, "sdtrt": version_of("sdtrt"), "onnxruntime": version_of("onnxruntime")},
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        new.write(stage)
    return new


def _check_output(source: Path, out: Path) -> None:
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"--out {str(out)!r} is the input artifact itself; give a new folder for the quantized one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} is a file; give a folder path for the quantized artifact")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ConfigError(
            f"output folder {str(out)!r} is not empty and is not an sdtrt artifact; refusing to replace it. "
            "Choose a new or empty folder"
        )


def _files_to_copy(manifest: Manifest) -> list[str]:
    names = [manifest.tokenizer, manifest.scheduler] + ([manifest.tokenizer_2] if manifest.tokenizer_2 else [])
    for name, entry in manifest.components.items():
        if name != "unet":
            names += [entry.file] + ([entry.data_file] if entry.data_file else [])
    return names


def _write_unet(stage: Path, source: ComponentEntry, result: QuantizeResult) -> ComponentEntry:
    """Save the quantized graph, check it with onnx's checker and describe it."""
    onnx = load_onnx()
    from sdtrt.export.graph import save_model

    path, data_file = save_model(result.model, stage / "unet.onnx")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:  # a bug here, not a user error: keep the cause
        raise RuntimeError(f"the quantized UNet graph is not valid ONNX: {exc}") from exc
    opset = max((e.version for e in result.model.opset_import if e.domain in ("", "ai.onnx")), default=source.opset)
    return ComponentEntry(
        file=path.name,
        sha256=sha256_file(path),
        precision=result.settings["precision"],
        inputs=source.inputs,
        outputs=source.outputs,
        shapes=source.shapes,
        opset=opset,
        data_file=data_file.name if data_file else None,
        data_sha256=sha256_file(data_file) if data_file else None,
    )


def _extra(
    source_dir: Path, source: ComponentEntry, request: CalibrateRequest, data: CalibrationData, result: QuantizeResult
) -> dict[str, Any]:
    settings = data.settings
    return {
        "calibration": {
            "prompts_source": prompt_source(request.prompts_file),
            "prompts": data.prompts,
            "samples": len(data.prompts),
            "steps": len(data.steps),
            "recorded_steps": data.steps,
            "trajectory_steps": settings.get("trajectory_steps"),
            "size": f"{settings.get('width')}x{settings.get('height')}",
            "guidance_scale": settings.get("guidance_scale"),
            "scheduler": settings.get("scheduler"),
            "seed": settings.get("seed"),
            "backend": settings.get("backend"),
            "data_sha256": data.sha256,
        },
        "quantization": {
            **result.settings,
            "quantized_nodes": len(result.quantized),
            "excluded_nodes": result.excluded,
            "unquantized_dtype": result.float_dtype,
        },
        "source": {"artifact": str(source_dir.resolve()), "precision": source.precision, "unet_sha256": source.sha256},
    }
