"""Single-file SD 1.x checkpoints: exact round trips through the original layout, and clear refusals."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import sdtrt.runtime.models  # noqa: E402
from sdtrt.runtime.errors import SourceError  # noqa: E402
from sdtrt.runtime.files import checkpoint_format  # noqa: E402
from sdtrt.runtime.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, shipped_config  # noqa: E402
from sdtrt.runtime.models.single_file import (  # noqa: E402
    VAE_PREFIX,
    load_diffusers_model,
    load_single_file,
    save_original_checkpoint,
    unet_to_ldm,
    vae_to_ldm,
    write_config_dir,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("single-file loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT))
        unet = diffusers.UNet2DConditionModel(**TINY_UNET)
        vae = diffusers.AutoencoderKL(**TINY_VAE)
    return tuple(m.eval().requires_grad_(False) for m in (text_encoder, unet, vae))


@pytest.fixture(scope="module")
def saved(tiny: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("single_file")
    checkpoint = save_original_checkpoint(*tiny, root / "tiny.safetensors")
    configs = write_config_dir(*tiny, root / "configs")
    return checkpoint, configs


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_is_exact(tiny: tuple, saved: tuple[Path, Path], no_network: None) -> None:
    loaded = load_single_file(saved[0], config_dir=saved[1])
    for original, back in zip(tiny, loaded, strict=True):
        _same_state(original, back)
        assert not back.training
        assert all(
            not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in back.parameters()
        )
    (te, unet, vae), (te2, unet2, vae2) = tiny, loaded
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_TEXT["vocab_size"], (1, 7), generator=gen)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, te2(ids).last_hidden_state)
        context = te(ids).last_hidden_state
        assert torch.equal(unet(latents, 10, context).sample, unet2(latents, 10, context).sample)
        assert torch.equal(vae.decode(latents).sample, vae2.decode(latents).sample)
        assert torch.equal(vae.encode(image).latent_dist.mean, vae2.encode(image).latent_dist.mean)


def test_file_uses_original_names(saved: tuple[Path, Path]) -> None:
    tensors = safetensors_torch.load_file(str(saved[0]))
    assert checkpoint_format(saved[0]) == "safetensors"
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in tensors  # downsampler of level 0
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in tensors  # upsampler after UpBlock2D
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in tensors
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert tensors["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape[2:] == (1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    assert not any(
        k.startswith(("model.diffusion_model.down_blocks", "first_stage_model.decoder.up_blocks")) for k in tensors
    )


def test_sd15_shaped_names_match_the_original_layout() -> None:
    accelerate = pytest.importorskip("accelerate")
    import json

    with accelerate.init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(
            json.loads((shipped_config("sd15") / "unet/config.json").read_text())
        )
        vae = diffusers.AutoencoderKL.from_config(json.loads((shipped_config("sd15") / "vae/config.json").read_text()))
    unet_keys, vae_keys = unet_to_ldm(unet), vae_to_ldm(vae)
    assert (len(unet_keys), len(vae_keys)) == (686, 248)  # the tensor counts of SD 1.5's original checkpoint
    for key in (
        "input_blocks.9.0.op.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.8.2.conv.weight",
        "middle_block.2.out_layers.3.weight",
        "input_blocks.4.0.skip_connection.weight",
    ):
        assert key in unet_keys
    assert vae_keys["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in vae_keys and "decoder.up.0.upsample.conv.weight" not in vae_keys


def test_half_precision_checkpoint_loads_as_fp32(saved: tuple[Path, Path], tmp_path: Path) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in safetensors_torch.load_file(str(saved[0])).items()}
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file(half, str(path))
    for module in load_single_file(path, config_dir=saved[1]):
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_pickle_renamed_safetensors_is_refused(tiny: tuple, saved: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torch.save(safetensors_torch.load_file(str(saved[0])), path)
    assert checkpoint_format(path) == "pickle"
    with pytest.raises(SourceError, match=r"pickle can execute code.*safetensors.*--allow-pickle"):
        load_single_file(path, config_dir=saved[1])
    # Allowed, it is still read as the pickle it is, whatever its name says.
    _same_state(tiny[1], load_single_file(path, config_dir=saved[1], allow_pickle=True)[1])


def test_legacy_pickle_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"a": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    assert checkpoint_format(path) == "pickle"


def test_allow_pickle_loads_nested_state_dict(tiny: tuple, saved: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": safetensors_torch.load_file(str(saved[0])), "global_step": 7}, path)
    for original, back in zip(tiny, load_single_file(path, config_dir=saved[1], allow_pickle=True), strict=True):
        _same_state(original, back)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(SourceError, match="is a folder"):
        checkpoint_format(tmp_path)


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(range(1, 200)))
    with pytest.raises(SourceError, match=r"starting with .*expected a \.safetensors checkpoint"):
        load_single_file(path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(SourceError, match="empty file"):
        checkpoint_format(tmp_path / "empty.ckpt")


def test_unrelated_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    safetensors_torch.save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(
        SourceError, match=r"not look like an SD 1\.x checkpoint: no keys under model\.diffusion_model\."
    ):
        load_single_file(path)


def test_tiny_checkpoint_with_default_config_asks_for_a_config_folder(saved: tuple[Path, Path]) -> None:
    assert shipped_config("sd15") == Path(sdtrt.runtime.models.__file__).parent / "configs" / "sd15"
    with pytest.raises(
        SourceError,
        match=r"sd15/unet/config\.json.*pass config_dir=.*has shape \[[0-9, ]+\] in the checkpoint",
    ):
        load_single_file(saved[0])


def test_incomplete_config_folder(saved: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(SourceError, match=r"lacks .*vae/config\.json"):
        load_single_file(saved[0], config_dir=tmp_path)


def test_non_sd1_unet_cannot_be_written(tiny: tuple, tmp_path: Path) -> None:
    unet = diffusers.UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=4)
    with pytest.raises(SourceError, match=r"time_embedding\.cond_proj.*no place in the SD 1\.x"):
        save_original_checkpoint(tiny[0], unet, tiny[2], tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_shipped_sd15_vae_config_loads_offline(no_network: None) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL.from_config(
            diffusers.AutoencoderKL.load_config(str(shipped_config("sd15")), subfolder="vae", local_files_only=True)
        )
    state = {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()}
    loaded = load_diffusers_model(diffusers.AutoencoderKL, state, shipped_config("sd15"), "vae", VAE_PREFIX)
    _same_state(vae, loaded)


def test_deeper_unet_round_trips(tiny: tuple, tmp_path: Path) -> None:
    # Two layers per block and attention + upsampler in one up level (LDM puts that upsampler in slot 2).
    config = {
        **TINY_UNET,
        "block_out_channels": [32, 32, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = diffusers.UNet2DConditionModel(**config).eval()
    path = save_original_checkpoint(tiny[0], unet, tiny[2], tmp_path / "deep.safetensors")
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in safetensors_torch.load_file(str(path))
    configs = write_config_dir(tiny[0], unet, tiny[2], tmp_path / "configs")
    _same_state(unet, load_single_file(path, config_dir=configs)[1])
