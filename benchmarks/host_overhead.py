"""Host overhead of the denoising loop: what one step costs when the UNet costs nothing.

    python -m sdtrt.benchmarks.host_overhead --steps 15000 --json benchmarks/results/host_overhead_cpu.json

The UNet is a null engine: ``infer`` hands its ``sample`` feed back as ``noise_pred`` without computing or
copying, so a step is what sdtrt's ``Denoiser`` does around the UNet call: input scaling, the CFG duplicate and
the guidance combination, the sampler update, the buffer writes, and the Python and kernel-launch cost of each
op (eager) or one graph replay (CUDA graph). Paths: ``cpu`` (eager), and where a GPU is present ``cuda``
(eager) and ``cuda-graph`` (the whole step replayed as one CUDA graph); every sampler, with and without guidance.

Steps run in blocks of one whole schedule (``--schedule-steps``), latents reset between blocks. Blocks
interleave: round ``r`` runs every (sampler, guidance) case once, each on every path, the paths rotated to start
at ``r mod n``. A step's time is ``perf_counter`` around the call on the CPU; on CUDA it is the time between
CUDA events recorded around each step with no sync inside a block: with a UNet that costs nothing this is the
steady-state time per step, whichever of host and GPU bounds it. ``host_us`` is how long the Python call took to
return (on CUDA: to enqueue the step).

Step caching (``--cache-interval N``): every case also runs with a null shallow UNet beside the null UNet, the
step chosen per step on the host from the static plan (two step functions; on ``cuda-graph`` two captured graphs,
replayed alternately), interleaved with the same case's one step function. The full step also copies the cached
feature (SD 1.5's at skip branch 0: 320 channels at latent size) into its buffer, as a real full step does. Its rows
give the median of the full and of the shallow steps apart; against the uncached row this is what switching costs
on the host when the UNets themselves cost nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from sdtrt.runtime.cache_plan import check_cache_args, full_steps
from sdtrt.runtime.denoise import Denoiser, StepBuffers, StepCache
from sdtrt.runtime.engine import WeightUpdate
from sdtrt.runtime.errors import BackendError, ConfigError, SdtrtError
from sdtrt.runtime.manifest import TensorEntry
from sdtrt.runtime.schedulers import SCHEDULER_NAMES, SchedulerConfig, get_scheduler, initial_state

from .harness import environment, round_order
from .report import percentile

PATHS = ("cpu", "cuda", "cuda-graph")
GUIDANCE = 7.5
TEXT_SHAPE = (77, 768)  # SD 1.5's; the null UNet never reads the text, so the width does not matter
# SD 1.5's training noise schedule (SDXL's is the same); only the coefficients' values depend on it
SD_SCHEDULE = SchedulerConfig(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    timestep_spacing="leading",
)
# SD 1.5's cached feature at skip branch 0 (runtime.models.step_cache.cache_split): channels, latent downscale
FEATURE = (320, 1)


class NullUNet:
    """An ``Engine`` that returns its ``sample`` feed as ``noise_pred``: no compute, no copy, nothing captured.

    With ``feature`` (a tensor made once) it is a step-cache UNet that also gives that tensor as ``cache_feature``;
    ``name="unet_shallow"`` makes the shallow one, which takes a ``cache_feature`` input and ignores it.
    """

    def __init__(self, device: torch.device, feature: torch.Tensor | None = None, name: str = "unet") -> None:
        self.device, self.feature, self.name = device, feature, name
        self.graph_capturable = device.type == "cuda"
        latent = ("2B", 4, "H/8", "W/8")
        self.inputs = (
            TensorEntry("sample", "float32", latent),
            TensorEntry("timestep", "float32", ("2B",)),
            TensorEntry("encoder_hidden_states", "float32", ("2B", *TEXT_SHAPE)),
        )
        if name == "unet_shallow":
            self.inputs += (TensorEntry("cache_feature", "float32", ("2B", FEATURE[0], "H/8", "W/8")),)
        self.outputs = (TensorEntry("noise_pred", "float32", latent),)

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``sample`` feed itself (the caller's tensor, not a copy), and the fixed feature when it has one."""
        if self.feature is None:
            return {"noise_pred": feeds["sample"]}
        return {"noise_pred": feeds["sample"], "cache_feature": self.feature}

    def update_weights(self, update: WeightUpdate) -> None:
        """There are no weights to change."""
        raise BackendError("the null UNet has no weights to change")

    def close(self) -> None:
        pass

    def __enter__(self) -> NullUNet:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class HostConfig:
    paths: tuple[str, ...] = ("cpu",)
    samplers: tuple[str, ...] = SCHEDULER_NAMES
    steps: int = 600  # timed steps per (path, sampler, guidance), rounded up to whole schedules
    schedule_steps: int = 30  # steps in one loop (one block)
    warmup: int = 1  # untimed blocks per case (a CUDA graph is captured in the first)
    height: int = 512
    width: int = 512
    batch: int = 1
    seed: int = 0
    cache_interval: int = 1  # > 1: every case also runs with step caching, a full step every N
    cache_schedule: str = "uniform"

    def __post_init__(self) -> None:
        check_cache_args(self.cache_interval, self.cache_schedule)
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown or not self.paths:
            raise ConfigError(f"unknown path(s) {unknown or '(none)'}; choose from {', '.join(PATHS)}")
        if any(p.startswith("cuda") for p in self.paths) and not torch.cuda.is_available():
            raise ConfigError(f"paths {', '.join(self.paths)} need a CUDA GPU and none is visible; use --paths cpu")
        bad = [s for s in self.samplers if s not in SCHEDULER_NAMES]
        if bad or not self.samplers:
            raise ConfigError(f"unknown sampler(s) {bad or '(none)'}; choose from {', '.join(SCHEDULER_NAMES)}")
        if self.steps < 1 or self.schedule_steps < 1 or self.warmup < 0 or self.batch < 1:
            raise ConfigError(
                f"steps, schedule_steps and batch must be >= 1 and warmup >= 0, got steps={self.steps} "
                f"schedule_steps={self.schedule_steps} warmup={self.warmup} batch={self.batch}"
            )
        if self.height % 8 or self.width % 8 or self.height < 8 or self.width < 8:
            raise ConfigError(f"height and width must be positive multiples of 8, got {self.height}x{self.width}")

    @property
    def blocks(self) -> int:
        return math.ceil(self.steps / self.schedule_steps)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 4, self.height // 8, self.width // 8)

    @property
    def intervals(self) -> tuple[int, ...]:
        """The cache intervals each case runs at: 1 (one step function), and the cached one when asked."""
        return (1,) if self.cache_interval == 1 else (1, self.cache_interval)

    @property
    def plan(self) -> tuple[bool, ...]:
        """Which steps of a schedule run the full UNet at ``cache_interval``."""
        return full_steps(self.schedule_steps, 0, self.cache_interval, self.cache_schedule)


