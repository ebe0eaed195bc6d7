"""ComfyUI's KSampler on the runtime (``Pipeline.sample_latents``) against k-diffusion's algorithms written out here
in plain torch, calling the tiny diffusers UNet on the CPU in float32, over the same sigmas and noise.

The reference follows comfy/k_diffusion/sampling.py and comfy/samplers.py step by step (denoised = x - sigma * eps
of the UNet at ComfyUI's integer timestep, CFG on the denoised predictions, the samplers' updates, the ancestral
noise of a CPU generator seeded with seed + 1, KSamplerX0Inpaint's mask blend); the runtime instead runs
precomputed per-step coefficients through the ONNX Runtime engines. Tolerance: the latents agree within 1e-4
relative to their largest magnitude (they reach ~100 with the tiny random UNet at sigma 14.6).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from sdtrt.runtime.errors import ConfigError, ShapeError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.sampling import SIGMA_SAMPLERS, Conditioning, Interrupted, comfy_noise, prepare_mask
from sdtrt.runtime.schedulers.ksampling import draw_step_noise

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend="onnxruntime") as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def conds(pipe):
    return pipe.encode_conditioning("a cat on a red sofa"), pipe.encode_conditioning("blurry")


def log_sigma_table(config: dict) -> torch.Tensor:
    """log sigma of each training step, from the betas (scaled_linear) in float64, as ComfyUI keeps them."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().float()


