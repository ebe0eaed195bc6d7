"""ComfyUI's sigma schedules (``runtime.schedulers.sigmas``) against independent definitions: diffusers' schedulers
(the training sigma table, Karras and exponential sigmas), the formulas of each schedule computed here in float64
numpy, and ComfyUI's own KSampler rules for ``denoise`` and KSamplerAdvanced's step slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.schedulers.config import SchedulerConfig
from sdtrt.runtime.schedulers.sigmas import (
    SIGMA_SCHEDULES,
    ModelSampling,
    advanced_sigmas,
    beta_cdf,
    beta_quantile,
    calculate_sigmas,
    ksampler_sigmas,
)

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def model() -> ModelSampling:
    return ModelSampling.from_config(SchedulerConfig.from_dict(SD15))


def table64() -> np.ndarray:
    """The training sigmas of SD 1.x from first principles, float64."""
    betas = np.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def diffusers_sigmas(steps: int, **options) -> np.ndarray:
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(**SD15, timestep_spacing="linspace", **options)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.numpy()


def test_model_table_matches_diffusers_and_comfy(model):
    diffusers = pytest.importorskip("diffusers")
    ours = model.sigmas.numpy()
    np.testing.assert_allclose(ours, table64(), rtol=1e-6)  # float64 table rounded to float32
    theirs = diffusers.EulerDiscreteScheduler(**SD15).sigmas.numpy()[:-1][::-1]  # diffusers: float32 alphas
    np.testing.assert_allclose(ours, theirs, rtol=2e-4)
    # SD 1.5 in ComfyUI: sigma_max 14.6146, sigma_min 0.0292
    assert model.sigma_max == pytest.approx(14.614642, abs=2e-6)
    assert model.sigma_min == pytest.approx(0.0291672, abs=1e-7)  # diffusers (float32 alphas): 0.0291675


def test_timestep_is_the_nearest_training_step(model):
    table = table64()
    for sigma in (14.6146, 3.0, 1.0, 0.5, 0.03, 0.1234):
        expected = int(np.argmin(np.abs(np.log(sigma) - np.log(table))))
        assert int(model.timestep(torch.tensor(sigma))) == expected
    assert model.timestep(torch.tensor([14.6, 0.0292])).tolist() == [999, 0]


def test_karras_and_exponential_match_diffusers(model):
    assert calculate_sigmas(model, "karras", 1).tolist() == [pytest.approx(model.sigma_max), 0.0]  # ramp [0]
    for steps in (2, 4, 20):
        karras = calculate_sigmas(model, "karras", steps)
        np.testing.assert_allclose(karras, diffusers_sigmas(steps, use_karras_sigmas=True), rtol=1e-5, atol=1e-6)
        exponential = calculate_sigmas(model, "exponential", steps)
        expected = np.append(np.exp(np.linspace(math.log(14.614642), math.log(0.0291675), steps)), 0.0)
        np.testing.assert_allclose(exponential, expected, rtol=2e-5)
        theirs = diffusers_sigmas(steps, use_exponential_sigmas=True)
        np.testing.assert_allclose(exponential, theirs, rtol=1e-5, atol=1e-6)


def test_normal_and_sgm_uniform(model):
    table, steps = table64(), 7
    log_interp = lambda t: np.exp(np.interp(t, np.arange(1000), np.log(table)))  # noqa: E731
    normal = calculate_sigmas(model, "normal", steps)
    np.testing.assert_allclose(normal, np.append(log_interp(np.linspace(999, 0, steps)), 0.0), rtol=1e-5)
    assert normal[0] == pytest.approx(model.sigma_max, rel=1e-6) and normal[-1] == 0 and len(normal) == steps + 1
    sgm = calculate_sigmas(model, "sgm_uniform", steps)
    np.testing.assert_allclose(sgm, np.append(log_interp(np.linspace(999, 0, steps + 1)[:-1]), 0.0), rtol=1e-5)


def test_simple_and_ddim_uniform_pick_training_sigmas(model):
    table = model.sigmas.numpy()
    simple = calculate_sigmas(model, "simple", 6)
    assert simple.tolist() == [float(table[999 - int(i * 1000 / 6)]) for i in range(6)] + [0.0]
    ddim = calculate_sigmas(model, "ddim_uniform", 4)  # training steps 1, 251, 501, 751, reversed
    assert ddim.tolist() == [float(table[t]) for t in (751, 501, 251, 1)] + [0.0]
    assert len(calculate_sigmas(model, "ddim_uniform", 7)) == 9  # 1 + 142 k up to 995: ComfyUI's 8 steps for 7


def test_linear_quadratic_and_kl_optimal(model):
    lq = calculate_sigmas(model, "linear_quadratic", 8)
    assert len(lq) == 9 and lq[0] == pytest.approx(model.sigma_max) and lq[-1] == 0
    # the first half falls linearly to (1 - 0.025) of sigma_max
    np.testing.assert_allclose(lq[:5] / model.sigma_max, 1 - np.arange(5) * 0.025 / 4, rtol=1e-6)
    assert np.all(np.diff(lq) < 0)
    kl = calculate_sigmas(model, "kl_optimal", 5)
    ramp = np.arange(5) / 4
    expected = np.tan(ramp * math.atan(model.sigma_min) + (1 - ramp) * math.atan(model.sigma_max))
    np.testing.assert_allclose(kl, np.append(expected, 0.0), rtol=1e-5)
    with pytest.raises(ConfigError, match="kl_optimal"):
        calculate_sigmas(model, "kl_optimal", 1)


def comfy_beta(model: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI's beta scheduler as its samplers.py defines it, with scipy's Beta quantiles."""
    stats = pytest.importorskip("scipy.stats")
    levels = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(stats.beta.ppf(levels, 0.6, 0.6) * (len(model.sigmas) - 1))
    sigmas, last = [], -1.0
    for t in timesteps:
        if t != last:
            sigmas.append(float(model.sigmas[int(t)]))
        last = t
    return torch.tensor([*sigmas, 0.0], dtype=torch.float32).numpy()


