"""One benchmark harness: the same weights, seed and sampler for every backend, side by side in one process.

Backends measured:
    diffusers          diffusers' StableDiffusionPipeline with SDPA attention (what users would otherwise run)
    diffusers-compile  the same with ``torch.compile(mode="max-autotune")`` on the UNet (CUDA only)
    torch              sdtrt's runtime on the PyTorch backend, eager
    torch-graph        the same with the whole denoising step replayed as one CUDA graph (CUDA only)
    onnxruntime        sdtrt's runtime on ONNX Runtime
    tensorrt           sdtrt's runtime on TensorRT engines (needs an engine folder: --artifacts)

Every backend is opened first, then the runs interleave: ``warmup`` untimed rounds, then ``runs`` timed rounds,
each round one run of every backend, round ``r`` starting at backend ``r mod n`` (A B C, B C A, C A B, ...), so
a slow start, a neighbour's load or thermal drift falls on every backend alike instead of on whichever ran
first. ``sequential=True`` keeps the old block order (all of A's runs, then B's, one backend open at a time) for
models too big to hold twice.

With step caching asked for (``cache_intervals``), every sdtrt backend also runs cached at each interval, on the
same open pipeline: each (backend, interval) is a variant of its own in the rotation (A, A N=3, B, B N=3, ...),
with rows and a table line of its own. Each row carries its ``cache_interval`` (1 uncached, and always for the
diffusers baselines), and cached rows the median time of their full and of their shallow steps.

Each timed run is a JSON row with its round and position, per-stage times, memory and ``other_s``: end-to-end
wall time minus the three timed stages (text encode, denoising steps, VAE decode), i.e. the set-up before the
first step (request checks, schedule, starting noise), checking the decoded pixels for NaN and turning them into
images. The four add up to the end-to-end time.

Memory per run: the peak during that run (CUDA allocator peak, or sampled process RSS on a CPU), what was held when
it started, and their difference; per backend, what opening it added. With several backends open the peak is the
whole process's (``peak_memory_scope`` says which): on a CPU the RSS includes every open backend's weights, so the
per-run delta and the opening cost are the per-backend figures. Both are lower bounds on a CPU, where memory the
process freed earlier (the export's, another backend's run) is reused without growing the RSS.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from sdtrt.benchmarks.config import CUDA_ONLY, BenchConfig
from sdtrt.runtime.cache_plan import check_cache_supported, full_steps
from sdtrt.runtime.control.inputs import check_controls
from sdtrt.runtime.environment import driver_version, gather_environment
from sdtrt.runtime.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


class PeakMemory:
    """Peak memory while a block of work runs: CUDA allocator peak on a GPU, sampled process RSS on the CPU.

    ``start`` is what was held on entry; ``peak - start`` is what the block added at its peak. Both are
    process-wide: memory other open backends hold is in them (and in ``peak``), so it cancels in the difference.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def held(device: torch.device) -> int:
        """Memory held now: bytes allocated on the CUDA device, or this process's RSS."""
        if device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.memory_allocated(device))
        return PeakMemory.rss()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = self.peak = int(torch.cuda.memory_allocated())
        else:
            self.start = self.peak = self.rss()

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
    """The machine of a benchmark row: date, platform, CPU, library versions, and on CUDA the GPU and driver."""
    env = gather_environment(("diffusers", "onnxruntime", "tensorrt"))
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": env.platform,
        "cpu": env.cpu,
        "cpus": env.cpus,
        "torch": env.torch,
        "diffusers": env.version("diffusers"),
        "onnxruntime": env.version("onnxruntime"),
        "tensorrt": env.version("tensorrt"),
        "sdtrt": env.sdtrt,
    }
    if device.type == "cuda":
        gpu = env.gpus[device.index if device.index is not None else torch.cuda.current_device()]
        info.update(
            gpu=gpu.name,
            compute_capability=gpu.compute_capability,
            cuda=env.torch_cuda,
            gpu_memory_gib=round(gpu.memory_gib, 1),
            driver=driver_version(),
        )
    return info


