"""Step caching on CUDA (torch backend): the full and the shallow step each captured as one CUDA graph.

Marked ``gpu``: skipped without a CUDA GPU. The captured steps replay the very functions the eager steps run, so
the images agree to well above 60 dB PSNR; the cached image differs from the uncached one and stays close to it.
"""

from __future__ import annotations

import pytest

from sdtrt.runtime.cache_plan import full_steps
from sdtrt.runtime.compare import psnr
from sdtrt.runtime.pipeline import Pipeline

PROMPT, SIZE, STEPS = "a photo of a cat", 64, 9


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["uniform", "quadratic"])
def test_cuda_graphs_of_the_two_steps_match_eager(tiny_fp32, schedule):
    """cache_interval=3 with cuda_graph=True captures exactly two graphs, "full" and "shallow", replayed as the
    plan says, and gives the eager image (PSNR >= 60 dB); the cached image differs from the uncached one and stays
    close to it (PSNR >= 30 dB; about 40 dB on the CPU backends)."""
    assert 2 < sum(full_steps(STEPS, 0, 3, schedule)) < STEPS  # both kinds of step run
    args = {"steps": STEPS, "seed": 5, "height": SIZE, "width": SIZE, "cache_interval": 3, "cache_schedule": schedule}
    images = {}
    for graph in (False, True):
        with Pipeline.from_artifacts(tiny_fp32, backend="torch", device="cuda", cuda_graph=graph) as pipe:
            assert pipe.cuda_graph is graph
            first = pipe(PROMPT, **args).pixels
            again = pipe(PROMPT, **args).pixels  # replays the captures of the first call
            (denoiser,) = pipe._denoisers.values()
            assert sorted(denoiser.graphs) == (["full", "shallow"] if graph else [])
            images[graph] = (first, again)
            if graph:
                uncached = pipe(PROMPT, **{**args, "cache_interval": 1}).pixels
    for eager, captured in zip(images[False], images[True], strict=True):
        assert psnr(eager, captured) >= 60
    cached = images[True][0]
    assert 30 <= psnr(cached, uncached) < 60
