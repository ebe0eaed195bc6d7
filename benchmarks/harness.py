"""One benchmark harness: the same weights, seed and sampler for every backend, side by side in one process.

Backends measured:
    diffusers          diffusers' StableDiffusionPipeline with SDPA attention (what users would otherwise run)
    diffusers-compile  the same with ``torch.compile(mode="max-autotune")`` on the UNet (CUDA only)
    torch              sdtrt's runtime on the PyTorch backend, eager
    torch-graph        the same with the whole denoising step replayed as one CUDA graph (CUDA only)
    onnxruntime        sdtrt's runtime on ONNX Runtime
    tensorrt           sdtrt's runtime on TensorRT engines (needs an engine folder: --artifacts)

Each backend: ``warmup`` untimed runs, then ``runs`` timed runs, each a JSON row with per-stage times, peak
memory and the loop overhead: end-to-end wall time minus the time of the stages' device work (text encoder,
denoising steps, VAE decode), i.e. what the host loop adds.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrt.runtime.deps import version_of
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.models.reference import DIFFUSERS_SCHEDULERS

log = logging.getLogger(__name__)

BACKENDS = ("diffusers", "diffusers-compile", "torch", "torch-graph", "onnxruntime", "tensorrt")
CUDA_ONLY = ("diffusers-compile", "torch-graph", "tensorrt")


@dataclass(frozen=True)
class BenchConfig:
    source: str
    backends: tuple[str, ...] = ("diffusers", "torch", "onnxruntime")
    height: int = 512
    width: int = 512
    steps: int = 30
    guidance: float = 7.5
    batch: int = 1
    precision: str = "fp16"
    runs: int = 10
    warmup: int = 3
    seed: int = 0
    scheduler: str = "euler_a"
    prompt: str = "a photo of an astronaut riding a horse on mars, detailed, sharp focus"
    device: str | None = None
    artifacts: str | None = None  # an existing artifact / engine folder for the sdtrt backends

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ConfigError(f"unknown backend(s) {unknown or '(none)'}; choose from {', '.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs} warmup={self.warmup}")
        if self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.scheduler not in DIFFUSERS_SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(DIFFUSERS_SCHEDULERS)}")
        if self.batch < 1 or self.steps < 1:
            raise ConfigError(f"batch and steps must be >= 1, got batch={self.batch} steps={self.steps}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


class PeakMemory:
    """Peak memory while a backend runs: CUDA allocator peak on a GPU, sampled process RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()

            def sample() -> None:
                while not self._stop.wait(0.01):
                    self.peak = max(self.peak, self.rss())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            if self._thread:
                self._thread.join()
            self.peak = max(self.peak, self.rss())


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": version_of("diffusers"),
        "onnxruntime": version_of("onnxruntime") or version_of("onnxruntime-gpu"),
        "tensorrt": version_of("tensorrt"),
        "sdtrt": version_of("sdtrt"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


Runner = Callable[[int], dict[str, Any]]  # seed -> stage times of one run


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every backend of ``config``; one JSON-ready row per timed run."""
    from .runners import make_runner, prepare_folder

    device = config.torch_device
    say = progress or (lambda message: log.info(message))
    for backend in config.backends:
        if backend in CUDA_ONLY and device.type != "cuda":
            raise ConfigError(f"backend {backend!r} needs a CUDA GPU; this run is on {device.type}")
    if config.artifacts:  # reject sizes the artifact cannot run before any work starts
        from sdtrt.runtime.manifest import read_manifest
        from sdtrt.runtime.specs import check_size

        manifest = read_manifest(config.artifacts)
        check_size(config.height, config.width, manifest.model)
        manifest.profile.check(config.height, config.width, config.batch)
    env = environment(device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdtrt-bench-") as scratch:
        # artifacts first: the diffusers baseline converts the shared modules in place (dtype, device)
        folders = {}
        for backend in config.backends:
            if not backend.startswith("diffusers"):
                say(f"{backend}: preparing artifacts")
                folders[backend] = prepare_folder(backend, config, Path(scratch))
        for backend in config.backends:
            say(f"{backend}: loading")
            with make_runner(backend, config, device, folders.get(backend)) as runner:
                for k in range(config.warmup):
                    say(f"{backend}: warm-up {k + 1}/{config.warmup}")
                    runner.run(config.seed)
                with PeakMemory(device) as memory:
                    timed = []
                    for k in range(config.runs):
                        say(f"{backend}: run {k + 1}/{config.runs}")
                        timed.append(runner.run(config.seed))
                for k, stages in enumerate(timed):
                    rows.append(make_row(config, backend, runner.precision, k, stages, memory.peak, env))
    return rows


def make_row(
    config: BenchConfig, backend: str, precision: str, run: int, stages: dict[str, Any], peak: int, env: dict[str, Any]
) -> dict[str, Any]:
    steps = stages["steps"]
    ordered = sorted(steps)
    step_median = ordered[len(ordered) // 2] if ordered else 0.0
    device_work = stages["text_encode"] + sum(steps) + stages["vae_decode"]
    total = stages["total"]
    return {
        "backend": backend,
        "run": run,
        "precision": precision,
        "text_encode_s": stages["text_encode"],
        "denoise_s": stages["denoise"],
        "step_median_s": step_median,
        "vae_decode_s": stages["vae_decode"],
        "end_to_end_s": total,
        "images_per_s": config.batch / total,
        "it_per_s": len(steps) / stages["denoise"] if stages["denoise"] > 0 else 0.0,
        "loop_overhead_s": max(0.0, total - device_work),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_max_allocated" if env.get("gpu") else "process_rss",
        "config": asdict(config),
        "env": env,
    }
