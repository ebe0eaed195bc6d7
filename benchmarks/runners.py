"""Benchmark runners: one per backend, each a context manager with ``run(seed) -> stage times``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdtrt.benchmarks.config import BenchConfig
from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.profile import ShapeProfile
from sdtrt.runtime.specs import controlnet_component, required_components
from sdtrt.runtime.timing import StageClock

_BUNDLES: dict[str, Any] = {}


def load_bundle(source: str) -> Any:
    """The source model, loaded once per process (every backend measures the same weights)."""
    if source not in _BUNDLES:
        from sdtrt.runtime.models.sources import load_source

        _BUNDLES[source] = load_source(source)
    return _BUNDLES[source]


def prepare_folder(backend: str, config: BenchConfig, scratch: Path) -> Path:
    """The artifact folder an sdtrt backend runs: the given one, or one made now (not timed)."""
    if config.artifacts:
        return Path(config.artifacts)
    if backend == "tensorrt":
        raise ConfigError("the tensorrt backend needs an engine folder: build one with `sdtrt build`, pass --artifacts")
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts, write_source_artifact

    bundle = load_bundle(config.source)
    profile = ShapeProfile.static(config.height, config.width, config.batch)
    # caching needs the shallow UNet; without it the export is what a plain export gives
    cache = {"step_cache": True} if config.cached else {}
    if backend.startswith("torch"):
        folder = scratch / "source"
        if not folder.exists():
            write_source_artifact(bundle, folder, profile, **cache)
        return folder
    folder = scratch / f"onnx-{config.run_precision}"
    if not folder.exists():
        options = ExportOptions(
            profile=profile, precision=config.run_precision, components=required_components(bundle.model), **cache
        )
        export_artifacts(bundle, folder, options)
    return folder


class SdtrtRunner:
    """sdtrt's pipeline on one backend; ``precision`` is what it runs (the artifact's, for exported graphs)."""

    def __init__(self, backend: str, config: BenchConfig, device: torch.device, folder: Path) -> None:
        from sdtrt.runtime.engine import BackendOptions
        from sdtrt.runtime.pipeline import Pipeline

        self.config = config
        name = "torch" if backend.startswith("torch") else backend
        # the PyTorch backend casts on CUDA only; on a CPU it runs fp32 whatever is asked
        torch_precision = config.run_precision if device.type == "cuda" else "fp32"
        options = BackendOptions(precision=torch_precision if name == "torch" else "auto")
        self.pipe = Pipeline.from_artifacts(
            folder,
            backend=name,
            device=device,
            options=options,
            cuda_graph=backend == "torch-graph",
            # what text-to-image needs (both text encoders for SDXL), no VAE encoder; the ControlNets asked for,
            # and the shallow UNet when the cached variants run
            components=tuple(controlnet_component(c.name) for c in config.controls)
            + (("unet_shallow",) if config.cached else ()),
        )
        if backend == "torch-graph" and not self.pipe.cuda_graph:
            raise ConfigError("torch-graph needs CUDA graph capture, which this device/backend does not allow")
        # exported graphs run in the precision they were exported in (an --artifacts folder may differ from asked)
        self.precision = torch_precision if name == "torch" else self.pipe.manifest.precision

    def run(self, seed: int, cache_interval: int = 1, cache_schedule: str = "uniform") -> dict[str, Any]:
        """One generation; ``cache_interval`` > 1 runs it with step caching (``cache_schedule``)."""
        c = self.config
        result = self.pipe(
            c.prompt,
            negative_prompt="",  # as the diffusers runner: an encoded empty prompt (SDXL would otherwise zero it)
            steps=c.steps,
            guidance_scale=c.guidance,
            seed=seed,
            height=c.height,
            width=c.width,
            scheduler=c.scheduler,
            num_images=c.batch,
            controls=c.controls,
            cache_interval=cache_interval,
            cache_schedule=cache_schedule,
        )
        t = result.times
        return {
            "text_encode": t.text_encode,
            "denoise": t.denoise,
            "steps": list(t.steps),
            "vae_decode": t.vae_decode,
            "total": t.total,
        }

    def close(self) -> None:
        self.pipe.close()


class DiffusersRunner:
    """diffusers' StableDiffusionPipeline on the same modules; stage times from hooks that only record events."""

    def __init__(self, config: BenchConfig, device: torch.device, compile_unet: bool) -> None:
        import diffusers

        self.config, self.device = config, device
        bundle = load_bundle(config.source)
        dtype = torch.float16 if device.type == "cuda" and config.run_precision == "fp16" else torch.float32
        self.precision = "fp16" if dtype == torch.float16 else "fp32"
        pipe = diffusers_pipeline(bundle, config.scheduler)
        pipe = pipe.to(device, dtype)
        pipe.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
        pipe.set_progress_bar_config(disable=True)
        if compile_unet:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        self.pipe = pipe
        self.clock = StageClock(device)
        self.marks: dict[str, Any] = {}
        encode, prepare, decode = pipe.encode_prompt, pipe.prepare_latents, pipe.vae.decode

        def timed_encode(*args: Any, **kw: Any) -> Any:
            self.marks["text0"] = self.clock.mark()
            out = encode(*args, **kw)
            self.marks["text1"] = self.clock.mark()
            return out

        def timed_prepare(*args: Any, **kw: Any) -> Any:
            out = prepare(*args, **kw)
            self.marks["latents"] = self.clock.mark()  # steps start here, after set-up, as sdtrt's do
            return out

        def timed_decode(*args: Any, **kw: Any) -> Any:
            self.marks["vae0"] = self.clock.mark()
            out = decode(*args, **kw)
            self.marks["vae1"] = self.clock.mark()
            return out

        pipe.encode_prompt = timed_encode
        pipe.prepare_latents = timed_prepare
        pipe.vae.decode = timed_decode

    def run(self, seed: int) -> dict[str, Any]:
        c = self.config
        self.marks = {"steps": []}

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            self.marks["steps"].append(self.clock.mark())
            return {}

        generator = [torch.Generator().manual_seed(seed + k) for k in range(c.batch)]
        self.clock.sync()
        start = time.perf_counter()
        with torch.no_grad():
            self.pipe(
                c.prompt,
                negative_prompt="",
                num_inference_steps=c.steps,
                guidance_scale=c.guidance,
                height=c.height,
                width=c.width,
                generator=generator,
                num_images_per_prompt=c.batch,
                callback_on_step_end=on_step,
                output_type="pil",
            )
        self.clock.sync()
        total = time.perf_counter() - start
        m = self.marks
        step_marks = [m["latents"], *m["steps"]]
        steps = [self.clock.seconds(a, b) for a, b in zip(step_marks, step_marks[1:], strict=False)]
        return {
            "text_encode": self.clock.seconds(m["text0"], m["text1"]),
            "denoise": sum(steps),
            "steps": steps,
            "vae_decode": self.clock.seconds(m["vae0"], m["vae1"]),
            "total": total,
        }

    def close(self) -> None:
        del self.pipe
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def make_runner(backend: str, config: BenchConfig, device: torch.device, folder: Path | None) -> Iterator[Any]:
    runner: Any
    if backend in ("diffusers", "diffusers-compile"):
        runner = DiffusersRunner(config, device, compile_unet=backend == "diffusers-compile")
    else:
        assert folder is not None
        runner = SdtrtRunner(backend, config, device, folder)
    try:
        yield runner
    finally:
        runner.close()
