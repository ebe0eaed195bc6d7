"""Single-file SDXL checkpoints: exact round trips through the SGM layout, shipped configs, the two tokenizers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import sdtrt.runtime.models  # noqa: E402
from sdtrt.runtime.errors import SourceError  # noqa: E402
from sdtrt.runtime.models.presets import SHIPPED_CONFIG_NAMES, TINY_TEXT, shipped_config  # noqa: E402
from sdtrt.runtime.models.single_file import is_sdxl_state, save_original_checkpoint  # noqa: E402
from sdtrt.runtime.models.single_file_xl import (  # noqa: E402
    CLIP_L_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    load_sdxl_single_file,
    open_clip_to_sgm,
    save_sdxl_checkpoint,
    sdxl_tokenizers,
    unet_to_sgm,
    write_sdxl_config_dir,
)
from sdtrt.runtime.models.tokenizer import clip_vocab_and_merges  # noqa: E402
from sdtrt.runtime.prompts import PromptTokenizer  # noqa: E402

WIDTH_1, WIDTH_2, PROJECTION_2, TIME_DIM = 24, 40, 16, 8
TEXT_1 = {**TINY_TEXT, "hidden_size": WIDTH_1, "num_attention_heads": 4}
TEXT_2 = {
    **TINY_TEXT,
    "hidden_size": WIDTH_2,
    "intermediate_size": 48,
    "num_attention_heads": 5,
    "num_hidden_layers": 3,
    "hidden_act": "gelu",
    "projection_dim": PROJECTION_2,
    "pad_token_id": 0,
}
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": WIDTH_1 + WIDTH_2,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": PROJECTION_2 + 6 * TIME_DIM,
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
    "scaling_factor": 0.13025,
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("single-file loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_1))
        text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT_2))
        unet = diffusers.UNet2DConditionModel(**UNET)
        vae = diffusers.AutoencoderKL(**VAE)
    return tuple(m.eval().requires_grad_(False) for m in (text_encoder, text_encoder_2, unet, vae))


@pytest.fixture(scope="module")
def saved(tiny: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("single_file_xl")
    return save_sdxl_checkpoint(*tiny, root / "tiny.safetensors"), write_sdxl_config_dir(*tiny, root / "configs")


@pytest.fixture(scope="module")
def tensors(saved: tuple[Path, Path]) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(saved[0]))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_round_trip_is_exact(tiny: tuple, saved: tuple[Path, Path], no_network: None) -> None:
    loaded = load_sdxl_single_file(saved[0], config_dir=saved[1])
    assert [type(m).__name__ for m in loaded] == [
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "UNet2DConditionModel",
        "AutoencoderKL",
    ]
    for original, back in zip(tiny, loaded, strict=True):
        _same_state(original, back)
        assert not back.training
        assert all(
            not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in back.parameters()
        )


def test_loaded_modules_compute_the_same(tiny: tuple, saved: tuple[Path, Path]) -> None:
    (te, te2, unet, vae), (te_b, te2_b, unet_b, vae_b) = tiny, load_sdxl_single_file(saved[0], config_dir=saved[1])
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(0, 49406, (2, 9), generator=gen), torch.full((2, 1), 49407)], dim=1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(hidden, te_b(ids, output_hidden_states=True).hidden_states[-2])
        out_2, out_2b = te2(ids, output_hidden_states=True), te2_b(ids, output_hidden_states=True)
        assert torch.equal(out_2.text_embeds, out_2b.text_embeds)
        assert torch.equal(out_2.hidden_states[-2], out_2b.hidden_states[-2])
        context = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)
        extra = {"text_embeds": out_2.text_embeds, "time_ids": time_ids}
        sample = unet(latents, 10, context, added_cond_kwargs=extra).sample
        assert torch.equal(sample, unet_b(latents, 10, context, added_cond_kwargs=extra).sample)
        assert torch.equal(vae.decode(latents).sample, vae_b.decode(latents).sample)
        assert torch.equal(vae.encode(image).latent_dist.mean, vae_b.encode(image).latent_dist.mean)


def test_file_uses_sgm_names(tiny: tuple, tensors: dict[str, torch.Tensor]) -> None:
    assert is_sdxl_state(tensors)
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.3.0.op.weight",  # downsampler after the attention-free level
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",  # depth 2
        "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after a cross-attention level
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.bias",
        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight",
    ):
        assert key in tensors, key
    assert not any(".down_blocks." in k or "text_model" in k for k in tensors if k.startswith(OPENCLIP_PREFIX))
    # OpenCLIP keeps q, k, v fused and applies the projection as x @ P.
    layer = tiny[1].text_model.encoder.layers[1].self_attn
    fused = tensors[OPENCLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3 * WIDTH_2, WIDTH_2)
    assert torch.equal(fused[WIDTH_2 : 2 * WIDTH_2], layer.k_proj.weight)
    assert torch.equal(
        tensors[OPENCLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_bias"][-WIDTH_2:], layer.v_proj.bias
    )
    projection = tensors[OPENCLIP_PREFIX + "text_projection"]
    assert projection.shape == (WIDTH_2, PROJECTION_2)
    pooled = torch.randn(3, WIDTH_2)
    torch.testing.assert_close(pooled @ projection, tiny[1].text_projection(pooled))


def test_openclip_logit_scale_and_position_ids_are_ignored(tiny: tuple, tensors: dict, tmp_path: Path) -> None:
    # Real SDXL files carry OpenCLIP's logit_scale and CLIP-L's position_ids; neither is a weight to load.
    extra = {
        **tensors,
        OPENCLIP_PREFIX + "logit_scale": torch.tensor(4.6052),
        CLIP_L_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None].float(),
    }
    path = _save(extra, tmp_path / "real_like.safetensors")
    _same_state(tiny[1], load_sdxl_single_file(path, config_dir=write_sdxl_config_dir(*tiny, tmp_path / "c"))[1])


def test_sd1_checkpoint_is_refused(tiny: tuple, saved: tuple[Path, Path], tmp_path: Path) -> None:
    sd1_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT))
    sd1 = save_original_checkpoint(
        sd1_text,
        diffusers.UNet2DConditionModel(**{**UNET, "addition_embed_type": None}),
        tiny[3],
        tmp_path / "sd1.safetensors",
    )
    assert not is_sdxl_state(safetensors_torch.load_file(str(sd1)))
    with pytest.raises(
        SourceError,
        match=r"not look like an SDXL checkpoint: expected tensors under .*conditioner\.embedders\.1\.model\., "
        r"none under conditioner\.embedders\.0\.transformer\., conditioner\.embedders\.1\.model\. "
        r"\(found \d+ tensors, under .*cond_stage_model\.transformer\.\)\. It looks like an SD 1\.x checkpoint",
    ):
        load_sdxl_single_file(sd1, config_dir=saved[1])


def test_missing_second_encoder_is_refused(tensors: dict, saved: tuple[Path, Path], tmp_path: Path) -> None:
    cut = _save({k: v for k, v in tensors.items() if not k.startswith(OPENCLIP_PREFIX)}, tmp_path / "cut.safetensors")
    with pytest.raises(
        SourceError, match=r"none under conditioner\.embedders\.1\.model\. .*OpenCLIP ViT-bigG\) is missing"
    ):
        load_sdxl_single_file(cut, config_dir=saved[1])


def test_refiner_layout_is_named(tensors: dict, tmp_path: Path) -> None:
    refiner = {
        k.replace("embedders.1.", "embedders.0."): v for k, v in tensors.items() if not k.startswith(CLIP_L_PREFIX)
    }
    with pytest.raises(SourceError, match="SDXL refiner"):
        load_sdxl_single_file(_save(refiner, tmp_path / "refiner.safetensors"))


def test_sd15_config_folder_lacks_second_encoder(saved: tuple[Path, Path]) -> None:
    with pytest.raises(SourceError, match=r"lacks text_encoder_2/config\.json.*write_sdxl_config_dir"):
        load_sdxl_single_file(saved[0], config_dir=shipped_config("sd15"))


def test_config_mismatch_names_the_tensor(tiny: tuple, saved: tuple[Path, Path], tmp_path: Path) -> None:
    configs = write_sdxl_config_dir(*tiny, tmp_path / "wrong")
    config_2 = json.loads((configs / "text_encoder_2/config.json").read_text())
    (configs / "text_encoder_2/config.json").write_text(json.dumps({**config_2, "projection_dim": 8}))
    with pytest.raises(
        SourceError,
        match=r"text_encoder_2: conditioner\.embedders\.1\.model\.text_projection has shape \[16, 40\] in the "
        r"checkpoint but .*wrong/text_encoder_2/config\.json needs \[8, 40\] .*pass config_dir=",
    ):
        load_sdxl_single_file(saved[0], config_dir=configs)


def test_tiny_checkpoint_with_default_config_asks_for_a_config_folder(saved: tuple[Path, Path]) -> None:
    with pytest.raises(SourceError, match=r"sdxl/unet/config\.json.*pass config_dir=.*has shape \[[0-9, ]+\] in the"):
        load_sdxl_single_file(saved[0])


def test_missing_and_unexpected_weights_are_counted(tensors: dict, saved: tuple[Path, Path], tmp_path: Path) -> None:
    broken = {k: v for k, v in tensors.items() if ".resblocks.2.ln_2." not in k}
    broken[OPENCLIP_PREFIX + "transformer.resblocks.2.ls_1.gamma"] = torch.ones(WIDTH_2)
    with pytest.raises(
        SourceError,
        match=r"text_encoder_2: the weights under conditioner\.embedders\.1\.model\. do not match .*: 2 missing "
        r"\(e\.g\. text_model\.encoder\.layers\.2\.layer_norm2\.weight, .*\), 1 unexpected \(e\.g\. .*ls_1\.gamma\)",
    ):
        load_sdxl_single_file(_save(broken, tmp_path / "broken.safetensors"), config_dir=saved[1])


def test_mismatched_modules_are_not_written(tiny: tuple, tmp_path: Path) -> None:
    narrow = diffusers.UNet2DConditionModel(**{**UNET, "cross_attention_dim": WIDTH_2})
    with pytest.raises(SourceError, match=r"cross_attention_dim is 40.*must be 64"):
        save_sdxl_checkpoint(tiny[0], tiny[1], narrow, tiny[3], tmp_path / "x.safetensors")
    with pytest.raises(SourceError, match="without text_projection"):
        save_sdxl_checkpoint(tiny[0], tiny[0], tiny[2], tiny[3], tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def _config(folder: Path, sub: str) -> dict:
    return json.loads((folder / sub / "config.json").read_text())


@pytest.mark.parametrize("name", ["sdxl", "sdxl-turbo"])
def test_shipped_configs_describe_sdxl(name: str, no_network: None) -> None:
    folder = shipped_config(name)
    unet = diffusers.UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
    assert unet["cross_attention_dim"] == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["projection_class_embeddings_input_dim"] == 2816 == 1280 + 6 * unet["addition_time_embed_dim"]
    assert unet["addition_embed_type"] == "text_time" and unet["attention_head_dim"] == [5, 10, 20]
    assert unet["sample_size"] == {"sdxl": 128, "sdxl-turbo": 64}[name]
    vae = diffusers.AutoencoderKL.load_config(str(folder), subfolder="vae", local_files_only=True)
    assert vae["scaling_factor"] == 0.13025 and vae["block_out_channels"] == [128, 256, 512, 512]
    clip_l = transformers.CLIPTextConfig.from_json_file(str(folder / "text_encoder/config.json"))
    assert (clip_l.hidden_size, clip_l.num_hidden_layers, clip_l.hidden_act) == (768, 12, "quick_gelu")
    big_g = transformers.CLIPTextConfig.from_json_file(str(folder / "text_encoder_2/config.json"))
    assert (big_g.hidden_size, big_g.num_hidden_layers, big_g.projection_dim) == (1280, 32, 1280)
    assert (big_g.num_attention_heads, big_g.intermediate_size, big_g.hidden_act) == (20, 5120, "gelu")
    assert clip_l.hidden_size + big_g.hidden_size == unet["cross_attention_dim"]
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"][1] == scheduler["_class_name"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    expected = {
        "sdxl": ("EulerDiscreteScheduler", "leading"),
        "sdxl-turbo": ("EulerAncestralDiscreteScheduler", "trailing"),
    }
    assert (scheduler["_class_name"], scheduler["timestep_spacing"]) == expected[name]
    assert getattr(diffusers, scheduler["_class_name"]).from_config(scheduler).config.beta_schedule == "scaled_linear"


def test_shipped_configs_are_the_known_paths() -> None:
    root = Path(sdtrt.runtime.models.__file__).parent / "configs"
    assert shipped_config("sdxl") == root / "sdxl" and shipped_config("sdxl-turbo") == root / "sdxl-turbo"
    assert shipped_config("sd15") == root / "sd15"
    assert all((shipped_config(name) / "model_index.json").is_file() for name in SHIPPED_CONFIG_NAMES)


def test_sdxl_sized_names_match_the_original_layout() -> None:
    # Built on the meta device: the real 2.6B UNet and 700M encoder, without allocating them.
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(_config(shipped_config("sdxl"), "unet"))
        big_g = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig.from_json_file(str(shipped_config("sdxl") / "text_encoder_2/config.json"))
        )
    unet_keys, big_g_keys = unet_to_sgm(unet), open_clip_to_sgm(big_g)
    # sd_xl_base_1.0.safetensors holds 1680 UNet tensors and 390 OpenCLIP ones (logit_scale is not written).
    assert (len(unet_keys), len(big_g_keys)) == (1680, 389)
    for key in (
        "input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight",
        "middle_block.1.transformer_blocks.9.norm3.bias",
        "output_blocks.2.1.transformer_blocks.9.ff.net.0.proj.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "label_emb.0.0.weight",
    ):
        assert key in unet_keys, key
    assert unet_keys["label_emb.0.0.weight"].shape == (1280, 2816)
    assert big_g_keys["transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert big_g_keys["text_projection"].shape == (1280, 1280)
    # diffusers' own converter turns these names back into exactly the UNet's weights.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet_keys.items()}, unet.config)
    assert converted.keys() == unet.state_dict().keys()


PROMPTS = [
    "a photo of a cat",
    "",
    "  An ASTRONAUT riding a horse, 4k ",
    "don't stop: 12 cats & 3 dogs",
    " ".join(["cat"] * 100),
]


@pytest.fixture(scope="module")
def hf_tokenizers() -> tuple:
    vocab, merges = clip_vocab_and_merges()
    return (
        transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges)),
        transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!"),
    )


def test_tokenizers_match_transformers(hf_tokenizers: tuple) -> None:
    ours = [PromptTokenizer(t) for t in sdxl_tokenizers()]
    assert (ours[0].pad_id, ours[1].pad_id) == (49407, 0)
    for prompt in PROMPTS:
        for tokenizer, reference in zip(ours, hf_tokenizers, strict=True):
            expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert tokenizer.encode([prompt]).tolist() == [expected], prompt
    assert ours[1].encode([""]).tolist() == [[49406, 49407] + [0] * 75]


def test_exclamation_marks_in_a_prompt_stay_text(hf_tokenizers: tuple) -> None:
    # transformers makes the pad token "!" a special token, so a prompt's "!!!" becomes three pads (id 0).
    # OpenCLIP, which SDXL was trained with, reads it as the word "!!!" (id 995); so does the second tokenizer.
    first, second = (PromptTokenizer(t) for t in sdxl_tokenizers())
    prompt = "wow!!!"
    ours = second.encode([prompt])[0].tolist()
    assert ours[:4] == [49406, 2781, 995, 49407] and ours[4:] == [0] * 73
    assert ours[:4] == first.encode([prompt])[0, :4].tolist()
    assert hf_tokenizers[1](prompt).input_ids == [49406, 2781, 0, 0, 0, 49407]