def test_beta_equals_comfyuis_definition_with_scipy(model):
    for steps in [*range(1, 121), 150, 333, 500, 999, 1000, 1001, 2500, 10000]:
        expected = comfy_beta(model, steps)
        assert np.array_equal(calculate_sigmas(model, "beta", steps), expected), steps
    # repeated timesteps are dropped: 300 steps hold 293 distinct ones
    assert len(calculate_sigmas(model, "beta", 300)) == 294
    assert np.array_equal(ksampler_sigmas(model, "beta", 20, 0.5), comfy_beta(model, 40)[-21:])


def test_beta_quantiles_without_scipy():
    q = np.linspace(0, 1, 2001)
    for a, b in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0)):
        x = beta_quantile(q, a, b)
        assert x[0] == 0 and x[-1] == 1 and np.all(np.diff(x) > 0)
        np.testing.assert_allclose(beta_cdf(x, a, b), q, rtol=0, atol=1e-13)
    assert beta_quantile(np.array([0.5]), 0.6, 0.6)[0] == pytest.approx(0.5, abs=1e-15)  # symmetric
    # I_x(1, 1) = x and I_x(2, 1) = x^2: closed forms
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(beta_cdf(x, 1.0, 1.0), x, atol=1e-14)
    np.testing.assert_allclose(beta_cdf(x, 2.0, 1.0), x**2, atol=1e-14)


@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES)
def test_every_schedule_descends_to_zero(model, schedule):
    sigmas = calculate_sigmas(model, schedule, 10)
    assert sigmas.dtype == np.float32 and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0)


def test_denoise_rule(model):
    full = ksampler_sigmas(model, "normal", 4)
    assert np.array_equal(ksampler_sigmas(model, "normal", 4, 1.0), full)
    assert np.array_equal(ksampler_sigmas(model, "normal", 4, 0.99995), full)  # > 0.9999 is full
    assert ksampler_sigmas(model, "normal", 4, 0.0).size == 0
    partial = ksampler_sigmas(model, "normal", 4, 0.6)  # int(4 / 0.6) = 6 steps, the last 5 sigmas
    assert np.array_equal(partial, calculate_sigmas(model, "normal", 6)[-5:])
    assert np.array_equal(ksampler_sigmas(model, "karras", 3, 0.5), calculate_sigmas(model, "karras", 6)[-4:])
    with pytest.raises(ConfigError, match="unknown sigma schedule 'polyexponential'"):
        ksampler_sigmas(model, "polyexponential", 4)
    with pytest.raises(ConfigError, match="steps"):
        ksampler_sigmas(model, "normal", 0)


def test_advanced_slicing():
    sigmas = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.0], dtype=np.float32)
    assert advanced_sigmas(sigmas, 0, 10000, False).tolist() == sigmas.tolist()
    assert advanced_sigmas(sigmas, 2, 10000, True).tolist() == [2.0, 1.0, 0.5, 0.0]
    assert advanced_sigmas(sigmas, 0, 3, False).tolist() == [10.0, 5.0, 2.0, 1.0]  # leftover noise
    assert advanced_sigmas(sigmas, 0, 3, True).tolist() == [10.0, 5.0, 2.0, 0.0]  # force full denoise
    assert advanced_sigmas(sigmas, 1, 3, False).tolist() == [5.0, 2.0, 1.0]
    assert advanced_sigmas(sigmas, 3, 3, False).size == 0  # nothing left to run
    assert advanced_sigmas(sigmas, 5, 10000, False).size == 0
    assert sigmas[3] == 1.0  # the input is not modified