class Reference:
    """k-diffusion's samplers around the diffusers UNet, on the CPU in float32."""

    def __init__(self, bundle, positive: Conditioning, negative: Conditioning, cfg: float) -> None:
        self.unet, self.cfg, self.scale = bundle.unet, cfg, bundle.vae.config.scaling_factor
        self.log_sigmas = log_sigma_table(bundle.scheduler_config)
        self.pos, self.neg = positive.text, negative.text
        self.mask = self.latent = self.mask_noise = None

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = (sigma.log() - self.log_sigmas).abs().argmin()
        inp = x / (sigma**2 + 1) ** 0.5
        with torch.no_grad():
            return self.unet(inp, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample.float()

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:  # KSamplerX0Inpaint
            x = x * self.mask + (self.latent + self.mask_noise * sigma) * (1 - self.mask)
        length = math.lcm(self.pos.shape[1], self.neg.shape[1])
        cond = x - sigma * self.eps(x, sigma, self.pos.repeat(1, length // self.pos.shape[1], 1))
        if self.cfg != 1.0:
            uncond = x - sigma * self.eps(x, sigma, self.neg.repeat(1, length // self.neg.shape[1], 1))
            cond = uncond + (cond - uncond) * self.cfg
        if self.mask is not None:
            cond = cond * self.mask + self.latent * (1 - self.mask)
        return cond

    def sample(self, sampler: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + 1)  # default_noise_sampler on the CPU
        brownian = comfy_brownian(x, sigmas, seed) if sampler == "dpmpp_2m_sde" else None
        old = h_last = None
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = self.denoised(x, s)
            if sampler in ("euler", "ddim"):
                x = x + (x - d) / s * (s_next - s)
            elif sampler == "euler_ancestral":
                up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
                down = (s_next**2 - up**2) ** 0.5
                if down == 0:
                    x = d
                else:
                    x = x + (x - d) / s * (down - s) + torch.randn(x.shape, generator=generator) * up
            elif sampler == "dpmpp_2m":
                t, t_next = -s.log(), -s_next.log()
                h = t_next - t
                if old is None or s_next == 0:
                    x = (s_next / s) * x - torch.expm1(-h) * d
                else:
                    r = (t - (-sigmas[i - 1].log())) / h
                    x = (s_next / s) * x - torch.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
                old = d
            elif sampler == "lcm":
                x = d
                if s_next > 0:
                    x = x + torch.randn(x.shape, generator=generator) * s_next
            elif sampler == "dpmpp_2m_sde":  # eta 1, s_noise 1, midpoint
                if s_next == 0:
                    x = d
                else:
                    h = s.log() - s_next.log()
                    g = -torch.expm1(-2 * h)
                    x = s_next / s * torch.exp(-h) * x + g * d
                    if old is not None:
                        x = x + 0.5 * g * (h / h_last) * (d - old)
                    x = x + brownian(s, s_next) * s_next * g.sqrt()
                old, h_last = d, (h if s_next > 0 else h_last)
        return x

    def run(self, sampler, latents, sigmas, seed, mask=None, add_noise=True):
        sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)) if add_noise else latents * 0
        latent = latents * self.scale
        top = math.exp(float(self.log_sigmas[-1]))
        scale = (1 + sigmas[0] ** 2) ** 0.5 if math.isclose(top, float(sigmas[0]), rel_tol=1e-5) else sigmas[0]
        if mask is not None:
            self.mask, self.latent = mask, latent
            ddim = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 1))  # inpaint "random"
            self.mask_noise = ddim if sampler == "ddim" else noise
        return self.sample(sampler, noise * scale + latent, sigmas, seed) / self.scale


def comfy_brownian(x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    """ComfyUI's BrownianTreeNoiseSampler on the CPU (BatchedBrownianTree around one torchsde BrownianTree), called
    as its samplers call it: ``noise(sigma, sigma_next)``."""
    torchsde = pytest.importorskip("torchsde")
    low, high = sigmas[sigmas > 0].min(), sigmas.max()
    tree = torchsde.BrownianTree(low, torch.zeros_like(x), high, entropy=seed)

    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        return tree(t0.float(), t1.float()) * sign / (sigma_next - sigma).abs().sqrt()

    return noise


def test_brownian_noise_is_comfys_tree_in_step_order():
    sigmas = np.array([14.6, 7.1, 3.0, 0.9, 0.2, 0.0], dtype=np.float32)
    shape = (2, 4, 8, 8)
    ours = draw_step_noise("dpmpp_2m_sde", sigmas, shape, 2**63 + 7)
    table = torch.from_numpy(sigmas)
    comfy = comfy_brownian(torch.zeros(shape), table, 2**63 + 7)
    steps = [comfy(table[i], table[i + 1]) for i in range(4)]
    assert ours.shape == (5, *shape) and not ours[4].any()  # no noise onto sigma 0
    for i in (3, 0, 2, 1):  # the tree's values do not depend on the order it is asked in
        assert torch.equal(ours[i], steps[i])
    other = draw_step_noise("dpmpp_2m_sde", sigmas, shape, 2**63 + 8)
    assert not torch.equal(other[:4], ours[:4])  # the seed is the tree's entropy
    assert abs(float(ours[:4].mean())) < 0.1 and abs(float(ours[:4].std()) - 1) < 0.1  # unit normal increments


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((ours - ref).abs().max()) / float(ref.abs().max())
    assert err < REL_TOL, f"max abs diff is {err:.2e} of the largest value"


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_txt2img_matches_k_diffusion(pipe, conds, tiny_bundle, sampler):
    positive, negative = conds
    sigmas = pipe.ksampler_sigmas("normal", 4)
    latents = torch.zeros(2, 4, 8, 8)  # EmptyLatentImage, batch 2
    ours = pipe.sample_latents(latents, positive, negative, sampler=sampler, sigmas=sigmas, cfg=7.0, seed=3)
    ref = Reference(tiny_bundle, positive, negative, 7.0).run(sampler, latents, sigmas, 3)
    assert_close(ours, ref)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde"])
def test_img2img_denoise_matches_k_diffusion(pipe, conds, tiny_bundle, sampler):
    positive, negative = conds
    sigmas = pipe.ksampler_sigmas("karras", 5, denoise=0.6)
    assert len(sigmas) == 6 and sigmas[0] < pipe.model_sampling.sigma_max  # int(5 / 0.6) = 8 steps, last 6 sigmas
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(5)) * 5
    ours = pipe.sample_latents(latents, positive, negative, sampler=sampler, sigmas=sigmas, cfg=4.5, seed=11)
    ref = Reference(tiny_bundle, positive, negative, 4.5).run(sampler, latents, sigmas, 11)
    assert_close(ours, ref)


def test_cfg_one_runs_the_conditional_rows_only(pipe, conds, tiny_bundle):
    positive, negative = conds
    rows = []
    unet = pipe.engines["unet"]
    original = unet.infer
    unet.infer = lambda feeds: rows.append(feeds["sample"].shape[0]) or original(feeds)
    try:
        sigmas = pipe.ksampler_sigmas("simple", 3)
        ours = pipe.sample_latents(
            torch.zeros(1, 4, 8, 8), positive, negative, sampler="euler", sigmas=sigmas, cfg=1.0, seed=7
        )
    finally:
        del unet.infer
    assert rows == [1, 1, 1]
    assert_close(ours, Reference(tiny_bundle, positive, negative, 1.0).run("euler", torch.zeros(1, 4, 8, 8), sigmas, 7))


def test_noise_mask_keeps_the_unmasked_latents(pipe, conds, tiny_bundle):
    positive, negative = conds
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 5
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1.0  # pixel-size mask: resample the right half
    sigmas = pipe.ksampler_sigmas("normal", 4)
    for sampler in ("euler", "euler_ancestral", "ddim"):
        ours = pipe.sample_latents(
            latents, positive, negative, sampler=sampler, sigmas=sigmas, cfg=7.0, seed=1, noise_mask=mask
        )
        torch.testing.assert_close(ours[..., :4], latents[..., :4], rtol=0, atol=1e-5)
        assert float((ours[..., 4:] - latents[..., 4:]).abs().max()) > 1.0
        ref = Reference(tiny_bundle, positive, negative, 7.0).run(
            sampler, latents, sigmas, 1, mask=prepare_mask(mask, (1, 4, 8, 8))
        )
        assert_close(ours, ref)


def test_prompts_of_different_lengths_are_repeated_to_a_common_length(pipe, tiny_bundle):
    cat, sofa = pipe.encode_conditioning("a cat"), pipe.encode_conditioning("on a red sofa")
    positive = Conditioning(torch.cat([cat.text, sofa.text], dim=1))  # two 75-token windows side by side: 154
    negative = pipe.encode_conditioning("dog")
    assert positive.text.shape[1] == 154 and negative.text.shape[1] == 77
    sigmas = pipe.ksampler_sigmas("exponential", 3)
    ours = pipe.sample_latents(
        torch.zeros(1, 4, 8, 8), positive, negative, sampler="euler", sigmas=sigmas, cfg=5.0, seed=0
    )
    assert_close(ours, Reference(tiny_bundle, positive, negative, 5.0).run("euler", torch.zeros(1, 4, 8, 8), sigmas, 0))


def test_add_noise_off_and_sliced_sigmas(pipe, conds, tiny_bundle):
    from sdtrt.runtime.sampling import advanced_sigmas

    positive, negative = conds
    sigmas = advanced_sigmas(pipe.ksampler_sigmas("normal", 6), 2, 4, force_full_denoise=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 3
    ours = pipe.sample_latents(
        latents, positive, negative, sampler="dpmpp_2m", sigmas=sigmas, cfg=3.0, seed=4, add_noise=False
    )
    ref = Reference(tiny_bundle, positive, negative, 3.0).run("dpmpp_2m", latents, sigmas, 4, add_noise=False)
    assert_close(ours, ref)


def test_comfy_noise_is_one_draw_of_the_whole_batch():
    with torch.random.fork_rng(devices=[]):
        expected = torch.randn((2, 4, 8, 8), generator=torch.manual_seed(42))
    noise = comfy_noise((2, 4, 8, 8), 42)
    assert torch.equal(noise, expected) and noise.dtype == torch.float32
    assert not torch.equal(noise[1:], comfy_noise((1, 4, 8, 8), 43))  # not one generator per image
    assert torch.equal(comfy_noise((1, 4, 8, 8), 2**64 - 1), comfy_noise((1, 4, 8, 8), 2**64 - 1))


def test_callback_cancel_and_empty_sigmas(pipe, conds):
    positive, negative = conds
    latents = torch.zeros(1, 4, 8, 8)
    sigmas = pipe.ksampler_sigmas("normal", 3)
    seen = []
    pipe.sample_latents(
        latents,
        positive,
        negative,
        sampler="euler",
        sigmas=sigmas,
        cfg=2.0,
        seed=1,
        callback=lambda i, total, x: seen.append((i, total, tuple(x.shape))),
    )
    assert seen == [(0, 3, (1, 4, 8, 8)), (1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8))]
    cancel = threading.Event()
    with pytest.raises(Interrupted) as info:
        pipe.sample_latents(
            latents,
            positive,
            negative,
            sampler="euler",
            sigmas=sigmas,
            cfg=2.0,
            seed=1,
            callback=lambda i, total, x: cancel.set(),
            cancel=cancel,
        )
    assert (info.value.steps, info.value.total) == (1, 3)
    assert torch.equal(
        pipe.sample_latents(latents + 1, positive, negative, sampler="euler", sigmas=[], cfg=2.0, seed=1), latents + 1
    )


def test_bad_input_is_refused(pipe, conds):
    positive, negative = conds
    good = {"sampler": "euler", "sigmas": [1.0, 0.0], "cfg": 7.0, "seed": 1}
    with pytest.raises(ConfigError, match="unknown sampler 'heun'"):
        pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **{**good, "sampler": "heun"})
    with pytest.raises(ShapeError, match=r"latents must be a tensor \[B, 4, h, w\]"):
        pipe.sample_latents(torch.zeros(1, 3, 8, 8), positive, negative, **good)
    with pytest.raises(ShapeError, match="multiples of 16 pixels; got 64x72"):
        pipe.sample_latents(torch.zeros(1, 4, 9, 8), positive, negative, **good)
    with pytest.raises(ShapeError, match="outside this artifact's profile"):
        pipe.sample_latents(torch.zeros(1, 4, 64, 64), positive, negative, **good)
    with pytest.raises(ShapeError, match="sigmas"):
        pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **{**good, "sigmas": [1.0, -1.0]})
    with pytest.raises(ConfigError, match="seed must be an integer"):
        pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **{**good, "seed": -1})
    with pytest.raises(ConfigError, match="cache interval must be an integer >= 1"):
        pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **good, cache_interval=0)
    # the tiny artifact's profile is 64..256 pixels: engines are built for those sizes only, as the A1111 route checks
    with pytest.raises(ShapeError, match="outside this artifact's profile"):
        pipe.sample_latents(torch.zeros(1, 4, 4, 4), positive, negative, **good)
    with pytest.raises(ShapeError, match="outside this artifact's profile"):
        pipe.decode_images(torch.zeros(1, 4, 40, 40))
    with pytest.raises(ShapeError, match="outside this artifact's profile"):
        pipe.encode_images(torch.zeros(1, 32, 32, 3))


