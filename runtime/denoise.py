"""The denoising step: one function over static buffers, run eagerly or replayed as one CUDA graph.

Per step: scale the latents for the sampler, duplicate them for classifier-free guidance, one UNet call at batch
2B (uncond and cond text vectors concatenated once, before the loop), guidance, sampler update. Nothing in the
step syncs, allocates outside the graph pool, logs or branches on tensor values, so ``torch.cuda.graph`` can
capture it whole. The eager path runs the very same function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .engine import Engine
from .schedulers import Schedule, Scheduler, at_step

log = logging.getLogger(__name__)


@dataclass
class StepBuffers:
    """Static tensors the step reads and writes; a captured graph holds their addresses."""

    latents: torch.Tensor  # [B, C, h, w] float32, updated in place each step
    state: torch.Tensor  # sampler state (previous denoised for multistep samplers), same shape
    index: torch.Tensor  # 0-dim int64: the step being run
    text: torch.Tensor  # [2B or B, L, D] in the UNet's dtype: uncond rows first
    guidance: torch.Tensor  # 0-dim float32
    # Further UNet inputs, one row per text row (SDXL: text_embeds [rows, P] and time_ids [rows, 6])
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def denoise_step(
    unet: Engine, scheduler: Scheduler, schedule: Schedule, buffers: StepBuffers, guided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step; returns (new latents, new state) without writing the buffers."""
    latents, i = buffers.latents, buffers.index
    model_in = latents * at_step(schedule.input_scale, i)
    if guided:
        model_in = torch.cat([model_in, model_in])
    sample_dtype = buffers.text.dtype
    timestep = at_step(schedule.timesteps, i).expand(model_in.shape[0]).to(torch.float32)
    feeds = {"sample": model_in.to(sample_dtype), "timestep": timestep, "encoder_hidden_states": buffers.text}
    out = unet.infer({**feeds, **buffers.extra})["noise_pred"].float()
    if guided:
        uncond, cond = out.chunk(2)
        out = uncond + buffers.guidance * (cond - uncond)
    return scheduler.step(schedule, i, out, latents, buffers.state)


class Denoiser:
    """Runs ``denoise_step`` in place on ``buffers``: eagerly, or as a CUDA graph captured on first use."""

    def __init__(
        self,
        unet: Engine,
        scheduler: Scheduler,
        schedule: Schedule,
        buffers: StepBuffers,
        guided: bool,
        use_graph: bool,
    ) -> None:
        self.unet, self.scheduler, self.schedule = unet, scheduler, schedule
        self.buffers, self.guided = buffers, guided
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _eager(self) -> None:
        latents, state = denoise_step(self.unet, self.scheduler, self.schedule, self.buffers, self.guided)
        self.buffers.latents.copy_(latents)
        self.buffers.state.copy_(state)

    def _capture(self) -> None:
        """Warm up once on a side stream (deferred shape work, kernel selection), then capture one step.

        The warm-up writes the buffers, so they are saved before and restored after.
        """
        saved = (self.buffers.latents.clone(), self.buffers.state.clone(), self.buffers.index.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._eager()
        for buffer, value in zip((self.buffers.latents, self.buffers.state, self.buffers.index), saved, strict=True):
            buffer.copy_(value)
        self.graph = graph
        log.debug("captured the denoising step as a CUDA graph")

    def step(self, i: int) -> None:
        """Run step ``i``; the result is in ``buffers.latents``."""
        self.buffers.index.fill_(i)
        if not self.use_graph:
            self._eager()
            return
        if self.graph is None:
            self._capture()
        assert self.graph is not None
        self.graph.replay()
