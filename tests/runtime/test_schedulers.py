"""Runtime samplers against the diffusers schedulers of the same name, and the hot loop's contracts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from torch.utils._python_dispatch import TorchDispatchMode

from sdtrt.runtime.errors import ArtifactError, SdtrtError, ShapeError
from sdtrt.runtime.schedulers import (
    A1111_LABELS,
    SCHEDULER_NAMES,
    SchedulerConfig,
    add_noise,
    get_scheduler,
    initial_state,
    start_index,
)
from sdtrt.runtime.schedulers.base import at_step

SD15 = json.loads(
    (Path(__file__).resolve().parents[2] / "runtime/models/configs/sd15/scheduler/scheduler_config.json").read_text()
)
VARIANTS: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "linear_trailing": {
        **SD15,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "set_alpha_to_one": True,
    },
    "linspace_clipped": {**SD15, "timestep_spacing": "linspace", "steps_offset": 0, "clip_sample": True},
}
CASES = [(10, "sd15"), (25, "sd15"), (10, "linear_trailing"), (25, "linspace_clipped")]
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-5

REFERENCE = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCMScheduler, {}),
}


def stand_in_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Deterministic, nonlinear in x and dependent on t, so every coefficient shows in the result."""
    return 0.8 * x + 0.1 * torch.sin(3.0 * x) + t / 1000.0


def config_for(variant: str, prediction_type: str) -> dict[str, Any]:
    return {**VARIANTS[variant], "prediction_type": prediction_type}


def reference_scheduler(name: str, config: dict[str, Any], steps: int) -> Any:
    cls, options = REFERENCE[name]
    scheduler = cls.from_config(config, **options)
    scheduler.set_timesteps(steps)
    return scheduler


def run_reference(name: str, config: dict[str, Any], steps: int, seed: int, start: int = 0) -> torch.Tensor:
    """diffusers' txt2img loop (start=0) or img2img loop (noised clean latents, begin index ``start``)."""
    scheduler = reference_scheduler(name, config, steps)
    generator = torch.Generator().manual_seed(seed)
    if start == 0:
        latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    else:
        clean, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        latents = scheduler.add_noise(clean, noise, scheduler.timesteps[start : start + 1])
    for t in scheduler.timesteps[start:]:
        model_in = scheduler.scale_model_input(latents, t)
        output = stand_in_model(model_in, float(t))
        latents = scheduler.step(output, t, latents, generator=generator).prev_sample
    return latents


def run_runtime(name: str, config: dict[str, Any], steps: int, seed: int, start: int = 0) -> torch.Tensor:
    scheduler = get_scheduler(name)
    generator = torch.Generator().manual_seed(seed)
    if start == 0:
        latents = torch.randn(SHAPE, generator=generator)
    else:
        clean, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    step_noise = scheduler.draw_noise(steps, SHAPE, generator, start=start)
    schedule = scheduler.make_schedule(SchedulerConfig.from_dict(config), steps, "cpu", noise=step_noise, start=start)
    if start == 0:
        latents = latents * schedule.init_noise_sigma
    else:
        latents = add_noise(schedule, start, clean, noise)
    state = initial_state(latents)
    for i in range(start, steps):
        output = stand_in_model(latents * schedule.input_scale[i], float(schedule.timesteps[i]))
        latents, state = scheduler.step(schedule, i, output, latents, state)
    return latents


def predictions(name: str) -> list[str]:
    # diffusers' ancestral Euler has no x0 ("sample") prediction to compare with.
    return ["epsilon", "v_prediction"] + ([] if name == "euler_a" else ["sample"])


LOOP_PARAMS = [
    pytest.param(name, prediction, steps, variant, id=f"{name}-{prediction}-{steps}-{variant}")
    for name in SCHEDULER_NAMES
    for prediction in predictions(name)
    for steps, variant in CASES
]


