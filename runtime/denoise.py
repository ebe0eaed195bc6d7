"""The denoising step: one function over static buffers, run eagerly or replayed as one CUDA graph.

Per step: scale the latents for the sampler, duplicate them for classifier-free guidance, each active ControlNet
on the same inputs (its hint and per-step scales are static buffers too) and the sum of their scaled residuals,
one UNet call at batch 2B (uncond and cond text vectors concatenated once, before the loop), guidance, sampler
update, and when inpainting the blend with the init image's latents (``InpaintBlend``). Nothing in the step syncs,
allocates outside the graph pool, logs or branches on tensor values, so ``torch.cuda.graph`` can capture it whole.
The eager path runs the very same function. ``DenoiserCache`` keeps a denoiser (its buffers and captured graph) per
shape between calls, so a graph is captured once and replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch

from sdtrt.runtime.engine import Engine
from sdtrt.runtime.schedulers import Schedule, Scheduler, StepIndex, at_step

log = logging.getLogger(__name__)


@dataclass
class ControlSlot:
    """One ControlNet active in a denoiser: its engine and the static tensors the step reads."""

    engine: Engine
    names: tuple[str, ...]  # its residual outputs, which are the UNet's residual inputs
    hint: torch.Tensor  # [rows, 3, H, W] in the ControlNet's dtype: every UNet row, or the conditional ones
    scales: torch.Tensor  # [steps, residuals] float32: scale x keep(step) (x guess mode's ramp)
    guess: bool  # run on the conditional rows only; the unconditional rows get no residuals


@dataclass
class StepCache:
    """Step caching in a denoiser: the shallow UNet, the static plan and the buffers the two steps share.

    A full step runs the whole UNet and writes its feature (and, with ControlNets, the residuals of the skip
    connections the shallow UNet recomputes) into these buffers; a shallow step reads them. ControlNets do not run
    on shallow steps: their influence on the deep part is in the cached feature, and the shallow UNet's skip
    connections get the residuals of the last full step.
    """

    shallow: Engine
    plan: tuple[bool, ...]  # per step index: True runs the full UNet
    feature: torch.Tensor  # [rows, C, h/k, w/k] in the UNet's dtype
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # the shallow UNet's residual inputs
    # the shallow UNet's input names (it takes no text context when no layer it runs has attention)
    inputs: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = frozenset(t.name for t in self.shallow.inputs)

    def full(self, i: int) -> bool:
        return self.plan[i]


@dataclass
class InpaintBlend:
    """A regular UNet's inpainting: after each step, the latents where ``keep`` is 1 become the init image's
    ``clean`` latents noised with ``noise`` to the level of the next step (``levels[i]``: its signal and noise
    scales; (1, 0) after the last step), as diffusers' StableDiffusionInpaintPipeline does for 4-channel UNets."""

    keep: torch.Tensor  # [B, 1, h, w] float32: 1 outside the latent mask
    clean: torch.Tensor  # [B, C, h, w] float32
    noise: torch.Tensor  # [B, C, h, w] float32: the noise the starting latents were noised with
    levels: torch.Tensor  # [steps, 2] float32

    @classmethod
    def allocate(cls, shape: tuple[int, ...], schedule: Schedule) -> InpaintBlend:
        """Zeroed buffers for latents of ``shape``, with the levels of ``schedule``."""
        device = schedule.device
        last = torch.tensor([1.0], device=device), torch.tensor([0.0], device=device)
        signal = torch.cat([schedule.signal_scale[1:], last[0]])
        noise = torch.cat([schedule.noise_scale[1:], last[1]])
        zeros = torch.zeros(shape, device=device)
        keep = torch.zeros((shape[0], 1, *shape[2:]), device=device)
        return cls(keep, zeros, zeros.clone(), torch.stack([signal, noise], dim=1).float())

    def apply(self, latents: torch.Tensor, i: StepIndex) -> torch.Tensor:
        """Step ``i``'s result with the kept region put back (graph-safe: ``i`` may be a device tensor)."""
        level = at_step(self.levels, i)
        original = level[0] * self.clean + level[1] * self.noise
        return self.keep * original + (1.0 - self.keep) * latents