@dataclass
class Case:
    """One (path, sampler, guidance, cache interval) loop: its denoiser over static buffers and the latents each
    block starts from."""

    path: str
    sampler: str
    guided: bool
    denoiser: Denoiser
    initial: torch.Tensor
    cache_interval: int = 1

    def reset(self) -> None:
        self.denoiser.buffers.latents.copy_(self.initial)
        self.denoiser.buffers.state.zero_()


def make_case(path: str, sampler_name: str, guided: bool, config: HostConfig, cache_interval: int = 1) -> Case:
    """A ``Denoiser`` on the null UNet, with starting latents and sampler noise drawn from ``config.seed``;
    with ``cache_interval`` > 1 also the null shallow UNet, the step chosen per step from ``config.plan``."""
    device = torch.device("cpu" if path == "cpu" else "cuda")
    sampler = get_scheduler(sampler_name)
    shape = config.latent_shape
    generator = torch.Generator().manual_seed(config.seed)
    start = torch.randn(shape, generator=generator)
    noise = sampler.draw_noise(config.schedule_steps, shape, generator)
    schedule = sampler.make_schedule(SD_SCHEDULE, config.schedule_steps, device, noise=noise)
    initial = (start * schedule.init_noise_sigma).to(device)
    rows = 2 * config.batch if guided else config.batch
    buffers = StepBuffers(
        latents=initial.clone(),
        state=initial_state(initial),
        index=torch.zeros((), dtype=torch.int64, device=device),
        text=torch.zeros((rows, *TEXT_SHAPE), device=device),
        guidance=torch.full((), GUIDANCE, device=device),
    )
    unet, cache = NullUNet(device), None
    if cache_interval > 1:
        feature = (rows, FEATURE[0], shape[2] // FEATURE[1], shape[3] // FEATURE[1])
        unet = NullUNet(device, feature=torch.zeros(feature, device=device))
        shallow = NullUNet(device, name="unet_shallow")
        cache = StepCache(shallow, config.plan, torch.zeros(feature, device=device))
    use_graph = path == "cuda-graph"
    denoiser = Denoiser(unet, sampler, schedule, buffers, guided, use_graph=use_graph, cache=cache)
    return Case(path, sampler_name, guided, denoiser, initial, cache_interval)


def run_block(case: Case) -> tuple[list[float], list[float]]:
    """Reset the latents and run one whole schedule; (seconds per step, host seconds per call)."""
    case.reset()
    steps = case.denoiser.schedule.steps
    host: list[float] = []
    if case.initial.device.type != "cuda":
        marks = [time.perf_counter()]
        for i in range(steps):
            case.denoiser.step(i)
            marks.append(time.perf_counter())
        per_step = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return per_step, per_step
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for i in range(steps):
        t0 = time.perf_counter()
        case.denoiser.step(i)
        events[i + 1].record()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    per_step = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:], strict=False)]
    return per_step, host


