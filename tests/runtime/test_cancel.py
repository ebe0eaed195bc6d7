"""Cancellation between denoising steps: the step count, the images returned, and the UNet calls it saves."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sdtrt.runtime.images import to_pil
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.progress import Cancel

ARGS = {"prompt": "a lighthouse at dusk", "steps": 10, "height": 64, "width": 64, "seed": 3, "scheduler": "euler"}


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        yield pipe


class CountingUnet:
    """Counts UNet calls, so a test sees that no step ran after the cancel (not just that callbacks stopped)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0
        self.inputs, self.outputs, self.graph_capturable = engine.inputs, engine.outputs, False

    def infer(self, feeds):
        self.calls += 1
        return self.engine.infer(feeds)

    def close(self) -> None:
        self.engine.close()


@pytest.mark.parametrize("k", [0, 3, 8])
def test_cancel_after_step_k_runs_k_plus_one_steps(pipe, k):
    event, steps, kept = threading.Event(), [], {}

    def callback(step, total, latents):
        steps.append(step)
        if step == k:
            kept["latents"] = latents.clone()
            event.set()

    assert isinstance(event, Cancel)
    result = pipe(**ARGS, num_images=2, callback=callback, cancel=event)
    assert steps == list(range(k + 1))
    assert result.interrupted
    assert len(result.times.steps) == k + 1
    assert len(result.images) == 2 and result.seeds == [3, 4]
    # the images are the latents of the last step run, decoded (what A1111 returns for an interrupted job)
    expected = to_pil(pipe.decode_latents(kept["latents"]).float().clamp(-1, 1))
    for got, want in zip(result.images, expected, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_cancel_never_set_changes_nothing(pipe):
    plain = pipe(**ARGS)
    watched = pipe(**ARGS, cancel=threading.Event())
    assert not plain.interrupted and not watched.interrupted
    assert len(watched.times.steps) == ARGS["steps"]
    assert torch.equal(plain.pixels, watched.pixels)


def test_cancel_set_before_the_call_runs_no_step(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime", device="cpu") as pipe:
        unet = pipe.wrap_engine("unet", CountingUnet)
        event = threading.Event()
        event.set()
        result = pipe(**ARGS, callback=lambda *_: pytest.fail("no step may run"), cancel=event)
        assert unet.calls == 0 and result.interrupted and len(result.images) == 1
        later = threading.Event()
        pipe(**ARGS, callback=lambda step, *_: later.set() if step == 4 else None, cancel=later)
        assert unet.calls == 5  # one batched CFG call per step, none after the cancel


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
@pytest.mark.parametrize("at", [(0, 2), (1, 2)], ids=["first-pass", "second-pass"])
def test_cancel_stops_a_hires_fix_in_either_pass(pipe, upscaler, at):
    """Cancelled in the first pass, no second pass runs (its image, at the first size, is returned); in the
    second, that pass stops and the image has the second size."""
    from sdtrt.runtime.hires import HiresFix, run_hires

    event, seen = threading.Event(), []  # seen: per pass, the steps run (img2img's count from its first step)
    stop_pass, stop_step = at

    def callback(step, total, latents):
        if not seen or latents.shape[-1] != seen[-1][0]:
            seen.append([latents.shape[-1], 0])
        seen[-1][1] += 1
        if len(seen) - 1 == stop_pass and seen[-1][1] == stop_step + 1:
            event.set()

    hires = HiresFix(scale=2.0, upscaler=upscaler, steps=4, denoising_strength=0.5)
    args = {k: v for k, v in ARGS.items() if k != "prompt"}
    result = run_hires(pipe, ARGS["prompt"], hires, callback=callback, cancel=event, **args)
    assert result.interrupted
    assert len(seen) == stop_pass + 1  # no pass began after the cancel
    assert result.images[0].size == ((64, 64) if stop_pass == 0 else (128, 128))
    assert [count for _, count in seen] == [ARGS["steps"]] * stop_pass + [stop_step + 1]
    assert len(result.times.steps) == sum(count for _, count in seen)  # the result's times cover both passes
