"""Calibration data from real denoising trajectories: the UNet inputs at chosen steps, for a set of prompts.

Quantization ranges must come from the activations the UNet sees in use, and those change along a trajectory
(almost pure noise at the first step, nearly clean latents at the last). So calibration runs the ordinary
pipeline (eager, any backend) once per prompt, with the UNet engine wrapped in a :class:`RecordingEngine` that
copies its feeds at ``steps`` steps spread evenly over a ``trajectory_steps``-step run. Each record holds the
whole guided batch (the unconditional row and the prompt's row). A trajectory stops right after its last
recorded step: nothing later is needed.

data = capture_calibration_data("out/tiny-fp32", CaptureConfig(samples=32, steps=4), load_prompts(None))
data.save("calibration.npz")   # one .npz: the three arrays plus a JSON index; ``data.sha256`` names the content
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.engine import Engine, WeightUpdate
from sdtrt.runtime.errors import ArtifactError, ConfigError
from sdtrt.runtime.files import sha256_file, write_bytes_atomic
from sdtrt.runtime.manifest import read_manifest

log = logging.getLogger(__name__)

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")  # every UNet's; SDXL adds text_embeds, time_ids
SDXL_INPUTS = ("text_embeds", "time_ids")
DEFAULT_PROMPTS = Path(__file__).parent / "data" / "prompts.txt"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEDULER = "euler_a"
Progress = Callable[[int, int], None]  # (trajectories done, trajectories in all)


@dataclass(frozen=True)
class CaptureConfig:
    """How calibration data is collected.

    samples: prompts, one trajectory each. steps: UNet calls recorded per trajectory, spread over its
    ``trajectory_steps`` steps. height/width: image size in pixels (None: the artifact's tuned size).
    """

    samples: int = 32
    steps: int = 4
    trajectory_steps: int = 20
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "steps", "trajectory_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.steps > self.trajectory_steps:
            raise ConfigError(
                f"cannot record {self.steps} steps of a {self.trajectory_steps}-step trajectory; "
                f"ask for at most {self.trajectory_steps} steps or make the trajectory longer"
            )
        if (self.height is None) != (self.width is None):
            raise ConfigError("give both height and width, or neither (the artifact's tuned size)")
        if not self.guidance_scale > 1.0:
            raise ConfigError(
                f"guidance_scale must be > 1 so the UNet sees both guided rows, got {self.guidance_scale}"
            )

    def recorded_steps(self) -> tuple[int, ...]:
        """Indices of the recorded steps: evenly spread from the first step to the last."""
        if self.steps == 1:
            return (0,)
        last = self.trajectory_steps - 1
        return tuple(round(k * last / (self.steps - 1)) for k in range(self.steps))


@dataclass
class CalibrationData:
    """UNet inputs as float32 arrays stacked on the batch axis, and what produced them.

    ``arrays[name]`` has ``records * rows`` entries on axis 0: record ``r`` (trajectory ``r // steps``, recorded
    step ``r % steps``) is rows ``r * rows`` to ``(r + 1) * rows``; ``rows`` is 2 (unconditional, prompt).
    """

    arrays: dict[str, np.ndarray]
    prompts: list[str]
    seeds: list[int]
    steps: list[int]
    rows: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return len(self.arrays["sample"]) // self.rows

    @property
    def sha256(self) -> str:
        """Hash of the array contents (names, dtypes, shapes, bytes) in a fixed order: stable across saves."""
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def batches(self) -> list[dict[str, np.ndarray]]:
        """One feed dict per record (the guided batch of one step of one trajectory)."""
        return [
            {name: array[r * self.rows : (r + 1) * self.rows] for name, array in self.arrays.items()}
            for r in range(self.records)
        ]

    def index(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "seeds": self.seeds,
            "steps": self.steps,
            "rows": self.rows,
            "settings": self.settings,
            "sha256": self.sha256,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.npz`` (the arrays plus the JSON index under ``index``) atomically; return its path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        contents: dict[str, Any] = {"index": np.array(json.dumps(self.index())), **self.arrays}
        np.savez(buffer, **contents)
        write_bytes_atomic(target, buffer.getvalue())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationData:
        """Read a file written by :meth:`save`; ArtifactError when it is not one, or its content changed."""
        source = Path(path)
        try:
            with np.load(source, allow_pickle=False) as npz:
                index = json.loads(str(npz["index"]))
                # then SDXL's inputs and a control-ready UNet's residuals (zeros: captured without ControlNets)
                extra = tuple(n for n in npz.files if n not in UNET_INPUTS and n != "index")
                names = UNET_INPUTS + extra
                arrays = {name: npz[name] for name in names}
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(
                f"{str(source)!r} is not sdtrt calibration data ({exc}); capture it again with capture_calibration_data"
            ) from exc
        data = cls(arrays, index["prompts"], index["seeds"], index["steps"], index["rows"], index["settings"])
        if data.sha256 != index["sha256"]:
            raise ArtifactError(f"{str(source)!r} does not match the hash in its index; capture it again")
        return data


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Prompts from ``path`` (one per line; blank lines and lines starting with '#' are skipped).

    ``None`` reads the prompt set that ships with sdtrt.
    """
    source = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompt file {str(source)!r} ({exc}); give a UTF-8 text file") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"the prompt file {str(source)!r} holds no prompts; write one prompt per line")
    return prompts


def pick_prompts(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts spread evenly over ``prompts`` (which are often grouped); repeats when there are fewer."""
    if count <= len(prompts):
        return [prompts[k * len(prompts) // count] for k in range(count)]
    log.info("only %d prompts for %d samples: prompts repeat, each with its own seed", len(prompts), count)
    return [prompts[k % len(prompts)] for k in range(count)]


class _TrajectoryDone(Exception):
    """Raised from the step callback once the last recorded step has run: the rest is not needed."""


class RecordingEngine:
    """Wraps a UNet engine and keeps a float32 CPU copy of the feeds of the calls whose index is recorded.

    The call index counts ``infer`` calls since the last :meth:`start`; with one call per step it is the step.
    """

    graph_capturable = False

    def __init__(self, inner: Engine, record: Sequence[int]) -> None:
        self.inner = inner
        self.name, self.inputs, self.outputs, self.device = inner.name, inner.inputs, inner.outputs, inner.device
        self.record = frozenset(record)
        self.calls = 0
        self.kept: list[dict[str, np.ndarray]] = []

    def start(self) -> None:
        self.calls = 0

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.calls in self.record:
            # clone: the caller reuses its buffers on the next step
            self.kept.append({n: feeds[n].detach().float().cpu().clone().numpy() for n in feeds})
        self.calls += 1
        return self.inner.infer(feeds)

    def update_weights(self, update: WeightUpdate) -> None:
        """Weight updates reach the wrapped engine."""
        self.inner.update_weights(update)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> RecordingEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def check_unet_artifact(folder: Path) -> None:
    """ArtifactError unless ``folder`` is an ONNX artifact with a float UNet and the parts a pipeline needs."""
    manifest = read_manifest(folder)
    if manifest.kind != "onnx":
        raise ArtifactError(
            f"{str(folder)!r} holds {manifest.kind} files, not ONNX; calibrate an artifact made by `sdtrt export`"
        )
    if "unet" not in manifest.components:
        raise ArtifactError(
            f"{str(folder)!r} has no unet component (it has {sorted(manifest.components)}); "
            "export one with --components text_encoder,unet,vae_decoder"
        )
    precision = manifest.components["unet"].precision
    if precision not in ("fp32", "fp16"):
        raise ArtifactError(
            f"the UNet in {str(folder)!r} is already {precision}; calibrate the fp32 or fp16 artifact it came from"
        )


def capture_calibration_data(
    folder: str | os.PathLike[str],
    config: CaptureConfig,
    prompts: Sequence[str],
    backend: str = "onnxruntime",
    device: str | None = None,
    progress: Progress | None = None,
) -> CalibrationData:
    """Run ``config.samples`` trajectories over the artifact in ``folder`` and record the UNet inputs."""
    from sdtrt.runtime.pipeline import Pipeline

    root = Path(folder)
    check_unet_artifact(root)
    if not prompts:
        raise ConfigError("the prompt list is empty; give at least one prompt")
    chosen = pick_prompts(prompts, config.samples)
    seeds = [config.seed + k for k in range(config.samples)]
    record = config.recorded_steps()
    last = max(record)
    with Pipeline.from_artifacts(root, backend=backend, device=device, cuda_graph=False) as pipe:
        recorder = pipe.wrap_engine("unet", lambda unet: RecordingEngine(unet, record))
        height = config.height or pipe.manifest.profile.opt_height
        width = config.width or pipe.manifest.profile.opt_width

        def stop_after_last(step: int, total: int, latents: torch.Tensor) -> None:
            if step >= last:
                raise _TrajectoryDone

        for k, (prompt, seed) in enumerate(zip(chosen, seeds, strict=True)):
            recorder.start()
            try:
                pipe(
                    prompt,
                    steps=config.trajectory_steps,
                    guidance_scale=config.guidance_scale,
                    seed=seed,
                    height=height,
                    width=width,
                    scheduler=config.scheduler,
                    callback=stop_after_last,
                )
            except _TrajectoryDone:
                pass
            if progress:
                progress(k + 1, config.samples)
    kept = recorder.kept
    assert len(kept) == config.samples * len(record), "one record per recorded step per trajectory"
    arrays = {name: np.concatenate([r[name] for r in kept]) for name in kept[0]}
    settings = asdict(config) | {"height": height, "width": width, "backend": backend, "artifact": str(root)}
    data = CalibrationData(arrays, chosen, seeds, list(record), rows=len(kept[0]["sample"]), settings=settings)
    log.info("captured %d UNet calls (%d rows), data sha256 %s", data.records, len(arrays["sample"]), data.sha256)
    return data


def prompt_source(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """Where the prompts came from: the file and its sha256 (the built-in set when ``path`` is None).

    A prompt file that ships with sdtrt (in a ``data`` folder of one of its packages) is named ``sdtrt:PATH``,
    the same on every machine.
    """
    source = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        inside = source.resolve().relative_to(PACKAGE_ROOT)
    except ValueError:
        inside = None
    shipped = inside is not None and len(inside.parts) == 3 and inside.parts[1] == "data"
    return {"file": f"sdtrt:{inside.as_posix()}" if shipped else str(source), "sha256": sha256_file(source)}