Key = tuple[str, str, bool, int]  # path, sampler, guided, cache interval


def measure(config: HostConfig, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (path, sampler, guidance, cache interval): microseconds per step, median and p90, blocks
    interleaved (each round the (path, interval) loops of a case rotate)."""
    say = progress or (lambda message: None)
    groups = [(sampler, guided) for sampler in config.samplers for guided in (False, True)]
    loops = [(p, n) for p in config.paths for n in config.intervals]
    cases = {(p, s, g, n): make_case(p, s, g, config, n) for s, g in groups for p, n in loops}
    times: dict[Key, tuple[list[float], list[float]]] = {key: ([], []) for key in cases}
    for k in range(config.warmup):
        for s, g in groups:
            for p, n in round_order(loops, k):
                run_block(cases[(p, s, g, n)])
    for r in range(config.blocks):
        say(f"round {r + 1}/{config.blocks}")
        for s, g in groups:
            for p, n in round_order(loops, r):
                per_step, host = run_block(cases[(p, s, g, n)])
                times[(p, s, g, n)][0].extend(per_step)
                times[(p, s, g, n)][1].extend(host)
    return [_row(config, key, *times[key]) for key in cases]


def _row(config: HostConfig, key: Key, per_step: list[float], host: list[float]) -> dict[str, Any]:
    path, sampler, guided, interval = key
    row = {
        "path": path,
        "sampler": sampler,
        "guided": guided,
        "cache_interval": interval,
        "steps_timed": len(per_step),
        "us_median": 1e6 * percentile(per_step, 0.5),
        "us_p90": 1e6 * percentile(per_step, 0.9),
        "host_us_median": 1e6 * percentile(host, 0.5),
        "timer": "cuda_events" if path.startswith("cuda") else "perf_counter",
        "latent_shape": list(config.latent_shape),
    }
    if interval > 1:  # blocks are whole schedules, so step k of every block is step k % schedule_steps
        plan = config.plan
        for kind, full in (("full", True), ("shallow", False)):
            mine = [k for k in range(len(per_step)) if plan[k % len(plan)] == full]
            row[f"us_median_{kind}"] = 1e6 * percentile([per_step[k] for k in mine], 0.5)
            row[f"host_us_median_{kind}"] = 1e6 * percentile([host[k] for k in mine], 0.5)
        row["full_steps"] = sum(plan)
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table; with step caching, the full and the shallow steps' medians of each cached row."""
    cached = any(r.get("cache_interval", 1) > 1 for r in rows)
    head = f"{'path':<11} {'sampler':<16} {'cfg':<4} {'median':>10} {'p90':>10} {'host':>10} {'steps':>6}"
    if cached:
        head = f"{head} {'N':>3} {'full':>10} {'shallow':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['path']:<11} {r['sampler']:<16} {'yes' if r['guided'] else 'no':<4} {r['us_median']:>8.1f}us "
            f"{r['us_p90']:>8.1f}us {r['host_us_median']:>8.1f}us {r['steps_timed']:>6}"
        )
        if cached:
            n = r.get("cache_interval", 1)
            parts = [f"{r[f'us_median_{kind}']:>8.1f}us" if n > 1 else f"{'-':>10}" for kind in ("full", "shallow")]
            line = f"{line} {n:>3} {' '.join(parts)}"
        lines.append(line)
    return "\n".join(lines)