@dataclass
class X0Inpaint:
    """ComfyUI's noise mask (its KSamplerX0Inpaint): where ``mask`` is 0 the model sees the init latents ``clean``
    noised with ``noise`` to the step's sigma, and its denoised prediction there is replaced by ``clean``. The
    model output is then rewritten as the output that gives this denoised prediction from the sampler's own
    latents, so every sampler's step runs unchanged."""

    mask: torch.Tensor  # [B, C, h, w] float32: 1 where the latents are denoised, 0 where they are kept
    clean: torch.Tensor  # [B, C, h, w] float32: the init latents (scaled, as the UNet sees them)
    noise: torch.Tensor  # [B, C, h, w] float32
    levels: torch.Tensor  # [steps, 3] float32: sigma, and (a, b) of denoised = a * x + b * model_output

    def model_input(self, latents: torch.Tensor, i: StepIndex) -> torch.Tensor:
        sigma = at_step(self.levels, i)[0]
        return latents * self.mask + (self.clean + self.noise * sigma) * (1.0 - self.mask)

    def model_output(self, out: torch.Tensor, latents: torch.Tensor, x_in: torch.Tensor, i: StepIndex) -> torch.Tensor:
        level = at_step(self.levels, i)
        denoised = level[1] * x_in + level[2] * out
        denoised = denoised * self.mask + self.clean * (1.0 - self.mask)
        return (denoised - level[1] * latents) / level[2]


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
    # A control-ready UNet's residual inputs when no ControlNet runs: zeros, allocated once
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    # Inpainting (``runtime.inpaint``): a regular UNet's blend of each step with the init image's latents, or an
    # inpainting UNet's extra input channels [rows, 1 + C, h, w] (mask, masked-image latents), float32
    blend: InpaintBlend | None = None
    condition: torch.Tensor | None = None
    x0_inpaint: X0Inpaint | None = None  # ComfyUI's noise mask (``runtime.sampling``)

    @classmethod
    def allocate(
        cls,
        shape: tuple[int, ...],
        text_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        extra_widths: Mapping[str, int] | None = None,
    ) -> StepBuffers:
        """Zeroed buffers for latents of ``shape`` and text rows of ``text_shape`` in the UNet's ``dtype``;
        ``extra_widths`` names further per-row UNet inputs and their widths (SDXL's text_embeds, time_ids)."""
        rows = text_shape[0]
        extra = {name: torch.zeros((rows, w), dtype=dtype, device=device) for name, w in (extra_widths or {}).items()}
        return cls(
            latents=torch.zeros(shape, device=device),
            state=torch.zeros(shape, device=device),
            index=torch.zeros((), dtype=torch.int64, device=device),
            text=torch.zeros(text_shape, dtype=dtype, device=device),
            guidance=torch.zeros((), device=device),
            extra=extra,
        )


