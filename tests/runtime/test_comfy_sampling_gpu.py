"""ComfyUI sampling on CUDA (torch backend): each step captured as one CUDA graph and replayed, with a noise mask,
a ControlNet-free ancestral sampler and step caching. Marked ``gpu``: skipped without a CUDA GPU. The captured step
runs the very function the eager step runs, so the latents agree within 1e-4 of their largest magnitude."""

from __future__ import annotations

import pytest
import torch

from sdtrt.runtime.pipeline import Pipeline


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_captured_steps_match_eager(tiny_fp32, sampler):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(64, 64)
    mask[:, 24:] = 1.0
    results = {}
    for graph in (False, True):
        with Pipeline.from_artifacts(tiny_fp32, backend="torch", device="cuda", cuda_graph=graph) as pipe:
            positive, negative = pipe.encode_conditioning("a cat"), pipe.encode_conditioning("")
            sigmas = pipe.ksampler_sigmas("karras", 6, denoise=0.7)
            args = {"sampler": sampler, "sigmas": sigmas, "cfg": 6.0, "seed": 4, "noise_mask": mask}
            first = pipe.sample_latents(latents, positive, negative, **args)
            again = pipe.sample_latents(latents, positive, negative, **args)  # replays the capture
            cached = pipe.sample_latents(latents, positive, negative, **args, cache_interval=2)
            (denoiser, cached_denoiser) = pipe._denoisers.values()
            assert bool(denoiser.graphs) is graph and sorted(cached_denoiser.graphs) == (
                ["full", "shallow"] if graph else []
            )
            results[graph] = (first, again, cached)
    for eager, captured in zip(results[False], results[True], strict=True):
        err = float((eager - captured).abs().max()) / float(eager.abs().max())
        assert err < 1e-4, err
    assert torch.equal(results[True][0], results[True][1])
