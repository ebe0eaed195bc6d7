"""Which denoising steps run the full UNet when step caching is on (the rest run the shallow one).

The plan is static: made on the host before the loop from the interval and schedule, so each step replays one of
two captured graphs and nothing on the device decides. The first and last step run are always full.

Schedules:
    uniform    a full step every ``interval`` steps, counted from the first step run (img2img starts later)
    quadratic  DeepCache's non-uniform schedule: as many full steps as ``uniform`` gives, spaced by a power law
               around a centre step (30 % of the way in, as the DeepCache paper's 15 of 50), so they are densest
               where the image changes most
"""

from __future__ import annotations

import math
from collections.abc import Collection

from sdtrt.runtime.errors import ArtifactError, ConfigError

CACHE_SCHEDULES = ("uniform", "quadratic")
CENTRE = 0.3  # of the steps run: DeepCache's centre step 15 of 50
POWER = 1.4  # DeepCache's starting exponent; lowered until the full steps are distinct


def check_cache_args(interval: object, schedule: object) -> None:
    """One-line ``ConfigError`` for an interval that is not an integer >= 1 or an unknown schedule."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(
            f"cache interval must be an integer >= 1 (1 runs every step in full: no caching), got {interval!r}"
        )
    if schedule not in CACHE_SCHEDULES:
        raise ConfigError(f"cache schedule must be one of {', '.join(CACHE_SCHEDULES)}, got {schedule!r}")


def check_cache_supported(interval: int, components: Collection[str], where: str = "this artifact") -> None:
    """``ArtifactError`` when caching is asked of an artifact without the shallow UNet."""
    if interval > 1 and "unet_shallow" not in components:
        raise ArtifactError(
            f"--cache-interval {interval} needs the shallow UNet, which {where} lacks; re-export the model with "
            "`sdtrt export MODEL --step-cache` (and rebuild engines), or use --cache-interval 1"
        )


def full_steps(steps: int, first: int, interval: int, schedule: str = "uniform") -> tuple[bool, ...]:
    """For every step index 0..steps-1, whether it runs the full UNet (steps before ``first`` are not run)."""
    check_cache_args(interval, schedule)
    run = steps - first
    if interval == 1 or run <= 2:
        chosen = set(range(run))
    elif schedule == "uniform":
        chosen = set(range(0, run, interval))
    else:
        chosen = set(_quadratic(run, math.ceil(run / interval)))
    chosen |= {0, run - 1}
    return tuple(i >= first and (i - first) in chosen for i in range(steps))


def _quadratic(run: int, count: int) -> list[int]:
    """``count`` distinct steps of 0..run-1 spaced as ``centre + sign(u) * |u| ** power`` for u evenly spaced,
    lowering the power (towards even spacing) until they are distinct, as DeepCache does."""
    centre = CENTRE * (run - 1)
    power = POWER
    while True:
        lo, hi = -(centre ** (1 / power)), (run - 1 - centre) ** (1 / power)
        points = [lo + (hi - lo) * j / (count - 1) for j in range(count)] if count > 1 else [0.0]
        steps = sorted({min(run - 1, max(0, round(centre + math.copysign(abs(u) ** power, u)))) for u in points})
        if len(steps) >= count or power <= 1.0:
            return steps
        power = max(1.0, power - 0.02)


def describe(plan: tuple[bool, ...], first: int = 0) -> str:
    """The plan as text: 'F' for a full step, '.' for a shallow one (from ``first``)."""
    return "".join("F" if full else "." for full in plan[first:])
