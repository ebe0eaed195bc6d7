"""Timing the stages of a generation: a clock that does not stall the GPU, and the per-stage seconds it yields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StageTimes:
    """Seconds per stage of one call; ``steps`` has one entry per denoising step."""

    text_encode: float = 0.0
    denoise: float = 0.0
    steps: list[float] = field(default_factory=list)
    vae_encode: float = 0.0
    vae_decode: float = 0.0
    total: float = 0.0

    @property
    def step_median(self) -> float:
        ordered = sorted(self.steps)
        return ordered[len(ordered) // 2] if ordered else 0.0


class StageClock:
    """Stage timer: CUDA events on a GPU (no sync until read), perf_counter on the CPU.

    ``mark()`` returns an opaque mark; ``seconds(a, b)`` is the time between two marks (it waits for ``b`` on
    a GPU, so read marks after the work they bracket has been queued, not inside a captured region).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A point in time on the device's stream (a recorded CUDA event, or a perf_counter reading)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, stop: Any) -> float:
        """Seconds from mark ``start`` to mark ``stop``."""
        if self.cuda:
            stop.synchronize()
            return float(start.elapsed_time(stop)) / 1000.0
        return float(stop - start)

    def sync(self) -> None:
        """Wait for the device, so that a host timer around it measures the device's work too."""
        if self.cuda:
            torch.cuda.synchronize()


__all__ = ["StageClock", "StageTimes"]