def test_decode_and_encode_images_as_comfy(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe.decode_images(latents)
    assert images.shape == (1, 64, 64, 3) and float(images.min()) >= 0 and float(images.max()) <= 1
    decoded = pipe.engines["vae_decoder"].infer({"latent": latents})["image"]
    torch.testing.assert_close(images, ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1), rtol=0, atol=0)
    # VAEEncode: the mean (deterministic), cropped around the center to multiples of 8
    padded = torch.nn.functional.pad(images.movedim(-1, 1), (3, 4, 2, 3)).movedim(1, -1)  # 69 x 71
    first, again = pipe.encode_images(padded), pipe.encode_images(images)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    mean = pipe.engines["vae_encoder"].infer({"image": images.movedim(-1, 1) * 2 - 1})["latent_mean"]
    torch.testing.assert_close(first, mean, rtol=0, atol=0)


# -- ControlNet (ControlNetApplyAdvanced), step caching, SDXL ----------------------------------------------------
class ControlledReference(Reference):
    """The reference with diffusers ControlNets: residuals x strength on the steps inside the sigma range."""

    def __init__(self, bundle, positive, negative, cfg, controlnet, hint, strength, sigma_range, both: bool):
        super().__init__(bundle, positive, negative, cfg)
        self.controlnet, self.hint, self.strength, self.range, self.both = controlnet, hint, strength, sigma_range, both

    def eps(self, x, sigma, text):
        active = self.range[1] <= float(sigma) <= self.range[0] and (self.both or torch.equal(text, self.pos))
        if not active:
            return super().eps(x, sigma, text)
        t = (sigma.log() - self.log_sigmas).abs().argmin()
        inp = x / (sigma**2 + 1) ** 0.5
        context = text.expand(x.shape[0], -1, -1)
        hint = self.hint.expand(x.shape[0], -1, -1, -1)
        with torch.no_grad():
            down, mid = self.controlnet(inp, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
            down = [d * self.strength for d in down]
            out = self.unet(
                inp,
                t,
                encoder_hidden_states=context,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid * self.strength,
            )
        return out.sample.float()


@pytest.fixture(scope="module")
def control_pipe(tiny_control_fp32):
    with Pipeline.from_artifacts(tiny_control_fp32, backend="onnxruntime") as pipeline:
        yield pipeline


@pytest.mark.parametrize("both", [True, False])
def test_controlnet_matches_diffusers_controlnet(control_pipe, tiny_bundle, tiny_controlnets, both):
    from sdtrt.runtime.control.comfy import ControlApply, comfy_hint, percent_to_sigma

    pipe = control_pipe
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(4))  # another aspect: center crop
    apply = ControlApply("edges", image, strength=0.7, start_percent=0.0, end_percent=0.6)
    positive = Conditioning(pipe.encode_conditioning("a house").text, controls=(apply,))
    negative = Conditioning(pipe.encode_conditioning("").text, controls=(apply,) if both else ())
    sigmas = pipe.ksampler_sigmas("normal", 4)
    model = pipe.model_sampling
    sigma_range = (percent_to_sigma(model, 0.0), percent_to_sigma(model, 0.6))
    assert 0 < sum(sigma_range[1] <= s <= sigma_range[0] for s in sigmas[:-1]) < 4  # some steps only
    latents = torch.zeros(1, 4, 8, 8)
    ours = pipe.sample_latents(latents, positive, negative, sampler="euler", sigmas=sigmas, cfg=6.0, seed=8)
    hint = comfy_hint(image, 64, 64)
    controlnet = tiny_controlnets["edges"][1]
    ref = ControlledReference(tiny_bundle, positive, negative, 6.0, controlnet, hint, 0.7, sigma_range, both)
    assert_close(ours, ref.run("euler", latents, sigmas, 8))
    plain = pipe.sample_latents(
        latents,
        Conditioning(positive.text),
        Conditioning(negative.text),
        sampler="euler",
        sigmas=sigmas,
        cfg=6.0,
        seed=8,
    )
    assert float((ours - plain).abs().max()) > 1e-2  # the ControlNet changes the result