def zero_residuals(unet: Engine, rows: int, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeros for each ControlNet residual input of ``unet`` (none for a plain UNet), for latents of h x w."""
    zeros = {}
    for tensor in unet.inputs:
        if tensor.name.startswith("control_"):
            channels, factor = int(tensor.shape[1]), _downscale(tensor.shape[2])
            dtype = torch.float16 if tensor.dtype == "float16" else torch.float32
            zeros[tensor.name] = torch.zeros(
                (rows, channels, height // factor, width // factor), dtype=dtype, device=device
            )
    return zeros


def step_cache(
    engines: Mapping[str, Engine], plan: tuple[bool, ...], buffers: StepBuffers, controls: list[ControlSlot]
) -> StepCache:
    """The cache state of a denoiser running ``plan`` over ``buffers``: a feature buffer as the full UNet gives
    it, and the shallow UNet's residual inputs (zeros; with ``controls``, filled by each full step)."""
    unet, shallow = engines["unet"], engines["unet_shallow"]
    rows, _, height, width = buffers.text.shape[0], *buffers.latents.shape[1:]
    device, dtype = buffers.latents.device, buffers.text.dtype
    (spec,) = [t for t in unet.outputs if t.name == "cache_feature"]
    factor = _downscale(spec.shape[2])
    feature = torch.zeros((rows, int(spec.shape[1]), height // factor, width // factor), dtype=dtype, device=device)
    zeros = zero_residuals(shallow, rows, height, width, device)
    residuals = {name: buffers.residuals.get(name, zero) if not controls else zero for name, zero in zeros.items()}
    return StepCache(shallow, plan, feature, residuals)


def _downscale(dim: str | int) -> int:
    """The k of a residual's ``latent_height/k`` dimension (1 for ``latent_height``)."""
    _, _, factor = str(dim).partition("/")
    return int(factor) if factor else 1


def control_residuals(
    controls: list[ControlSlot], feeds: dict[str, torch.Tensor], i: torch.Tensor, guided: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The summed, scaled residuals of every ControlNet for this step, in the UNet's ``dtype``."""
    total: dict[str, torch.Tensor] = {}
    for slot in controls:
        half = slot.guess and guided
        inputs = {name: value.chunk(2)[1] for name, value in feeds.items()} if half else feeds
        out = slot.engine.infer({**inputs, "controlnet_cond": slot.hint})
        scales = at_step(slot.scales, i)
        for k, name in enumerate(slot.names):
            residual = out[name] * scales[k].to(out[name].dtype)
            if half:
                residual = torch.cat([torch.zeros_like(residual), residual])
            residual = residual.to(dtype)
            total[name] = residual if name not in total else total[name] + residual
    return total


def denoise_step(
    unet: Engine,
    scheduler: Scheduler,
    schedule: Schedule,
    buffers: StepBuffers,
    guided: bool,
    controls: list[ControlSlot] | None = None,
    cache: StepCache | None = None,
    shallow: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step; returns (new latents, new state) without writing the latents or state buffers.

    With ``controls``, each ControlNet runs on the step's UNet inputs (or their conditional half, in guess mode)
    and the UNet gets the sum of their scaled residuals; without, a control-ready UNet gets zeros. With ``cache``
    a full step also keeps the feature (and residuals) in its buffers, and ``shallow`` runs the shallow UNet on
    them instead of the full one.
    """
    latents, i = buffers.latents, buffers.index
    x_in = latents if buffers.x0_inpaint is None else buffers.x0_inpaint.model_input(latents, i)
    model_in = x_in * at_step(schedule.input_scale, i)
    if guided:
        model_in = torch.cat([model_in, model_in])
    sample_dtype = buffers.text.dtype
    timestep = at_step(schedule.timesteps, i).expand(model_in.shape[0]).to(torch.float32)
    feeds = {"sample": model_in.to(sample_dtype), "timestep": timestep, "encoder_hidden_states": buffers.text}
    feeds.update(buffers.extra)
    unet_sample = feeds["sample"]  # an inpainting UNet also sees the mask and the masked image; ControlNets do not
    if buffers.condition is not None:
        unet_sample = torch.cat([model_in, buffers.condition], dim=1).to(sample_dtype)
    if cache is not None and shallow:
        shallow_feeds = {**feeds, "sample": unet_sample, **cache.residuals, "cache_feature": cache.feature}
        out = cache.shallow.infer({k: v for k, v in shallow_feeds.items() if k in cache.inputs})["noise_pred"].float()
    else:
        residuals = control_residuals(controls, feeds, i, guided, sample_dtype) if controls else buffers.residuals
        outputs = unet.infer({**feeds, "sample": unet_sample, **residuals})
        if cache is not None:
            cache.feature.copy_(outputs["cache_feature"])
            if controls:
                for name, kept in cache.residuals.items():
                    kept.copy_(residuals[name])
        out = outputs["noise_pred"].float()
    if guided:
        uncond, cond = out.chunk(2)
        out = uncond + buffers.guidance * (cond - uncond)
    if buffers.x0_inpaint is not None:
        out = buffers.x0_inpaint.model_output(out, latents, x_in, i)
    new, state = scheduler.step(schedule, i, out, latents, buffers.state)
    if buffers.blend is not None:
        new = buffers.blend.apply(new, i)
    return new, state


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
        controls: list[ControlSlot] | None = None,
        cache: StepCache | None = None,
    ) -> None:
        self.unet, self.scheduler, self.schedule = unet, scheduler, schedule
        self.buffers, self.guided = buffers, guided
        self.use_graph = use_graph
        self.controls = controls or []
        self.cache = cache
        # one captured graph per kind of step: "full" (the whole UNet) and, with step caching, "shallow"
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The full step's captured graph, once captured."""
        return self.graphs.get("full")

    def _eager(self, shallow: bool = False) -> None:
        latents, state = denoise_step(
            self.unet, self.scheduler, self.schedule, self.buffers, self.guided, self.controls, self.cache, shallow
        )
        self.buffers.latents.copy_(latents)
        self.buffers.state.copy_(state)

    def _capture(self, shallow: bool) -> torch.cuda.CUDAGraph:
        """Warm up once on a side stream (deferred shape work, kernel selection), then capture one step.

        The warm-up writes the buffers, so they are saved before and restored after (a full step's warm-up
        rewrites the cache buffers with what its replay writes again).
        """
        saved = (self.buffers.latents.clone(), self.buffers.state.clone(), self.buffers.index.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager(shallow)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._eager(shallow)
        for buffer, value in zip((self.buffers.latents, self.buffers.state, self.buffers.index), saved, strict=True):
            buffer.copy_(value)
        log.debug("captured the %s denoising step as a CUDA graph", "shallow" if shallow else "full")
        return graph

    def step(self, i: int) -> None:
        """Run step ``i`` (full or shallow, as the cache plan says); the result is in ``buffers.latents``."""
        shallow = self.cache is not None and not self.cache.full(i)
        self.buffers.index.fill_(i)
        if not self.use_graph:
            self._eager(shallow)
            return
        kind = "shallow" if shallow else "full"
        if kind not in self.graphs:
            self.graphs[kind] = self._capture(shallow)
        self.graphs[kind].replay()


class DenoiserCache:
    """Denoisers kept between calls, by a key of everything their buffers and schedule depend on.

    A cached denoiser holds the UNet engine it was made with (and maybe a graph captured over it), so the cache
    must be cleared whenever an engine is replaced or its weights change. Holds at most ``capacity``, oldest
    dropped first.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: dict[Hashable, Denoiser] = {}

    def get(self, key: Hashable, noise: torch.Tensor | None = None) -> Denoiser | None:
        """The denoiser stored under ``key`` (its schedule's per-step noise refreshed to ``noise``), or None."""
        denoiser = self._entries.get(key)
        if denoiser is not None and noise is not None and denoiser.schedule.noise is not None:
            denoiser.schedule.noise.copy_(noise.to(denoiser.schedule.noise.device))
        return denoiser

    def put(self, key: Hashable, denoiser: Denoiser) -> None:
        if len(self._entries) >= self.capacity:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = denoiser

    def clear(self) -> None:
        self._entries.clear()

    def values(self) -> list[Denoiser]:
        """The denoisers held, oldest first."""
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