class BenchRunner(Protocol):
    """What the harness drives: ``run(seed)`` returns one run's stage times (the keys ``make_row`` reads).

    Cached variants call ``run(seed, cache_interval=N, cache_schedule=S)``; only sdtrt's runners are asked that.
    """

    precision: str

    def run(self, seed: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Variant:
    """One line of the table: a backend run uncached (``cache_interval`` 1) or with step caching."""

    backend: str
    cache_interval: int = 1
    cache_schedule: str = "uniform"

    @property
    def label(self) -> str:
        """The backend's name, with ``N=<interval>`` (and a non-uniform schedule's name) when cached."""
        if self.cache_interval == 1:
            return self.backend
        schedule = "" if self.cache_schedule == "uniform" else f" {self.cache_schedule}"
        return f"{self.backend} N={self.cache_interval}{schedule}"

    def run(self, runner: BenchRunner, seed: int) -> dict[str, Any]:
        """One run of ``runner`` as this variant asks."""
        if self.cache_interval == 1:
            return runner.run(seed)
        cached: Any = runner  # sdtrt's runners take the cache settings (``runners.SdtrtRunner.run``)
        return cached.run(seed, cache_interval=self.cache_interval, cache_schedule=self.cache_schedule)


def variants(config: BenchConfig) -> list[Variant]:
    """What one round runs, in order: each backend uncached, then (sdtrt's) cached at each interval."""
    found = []
    for backend in config.backends:
        found.append(Variant(backend))
        if backend in config.sdtrt_backends:
            found += [Variant(backend, n, config.cache_schedule) for n in config.cached]
    return found


# (backend, config, device, artifact folder or None) -> a context manager holding that backend's runner
OpenRunner = Callable[[str, BenchConfig, torch.device, "Path | None"], AbstractContextManager[BenchRunner]]


@dataclass(frozen=True)
class RunPlace:
    """Where a timed run sat: its round, its position within the round, and the order mode."""

    round: int
    position: int
    order: str  # "interleaved" or "sequential"


@dataclass(frozen=True)
class RunMemory:
    """One run's memory figures (bytes); ``scope`` is "process" when other backends were open during it."""

    peak: int
    start: int
    loaded: int  # what opening this backend added (allocator bytes on CUDA, RSS on a CPU)
    scope: str


def round_order(backends: Sequence[T], r: int) -> list[T]:
    """The order of round ``r``: the backends (or variants) rotated to start at the ``r mod n``-th."""
    k = r % len(backends)
    return [*backends[k:], *backends[:k]]


def run_benchmark(
    config: BenchConfig,
    progress: Callable[[str], None] | None = None,
    open_runner: OpenRunner | None = None,
) -> list[dict[str, Any]]:
    """Measure every backend of ``config``; one JSON-ready row per timed run, in the order the runs ran.

    ``open_runner(backend, config, device, folder)`` opens one backend's runner: a context manager whose value
    has ``precision`` and ``run(seed)``. The default is ``runners.make_runner``, after every sdtrt backend's
    artifact folder is exported (untimed). An injected one is given ``folder=None`` and nothing is exported:
    tests use it to record the order of the runs.
    """
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
        check_controls(config.controls, manifest.controlnets, manifest.model.control_ready)
        for interval in config.cached:
            check_cache_supported(interval, manifest.components, f"--artifacts {config.artifacts}")
    env = environment(device)
    with tempfile.TemporaryDirectory(prefix="sdtrt-bench-") as scratch:
        folders: dict[str, Path] = {}
        if open_runner is None:
            from sdtrt.benchmarks.runners import make_runner, prepare_folder

            open_runner = make_runner
            # artifacts first: the diffusers baseline converts the shared modules in place (dtype, device)
            for backend in config.backends:
                if not backend.startswith("diffusers"):
                    say(f"{backend}: preparing artifacts")
                    folders[backend] = prepare_folder(backend, config, Path(scratch))
        opener = open_runner

        def open_one(backend: str) -> AbstractContextManager[BenchRunner]:
            return opener(backend, config, device, folders.get(backend))

        session = RunSession(config, device, open_one, env, say)
        return _run_in_blocks(session) if config.sequential else _run_interleaved(session)


@dataclass(frozen=True)
class RunSession:
    """What both run orders share: the config, the device, how to open a backend, the environment, the log."""

    config: BenchConfig
    device: torch.device
    open_one: Callable[[str], AbstractContextManager[BenchRunner]]
    env: dict[str, Any]
    say: Callable[[str], None]

    def open(self, stack: contextlib.ExitStack, backend: str) -> tuple[BenchRunner, int]:
        """Open ``backend`` on ``stack``; its runner and the memory opening it added."""
        self.say(f"{backend}: loading")
        before = PeakMemory.held(self.device)
        runner = stack.enter_context(self.open_one(backend))
        return runner, max(0, PeakMemory.held(self.device) - before)

    def timed_row(
        self, variant: Variant, runner: BenchRunner, place: RunPlace, loaded: int, scope: str
    ) -> dict[str, Any]:
        """One timed run of ``variant`` on ``runner`` with its peak memory, as a row."""
        with PeakMemory(self.device) as memory:
            stages = variant.run(runner, self.config.seed)
        usage = RunMemory(memory.peak, memory.start, loaded, scope)
        return make_row(self.config, variant, runner.precision, place, stages, usage, self.env)


def _run_interleaved(session: RunSession) -> list[dict[str, Any]]:
    """Open every backend, then warm-up rounds and timed rounds, each round's variants in ``round_order``."""
    config, say = session.config, session.say
    rows: list[dict[str, Any]] = []
    scope = "process" if len(config.backends) > 1 else "backend"
    kinds = variants(config)
    with contextlib.ExitStack() as stack:
        opened = {backend: session.open(stack, backend) for backend in config.backends}
        for k in range(config.warmup):
            for variant in round_order(kinds, k):
                say(f"warm-up {k + 1}/{config.warmup}: {variant.label}")
                variant.run(opened[variant.backend][0], config.seed)
        for r in range(config.runs):
            for position, variant in enumerate(round_order(kinds, r)):
                say(f"round {r + 1}/{config.runs}: {variant.label}")
                runner, loaded = opened[variant.backend]
                rows.append(session.timed_row(variant, runner, RunPlace(r, position, "interleaved"), loaded, scope))
    return rows


def _run_in_blocks(session: RunSession) -> list[dict[str, Any]]:
    """One backend open at a time: its warm-up, then its timed runs, then the next backend (biased by order).

    A backend's variants (uncached, cached) interleave within its block, rotated each round."""
    config, say = session.config, session.say
    rows: list[dict[str, Any]] = []
    kinds = variants(config)
    for backend in config.backends:
        mine = [v for v in kinds if v.backend == backend]
        with contextlib.ExitStack() as stack:
            runner, loaded = session.open(stack, backend)
            for k in range(config.warmup):
                for variant in round_order(mine, k):
                    say(f"{variant.label}: warm-up {k + 1}/{config.warmup}")
                    variant.run(runner, config.seed)
            for k in range(config.runs):
                for variant in round_order(mine, k):
                    say(f"{variant.label}: run {k + 1}/{config.runs}")
                    place = RunPlace(k, kinds.index(variant), "sequential")
                    rows.append(session.timed_row(variant, runner, place, loaded, "backend"))
    return rows


def make_row(
    config: BenchConfig,
    variant: Variant,
    precision: str,
    place: RunPlace,
    stages: dict[str, Any],
    memory: RunMemory,
    env: dict[str, Any],
) -> dict[str, Any]:
    """One timed run as a JSON row; its text encode, denoise, VAE decode and other time add up to end-to-end."""
    steps = stages["steps"]
    ordered = sorted(steps)
    step_median = ordered[len(ordered) // 2] if ordered else 0.0
    timed = stages["text_encode"] + stages["denoise"] + stages["vae_decode"]
    total = stages["total"]
    return {
        "backend": variant.backend,
        "label": variant.label,
        "cache_interval": variant.cache_interval,
        "cache_schedule": variant.cache_schedule if variant.cache_interval > 1 else None,
        **cache_steps(config, variant, steps),
        "run": place.round,
        "round": place.round,
        "position": place.position,
        "order": place.order,
        "precision": precision,
        "text_encode_s": stages["text_encode"],
        "denoise_s": stages["denoise"],
        "step_median_s": step_median,
        "vae_decode_s": stages["vae_decode"],
        "end_to_end_s": total,
        "images_per_s": config.batch / total,
        "it_per_s": len(steps) / stages["denoise"] if stages["denoise"] > 0 else 0.0,
        # the stages are timed inside the end-to-end span, so this is >= 0 but for rounding
        "other_s": max(0.0, total - timed),
        # process-wide peak during this run; with scope "process" it includes every open backend
        "peak_memory_bytes": memory.peak,
        "memory_at_start_bytes": memory.start,
        "peak_added_bytes": max(0, memory.peak - memory.start),  # what this run added at its peak
        "loaded_bytes": memory.loaded,
        "peak_memory_kind": "cuda_max_allocated" if env.get("gpu") else "process_rss",
        "peak_memory_scope": memory.scope,
        "config": config.record(),
        "env": env,
    }


def cache_steps(config: BenchConfig, variant: Variant, steps: Sequence[float]) -> dict[str, Any]:
    """How many steps ran the full UNet and, for a cached run, the median time of its full and shallow steps."""
    plan = full_steps(config.steps, 0, variant.cache_interval, variant.cache_schedule)
    found: dict[str, Any] = {"full_steps": sum(plan)}
    if variant.cache_interval > 1 and len(steps) == len(plan):
        full = [t for t, is_full in zip(steps, plan, strict=True) if is_full]
        shallow = [t for t, is_full in zip(steps, plan, strict=True) if not is_full]
        found["full_step_median_s"] = sorted(full)[len(full) // 2] if full else None
        found["shallow_step_median_s"] = sorted(shallow)[len(shallow) // 2] if shallow else None
    return found