def test_comfy_hint_crops_around_the_center():
    from sdtrt.runtime.control.comfy import comfy_hint

    image = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 4, 8, 1).expand(-1, -1, -1, 3)
    hint = comfy_hint(image, 4, 4)  # aspect 2 -> 1: columns 2..5 kept
    assert torch.equal(hint[0, 0], image[0, :, 2:6, 0])


def test_controls_are_checked(control_pipe):
    from sdtrt.runtime.control.comfy import ControlApply
    from sdtrt.runtime.errors import ControlError

    pipe = control_pipe
    image = torch.rand(1, 64, 64, 3)
    text = pipe.encode_conditioning("x").text
    with pytest.raises(ControlError, match="unknown ControlNet 'pose': this artifact has depth, edges"):
        pipe.sample_latents(
            torch.zeros(1, 4, 8, 8),
            Conditioning(text, controls=(ControlApply("pose", image),)),
            Conditioning(text),
            sampler="euler",
            sigmas=[1.0, 0.0],
            cfg=2.0,
            seed=0,
        )
    one, two = ControlApply("edges", image), ControlApply("depth", image)
    with pytest.raises(ControlError, match="same ControlNet applications"):
        pipe.sample_latents(
            torch.zeros(1, 4, 8, 8),
            Conditioning(text, controls=(one,)),
            Conditioning(text, controls=(two,)),
            sampler="euler",
            sigmas=[1.0, 0.0],
            cfg=2.0,
            seed=0,
        )
    with pytest.raises(ControlError, match="start_percent <= end_percent"):
        ControlApply("edges", image, start_percent=0.8, end_percent=0.2)