def switch_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per path, the step cost with one step function against two chosen per step (medians over the cases)."""
    lines = []
    for path in dict.fromkeys(r["path"] for r in rows):
        plain = [r for r in rows if r["path"] == path and r.get("cache_interval", 1) == 1]
        cached = [r for r in rows if r["path"] == path and r.get("cache_interval", 1) > 1]
        if not cached or not plain:
            continue

        def middle(found: Sequence[dict[str, Any]], key: str) -> float:
            return percentile([r[key] for r in found], 0.5)

        n = cached[0]["cache_interval"]
        lines.append(
            f"{path}: one step function {middle(plain, 'us_median'):.1f} us/step; two chosen per step (N={n}) "
            f"{middle(cached, 'us_median'):.1f} us/step: full {middle(cached, 'us_median_full'):.1f} us, shallow "
            f"{middle(cached, 'us_median_shallow'):.1f} us (medians over {len(cached)} sampler/CFG cases)"
        )
    return lines


def _parse(argv: Sequence[str] | None) -> tuple[HostConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_paths = "cpu,cuda,cuda-graph" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--paths", default=default_paths, help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--samplers", default=",".join(SCHEDULER_NAMES), help="comma-separated sampler names")
    parser.add_argument("--steps", type=int, default=600, help="timed steps per row (whole schedules)")
    parser.add_argument("--schedule-steps", type=int, default=30, help="steps in one loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed loops per row")
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT in pixels (latents are 1/8 of it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-interval", type=int, default=1, help="> 1: also run each case with step caching, a full step every N"
    )
    parser.add_argument("--cache-schedule", default="uniform", help="uniform or quadratic")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, e.g. 512x512, got {args.size!r}")
    config = HostConfig(
        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()),
        samplers=tuple(s.strip() for s in args.samplers.split(",") if s.strip()),
        steps=args.steps,
        schedule_steps=args.schedule_steps,
        warmup=args.warmup,
        height=height,
        width=width,
        batch=args.batch,
        seed=args.seed,
        cache_interval=args.cache_interval,
        cache_schedule=args.cache_schedule,
    )
    return config, args.json


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config, json_path = _parse(argv)
        device = torch.device("cuda" if any(p.startswith("cuda") for p in config.paths) else "cpu")
        started = time.perf_counter()
        rows = measure(config)
    except SdtrtError as error:
        raise SystemExit(f"error: {error}") from None
    env = environment(device) | {"threads": torch.get_num_threads()}
    wall = time.perf_counter() - started
    where = env.get("gpu") or f"{env['cpu']} ({env['cpus']} cpus, {env['threads']} threads)"
    print(f"denoising loop, null UNet, latents {'x'.join(map(str, config.latent_shape))}, {where}, {wall:.1f} s")
    print(format_table(rows))
    for line in switch_summary(rows):
        print(line)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "host_overhead", "config": asdict(config), "env": env, "wall_s": wall, "rows": rows}
        json_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
