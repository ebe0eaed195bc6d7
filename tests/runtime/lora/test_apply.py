"""LoRAs through the pipeline on the torch and ONNX Runtime backends, against diffusers' load_lora_weights + fuse_lora.

Same base weights (tiny), same seed, same sampler: sdtrt with a LoRA must give diffusers' image with the same LoRA
fused (fp32, PSNR >= 40 dB), at two scales, for a UNet-only and a UNet + text encoder LoRA, in the kohya and the
diffusers file formats; scale 0 and no LoRA give the base image exactly, A -> B -> A gives A's image again, and a
LoRA for another model is refused with nothing applied.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.errors import LoraError
from sdtrt.runtime.lora.files import LoraLayer
from sdtrt.runtime.lora.write import save_lora
from sdtrt.runtime.models.presets import load_preset
from sdtrt.runtime.models.reference import diffusers_pipeline
from sdtrt.runtime.pipeline import Pipeline

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

PROMPT = "a photo of a cat on a red sofa, detailed"
NEGATIVE = "blurry"
SIZE, STEPS, SEED = 64, 4, 3
PARITY_DB = 40.0


def make_layers(bundle, text: bool, seed: int, rank: int = 4) -> dict[tuple[str, str], LoraLayer]:
    """A rank-``rank`` LoRA on every UNet attention projection and conv_in (and the text encoder's projections)."""
    generator = torch.Generator().manual_seed(seed)
    targets = [("unet", bundle.unet)] + ([("text_encoder", bundle.text_encoder)] if text else [])
    layers = {}
    for component, module in targets:
        for path, child in module.named_modules():
            linear = isinstance(child, torch.nn.Linear) and path.rsplit(".", 1)[-1] in (
                "to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"
            ) and ("attn" in path)  # fmt: skip
            conv = component == "unet" and path == "conv_in"
            if not (linear or conv):
                continue
            w = child.weight
            shape_in = (rank, *w.shape[1:]) if conv else (rank, w.shape[1])
            down = torch.randn(shape_in, generator=generator) * 0.3
            up = torch.randn((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank), generator=generator) * 0.3
            layers[(component, path)] = LoraLayer(down, up, alpha=float(rank) / 2)
    return layers


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    unet_only, with_text = make_layers(tiny_bundle, False, 1), make_layers(tiny_bundle, True, 2)
    return {
        "unet-kohya": save_lora(unet_only, root / "unet-kohya.safetensors", "kohya", unet=tiny_bundle.unet),
        "unet-diffusers": save_lora(unet_only, root / "unet-diffusers.safetensors", "diffusers"),
        "text-kohya": save_lora(with_text, root / "text-kohya.safetensors", "kohya", unet=tiny_bundle.unet),
        "text-diffusers": save_lora(with_text, root / "text-diffusers.safetensors", "diffusers"),
        "text-kohya-sgm": save_lora(
            with_text, root / "text-kohya-sgm.safetensors", "kohya", unet=tiny_bundle.unet, sgm_names=True
        ),
    }


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def pipe(request, tiny_fp32):
    with Pipeline.from_artifacts(tiny_fp32, backend=request.param, device="cpu") as opened:
        yield opened


def generate(pipe) -> torch.Tensor:
    result = pipe(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, height=SIZE, width=SIZE, scheduler="euler")
    return result.pixels


def diffusers_image(path: Path | None, scale: float) -> torch.Tensor:
    """diffusers on fresh tiny weights, with the LoRA loaded and fused at ``scale``."""
    reference = diffusers_pipeline(load_preset("tiny"), "euler")
    if path is not None:
        reference.load_lora_weights(str(path.parent), weight_name=path.name)
        reference.fuse_lora(lora_scale=scale)
    with torch.no_grad():
        out = reference(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=SIZE, width=SIZE,
            generator=torch.Generator().manual_seed(SEED), output_type="pt",
        )  # fmt: skip
    return out.images.float()


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["unet-kohya", "unet-diffusers", "text-kohya", "text-diffusers"])
def test_lora_matches_diffusers_fuse_lora(pipe, loras, kind, scale):
    pipe.set_loras([(loras[kind], scale)])
    try:
        ours = generate(pipe)
    finally:
        pipe.set_loras([])
    value = psnr(ours, diffusers_image(loras[kind], scale))
    print(f"{pipe.backend} LoRA {kind} scale {scale} vs diffusers fuse_lora: {value:.1f} dB")
    assert value >= PARITY_DB
    assert psnr(ours, generate(pipe)) < 60  # the LoRA really changed the image