def test_step_caching_runs_the_shallow_unet_between_full_steps(pipe, conds):
    positive, negative = conds
    calls = []
    shallow = pipe.engines["unet_shallow"]
    original = shallow.infer
    shallow.infer = lambda feeds: calls.append(1) or original(feeds)
    try:
        sigmas = pipe.ksampler_sigmas("normal", 6)
        args = {"sampler": "euler", "sigmas": sigmas, "cfg": 5.0, "seed": 2}
        cached = pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **args, cache_interval=2)
        assert len(calls) == 2  # plan F.F.FF: steps 1 and 3 shallow
        full = pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **args)
    finally:
        del shallow.infer
    assert len(calls) == 2 and not torch.equal(cached, full)


def test_sdxl_pooled_output_and_size_conditioning(tmp_path_factory):
    """tiny-xl: the UNet gets both prompts' pooled outputs and ComfyUI's default time ids (latent size x 8, crop 0)."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from sdtrt.runtime.models.presets import load_preset

    bundle = load_preset("tiny-xl")
    folder = tmp_path_factory.mktemp("comfy-xl") / "fp32"
    export_artifacts(bundle, folder, ExportOptions(profile=default_profile(bundle), precision="fp32"))
    with Pipeline.from_artifacts(folder, backend="onnxruntime") as pipe:
        positive, negative = pipe.encode_conditioning("a red circle"), pipe.encode_conditioning("")
        assert positive.pooled is not None and positive.pooled.shape[0] == 1
        sigmas = pipe.ksampler_sigmas("karras", 3)
        latents = torch.zeros(1, 4, 16, 12)
        ours = pipe.sample_latents(latents, positive, negative, sampler="dpmpp_2m", sigmas=sigmas, cfg=5.0, seed=6)
        with pytest.raises(ShapeError, match="pooled embedding"):
            pipe.sample_latents(
                latents, Conditioning(positive.text), negative, sampler="euler", sigmas=sigmas, cfg=5.0, seed=6
            )

    class XLReference(Reference):
        def eps(self, x, sigma, text):
            t = (sigma.log() - self.log_sigmas).abs().argmin()
            pooled = positive.pooled if torch.equal(text, positive.text) else negative.pooled
            ids = torch.tensor([[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]])
            extra = {"text_embeds": pooled.expand(x.shape[0], -1), "time_ids": ids.expand(x.shape[0], -1)}
            with torch.no_grad():
                out = self.unet(
                    x / (sigma**2 + 1) ** 0.5,
                    t,
                    encoder_hidden_states=text.expand(x.shape[0], -1, -1),
                    added_cond_kwargs=extra,
                )
            return out.sample.float()

    reference = XLReference(bundle, positive, negative, 5.0)
    assert_close(ours, reference.run("dpmpp_2m", latents, sigmas, 6))


@pytest.mark.parametrize("with_mask", [True, False])
def test_inpainting_unet_gets_comfys_concat_channels(tiny_inpaint_fp32, tiny_inpaint_bundle, with_mask):
    """InpaintModelConditioning's concat_latent_image + concat_mask (and the latent's noise_mask) on the 9-channel
    UNet; without any mask, ComfyUI's full mask and blank-image latents."""
    from sdtrt.runtime.comfy_tensors import BLANK_LATENTS

    bundle = tiny_inpaint_bundle
    scale = bundle.vae.config.scaling_factor
    with Pipeline.from_artifacts(tiny_inpaint_fp32, backend="onnxruntime") as pipe:
        text_pos, text_neg = pipe.encode_conditioning("a cat").text, pipe.encode_conditioning("").text
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:48, 8:40] = 1.0
        masked = image.clone()
        masked[mask > 0.5] = 0.5  # InpaintModelConditioning greys the masked pixels before VAEEncode
        concat = pipe.encode_images(masked)
        latents = pipe.encode_images(image)
        extra = {"concat_latent_image": concat, "concat_mask": mask} if with_mask else {}
        positive, negative = Conditioning(text_pos, **extra), Conditioning(text_neg, **extra)
        sigmas = pipe.ksampler_sigmas("normal", 3, denoise=0.8)
        noise_mask = mask if with_mask else None
        ours = pipe.sample_latents(
            latents, positive, negative, sampler="euler", sigmas=sigmas, cfg=4.0, seed=5, noise_mask=noise_mask
        )

    small = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear").round()
    if with_mask:
        condition = torch.cat([small, concat * scale], dim=1)
    else:
        condition = torch.cat(
            [torch.ones(1, 1, 8, 8), torch.tensor(BLANK_LATENTS).reshape(1, 4, 1, 1).expand(1, 4, 8, 8)], 1
        )

    class InpaintReference(Reference):
        def eps(self, x, sigma, text):
            t = (sigma.log() - self.log_sigmas).abs().argmin()
            inp = torch.cat([x / (sigma**2 + 1) ** 0.5, condition.expand(x.shape[0], -1, -1, -1)], dim=1)
            with torch.no_grad():
                return self.unet(inp, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample.float()

    reference = InpaintReference(bundle, positive, negative, 4.0)
    blend = prepare_mask(mask, (1, 4, 8, 8)) if with_mask else None
    assert_close(ours, reference.run("euler", latents, sigmas, 5, mask=blend))


def test_v_prediction_model(tmp_path):
    """An SD 2.x v-prediction model: denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1) (ComfyUI's
    V_PREDICTION), for a deterministic and an ancestral sampler."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile
    from tests.conftest import make_sd2_bundle

    bundle = make_sd2_bundle()
    export_artifacts(bundle, tmp_path / "sd2", ExportOptions(profile=default_profile(bundle)))

    class VReference(Reference):
        def denoised(self, x, sigma):
            v = lambda text: self.eps(x, sigma, text)  # noqa: E731 (the UNet's output, here v)
            to_x0 = lambda out: x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5  # noqa: E731
            cond, uncond = to_x0(v(self.pos)), to_x0(v(self.neg))
            return uncond + (cond - uncond) * self.cfg

    with Pipeline.from_artifacts(tmp_path / "sd2", backend="onnxruntime") as pipe:
        assert pipe.model_sampling.prediction_type == "v_prediction"
        positive, negative = pipe.encode_conditioning("a cat"), pipe.encode_conditioning("blurry")
        for sampler in ("euler", "euler_ancestral"):
            sigmas = pipe.ksampler_sigmas("sgm_uniform", 3)
            latents = torch.zeros(1, 4, 8, 8)
            ours = pipe.sample_latents(latents, positive, negative, sampler=sampler, sigmas=sigmas, cfg=6.0, seed=12)
            assert_close(ours, VReference(bundle, positive, negative, 6.0).run(sampler, latents, sigmas, 12))


def test_prepare_mask_as_comfys_reshape_mask():
    half = torch.zeros(64, 64)
    half[:, 32:] = 1.0
    mask = prepare_mask(half, (2, 4, 8, 8))  # pixel size, [h, w]: bilinear to 8 x 8, over channels and batch
    assert mask.shape == (2, 4, 8, 8) and torch.equal(mask[1, 3], mask[0, 0])
    assert mask[0, 0, 0].tolist() == [0.0] * 4 + [1.0] * 4
    per_image = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])  # [B, h, w] at latent size: kept as it is
    spread = prepare_mask(per_image, (3, 4, 8, 8))
    assert [float(m.mean()) for m in spread] == [0.0, 1.0, 0.0]  # repeated over the batch, then cut
    with pytest.raises(ShapeError, match="noise mask"):
        prepare_mask(torch.zeros(1, 2, 8, 8), (1, 4, 8, 8))