@pytest.mark.parametrize(("name", "prediction", "steps", "variant"), LOOP_PARAMS)
def test_full_loop_matches_diffusers(name: str, prediction: str, steps: int, variant: str) -> None:
    config = config_for(variant, prediction)
    reference = reference_scheduler(name, config, steps)
    schedule = get_scheduler(name).make_schedule(
        SchedulerConfig.from_dict(config),
        steps,
        "cpu",
        noise=get_scheduler(name).draw_noise(steps, SHAPE, torch.Generator().manual_seed(0)),
    )
    assert torch.equal(schedule.timesteps, reference.timesteps.to(torch.float32))

    expected = run_reference(name, config, steps, seed=steps)
    found = run_runtime(name, config, steps, seed=steps)
    assert found.shape == expected.shape and found.dtype == torch.float32
    assert torch.isfinite(expected).all()
    error = (found - expected).abs().max().item()
    assert error <= TOLERANCE, f"{name} {prediction} {steps} steps {variant}: max abs diff {error:.3g}"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_prediction_type_changes_the_result(name: str) -> None:
    """Guards the comparison above against a sampler that ignores the config."""
    epsilon = run_runtime(name, config_for("sd15", "epsilon"), 10, seed=1)
    velocity = run_runtime(name, config_for("sd15", "v_prediction"), 10, seed=1)
    assert (epsilon - velocity).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(name: str, strength: float) -> None:
    steps = 10
    config = config_for("sd15", "epsilon")
    # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps convention.
    run = min(int(steps * strength), steps)
    expected_start = max(steps - run, 0)
    start = start_index(steps, strength)
    assert start == expected_start

    reference = reference_scheduler(name, config, steps)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(start)
    generator = torch.Generator().manual_seed(3)
    clean, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    expected = reference.add_noise(clean, noise, reference.timesteps[start : start + 1])
    scheduler = get_scheduler(name)
    step_noise = scheduler.draw_noise(steps, SHAPE, torch.Generator().manual_seed(0), start=start)
    schedule = scheduler.make_schedule(SchedulerConfig.from_dict(config), steps, "cpu", noise=step_noise, start=start)
    found = add_noise(schedule, start, clean, noise)
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)

    final = run_runtime(name, config, steps, seed=5, start=start)
    final_expected = run_reference(name, config, steps, seed=5, start=start)
    assert (final - final_expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_start_index_rejects_bad_strength(strength: float) -> None:
    with pytest.raises(ShapeError, match=r"strength must be in \(0, 1\]"):
        start_index(10, strength)


def test_start_index_rejects_a_strength_that_runs_no_step() -> None:
    with pytest.raises(ShapeError, match="runs no denoising step; use strength >= 0.1"):
        start_index(10, 0.05)


class _NoHostReads(TorchDispatchMode):
    """Fails on ops that read device values back to the host (they break CUDA graph capture)."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        assert name not in self.FORBIDDEN, f"step reads a tensor value on the host via aten.{name}"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_tensor_index_matches_python_index_without_host_reads(name: str) -> None:
    steps = 10
    scheduler = get_scheduler(name)
    config = SchedulerConfig.from_dict(config_for("sd15", "v_prediction"))
    step_noise = scheduler.draw_noise(steps, SHAPE, torch.Generator().manual_seed(0))
    schedule = scheduler.make_schedule(config, steps, "cpu", noise=step_noise)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * schedule.init_noise_sigma

    def loop(index_of: Any) -> torch.Tensor:
        latents, state = start.clone(), initial_state(start)
        for k in range(steps):
            i = index_of(k)
            output = stand_in_model(latents * at_step(schedule.input_scale, i), at_step(schedule.timesteps, i))
            latents, state = scheduler.step(schedule, i, output, latents, state)
        return latents

    index = torch.zeros((), dtype=torch.int64)  # updated in place, as between graph replays

    def tensor_index(k: int) -> torch.Tensor:
        index.fill_(k)
        return index

    with _NoHostReads():
        by_tensor = loop(tensor_index)
    assert torch.equal(by_tensor, loop(lambda k: k))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one_is_rejected(name: str, steps: int) -> None:
    scheduler = get_scheduler(name)
    with pytest.raises(ShapeError, match=f"steps must be an integer >= 1, got {steps}"):
        scheduler.make_schedule(SchedulerConfig.from_dict(SD15), steps, "cpu")


def test_steps_beyond_the_schedule_are_rejected() -> None:
    config = SchedulerConfig.from_dict(SD15)
    with pytest.raises(ShapeError, match=r"steps must be <= 1000 \(the config's num_train_timesteps\), got 1001"):
        get_scheduler("euler").make_schedule(config, 1001, "cpu")
    with pytest.raises(ShapeError, match=r"steps must be <= 50 \(LCM picks"):
        get_scheduler("lcm").make_schedule(config, 51, "cpu", noise=torch.zeros(51, *SHAPE))


def test_noise_contract() -> None:
    config = SchedulerConfig.from_dict(SD15)
    with pytest.raises(ShapeError, match=r"euler_ancestral needs pre-drawn noise of shape \[10, \*latent_shape\]"):
        get_scheduler("euler_a").make_schedule(config, 10, "cpu")
    with pytest.raises(ShapeError, match="ddim is deterministic and takes no noise"):
        get_scheduler("ddim").make_schedule(config, 10, "cpu", noise=torch.zeros(10, *SHAPE))
    assert get_scheduler("ddim").draw_noise(10, SHAPE, None) is None
    lcm_noise = get_scheduler("lcm").draw_noise(4, SHAPE, torch.Generator().manual_seed(0))
    assert lcm_noise.shape == (4, *SHAPE) and not lcm_noise[-1].any() and lcm_noise[0].any()


def test_per_image_generators_draw_like_diffusers() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    seeds = (7, 8)
    noise = get_scheduler("euler_a").draw_noise(3, SHAPE, [torch.Generator().manual_seed(s) for s in seeds])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = torch.stack([randn_tensor(SHAPE, generator=generators) for _ in range(3)])
    assert torch.equal(noise, expected)


def test_unknown_scheduler_lists_valid_names() -> None:
    with pytest.raises(SdtrtError, match="unknown scheduler 'heun'; expected one of: euler, euler_a, ddim, "):
        get_scheduler("heun")


def test_registry_names_and_labels() -> None:
    assert SCHEDULER_NAMES == ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
    assert set(A1111_LABELS) == set(SCHEDULER_NAMES)
    assert get_scheduler("dpmpp_2m_karras").label == "DPM++ 2M Karras"
    assert get_scheduler("euler_a").stochastic and not get_scheduler("euler").stochastic


def test_config_from_sd15_ignores_unknown_keys() -> None:
    config = SchedulerConfig.from_dict(SD15)
    assert (config.beta_schedule, config.steps_offset, config.set_alpha_to_one) == ("scaled_linear", 1, False)
    reference = DDIMScheduler.from_config(SD15).alphas_cumprod
    assert torch.equal(config.alphas_cumprod(torch.float32), reference)
    assert config.alphas_cumprod().dtype == torch.float64
    assert np.allclose(config.alphas_cumprod().numpy(), reference.double().numpy(), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "prediction_type",
            "x0",
            r"'prediction_type' = 'x0' is not supported; expected one of epsilon, v_pre",
        ),
        ("beta_schedule", "cosine", r"'beta_schedule' = 'cosine' .*linear, scaled_linear, squaredcos_cap_v2"),
        ("timestep_spacing", "even", r"'timestep_spacing' = 'even' .*leading, trailing, linspace"),
        ("num_train_timesteps", "1000", r"'num_train_timesteps' must be an integer >= 2, got '1000'"),
        ("beta_end", 1.5, r"'beta_end' must be a number in \(0, 1\), got 1.5"),
        ("clip_sample", "no", r"'clip_sample' must be true or false, got 'no'"),
        ("trained_betas", [0.1, 0.2], r"'trained_betas' must list num_train_timesteps=1000 values, got 2"),
        ("rescale_betas_zero_snr", True, r"'rescale_betas_zero_snr' = True is not supported"),
    ],
)
def test_config_rejects_bad_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        SchedulerConfig.from_dict({**SD15, key: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_captured_step_matches_eager(name: str) -> None:
    steps, device = 10, torch.device("cuda")
    scheduler = get_scheduler(name)
    config = SchedulerConfig.from_dict(SD15)
    step_noise = scheduler.draw_noise(steps, SHAPE, torch.Generator().manual_seed(0))
    schedule = scheduler.make_schedule(config, steps, device, noise=step_noise)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device) * schedule.init_noise_sigma
    sample, state = start.clone(), initial_state(start)
    index = torch.zeros((), dtype=torch.int64, device=device)

    def body() -> None:
        output = stand_in_model(sample * at_step(schedule.input_scale, index), at_step(schedule.timesteps, index))
        new_sample, new_state = scheduler.step(schedule, index, output, sample, state)
        sample.copy_(new_sample)
        state.copy_(new_state)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    sample.copy_(start)
    state.zero_()
    for k in range(steps):
        index.fill_(k)
        graph.replay()

    eager, eager_state = start.clone(), initial_state(start)
    for k in range(steps):
        output = stand_in_model(eager * schedule.input_scale[k], schedule.timesteps[k])
        eager, eager_state = scheduler.step(schedule, k, output, eager, eager_state)
    torch.testing.assert_close(sample, eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ({"_class_name": "LCMScheduler"}, "lcm"),
        ({"_class_name": "PNDMScheduler"}, "euler_a"),
        ({}, "euler_a"),
    ],
)
def test_default_sampler_follows_the_model_scheduler_class(config, expected):
    from sdtrt.runtime.schedulers import default_sampler

    assert default_sampler(config) == expected