def test_sgm_block_names_give_the_same_image_as_diffusers_names(pipe, loras):
    """kohya files name UNet blocks either way. diffusers' SD 1.x loader ignores the SGM names (it remaps them
    for SDXL only), so the reference here is the same LoRA under diffusers names."""
    pipe.set_loras([(loras["text-kohya-sgm"], 0.7)])
    sgm = generate(pipe)
    pipe.set_loras([(loras["text-kohya"], 0.7)])
    named = generate(pipe)
    pipe.set_loras([])
    assert torch.equal(sgm, named)


def test_none_and_scale_zero_give_the_base_image_exactly_and_a_b_a_returns(pipe, loras):
    base = generate(pipe)
    pipe.set_loras([(loras["text-kohya"], 0.0)])
    assert torch.equal(generate(pipe), base)
    pipe.set_loras([(loras["text-kohya"], 1.0)])
    a = generate(pipe)
    pipe.set_loras([(loras["unet-diffusers"], 0.8)])
    b = generate(pipe)
    pipe.set_loras([(loras["text-kohya"], 1.0)])
    assert torch.equal(generate(pipe), a) and not torch.equal(a, b)
    pipe.set_loras([])
    assert torch.equal(generate(pipe), base)  # back to the base model bit for bit
    assert pipe.loras == []


def test_two_loras_add_up(pipe, loras):
    pipe.set_loras([(loras["unet-kohya"], 0.5), (loras["text-diffusers"], 0.5)])
    try:
        both = generate(pipe)
        names = [(f.name, s) for f, s in pipe.loras]
    finally:
        pipe.set_loras([])
    assert names == [("unet-kohya", 0.5), ("text-diffusers", 0.5)]
    reference = diffusers_pipeline(load_preset("tiny"), "euler")
    reference.load_lora_weights(str(loras["unet-kohya"].parent), weight_name="unet-kohya.safetensors", adapter_name="a")
    reference.load_lora_weights(
        str(loras["text-diffusers"].parent), weight_name="text-diffusers.safetensors", adapter_name="b"
    )
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    with torch.no_grad():
        expected = reference(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=SIZE, width=SIZE,
            generator=torch.Generator().manual_seed(SEED), output_type="pt",
        ).images  # fmt: skip
    assert psnr(both, expected) >= PARITY_DB


def test_printed_loras_are_one_short_line_naming_file_format_layers_hash_and_scale(pipe, loras):
    pipe.set_loras([(loras["unet-kohya"], 0.8)])
    try:
        (file, scale), text = pipe.loras[0], repr(pipe.loras)
    finally:
        pipe.set_loras([])
    assert "\n" not in text and len(text) < 200, text
    assert text == f"[LoraFile(unet-kohya.safetensors, kohya, {len(file.layers)} layers, {file.short_hash}) x 0.8]"
    assert len(file.layers) > 1 and len(file.short_hash) == 12 and scale == 0.8
    layer = next(iter(file.layers.values()))
    assert "\n" not in repr(layer) and f"rank {layer.rank}" in repr(layer)


def test_lora_for_another_model_is_refused_and_nothing_changes(pipe, tmp_path):
    base = generate(pipe)
    xl = load_preset("tiny-xl")
    path = save_lora(make_layers(xl, True, 5), tmp_path / "xl.safetensors", "kohya", unet=xl.unet)
    with pytest.raises(LoraError, match="SDXL"):
        pipe.set_loras([(path, 1.0)])
    assert pipe.loras == [] and torch.equal(generate(pipe), base)
    with pytest.raises(LoraError, match="does not exist"):
        pipe.set_loras([(tmp_path / "missing.safetensors", 1.0)])


SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"


def test_cli_lora_option_and_png_parameters(tiny_fp32, loras, tmp_path):
    from PIL import Image

    out = tmp_path / "lora.png"
    command = [SDTRT, "generate", str(tiny_fp32), PROMPT, "--steps", "2", "--seed", "1", "--size", "64x64"]
    done = subprocess.run(
        [*command, "--lora", f"{loras['text-kohya']}:0.8", "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    parameters = Image.open(out).info["parameters"]
    assert parameters.splitlines()[0] == f"{PROMPT} <lora:text-kohya:0.8>"
    assert 'Lora hashes: "text-kohya: ' in parameters
    bad = subprocess.run(
        [*command, "--lora", "nothing.safetensors:0.5", "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sdxl_lora_on_both_text_encoders_matches_diffusers(backend, tmp_path):
    """tiny-xl: a kohya LoRA on the UNet and both text encoders (lora_te1_ / lora_te2_) against diffusers' SDXL."""
    from sdtrt.export.onnx_export import ExportOptions, export_artifacts
    from sdtrt.export.profiles import default_profile

    xl = load_preset("tiny-xl")
    layers = make_layers(xl, True, 7)
    generator = torch.Generator().manual_seed(8)
    for path, child in xl.text_encoder_2.named_modules():
        if isinstance(child, torch.nn.Linear) and path.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            w = child.weight
            layers[("text_encoder_2", path)] = LoraLayer(
                torch.randn((4, w.shape[1]), generator=generator) * 0.3,
                torch.randn((w.shape[0], 4), generator=generator) * 0.3,
                2.0,
            )
    lora = save_lora(layers, tmp_path / "xl.safetensors", "kohya", unet=xl.unet)
    out = tmp_path / "xl"
    export_artifacts(
        xl,
        out,
        ExportOptions(
            profile=default_profile(xl), components=("text_encoder", "text_encoder_2", "unet", "vae_decoder")
        ),
    )
    reference = diffusers_pipeline(load_preset("tiny-xl"), "euler")
    reference.load_lora_weights(str(tmp_path), weight_name="xl.safetensors")
    reference.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        expected = reference(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=128, width=128,
            generator=torch.Generator().manual_seed(SEED), guidance_scale=5.0, output_type="pt",
        ).images  # fmt: skip
    with Pipeline.from_artifacts(out, backend=backend, device="cpu") as pipe:
        pipe.set_loras([(lora, 0.8)])
        ours = pipe(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, guidance_scale=5.0, scheduler="euler")
    value = psnr(ours.pixels, expected)
    print(f"{backend} SDXL LoRA (unet, te1, te2) vs diffusers: {value:.1f} dB")
    assert value >= PARITY_DB


def test_an_engine_refusing_its_update_puts_the_engines_before_it_back(tiny_bundle, loras):
    """apply gives each engine one WeightUpdate; when one refuses it, the engines already updated get the LoRAs they
    ran before (none here) again, and the LoRAs in use stay as they were."""
    from sdtrt.runtime.errors import BackendError
    from sdtrt.runtime.lora.apply import LoraState, apply, read_loras

    class Recording:
        def __init__(self, refuse: bool = False) -> None:
            self.refuse, self.deltas = refuse, []

        def update_weights(self, update) -> None:
            if self.refuse:
                raise BackendError("refused")
            self.deltas.append(dict(update.deltas))

    engines = {"text_encoder": Recording(), "unet": Recording(refuse=True)}
    state = LoraState(skeletons={"text_encoder": tiny_bundle.text_encoder, "unet": tiny_bundle.unet})
    files = read_loras(state, [(loras["text-kohya"], 1.0)])
    with pytest.raises(BackendError, match="refused"):
        apply(state, files, None, Path(), engines, "onnxruntime")
    assert [len(d) > 0 for d in engines["text_encoder"].deltas] == [True, False]
    assert state.active == []
