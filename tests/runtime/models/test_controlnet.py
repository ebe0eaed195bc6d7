"""ControlNet sources: every file layout loads to the same residuals, families are told apart, bad files refused."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdtrt.runtime.errors import SourceError  # noqa: E402
from sdtrt.runtime.models.controlnet import (  # noqa: E402
    CONTROL_PREFIX,
    FAMILY_CONFIGS,
    TINY_HINT_CHANNELS,
    ControlNetShape,
    ControlNetSource,
    check_controlnet_family,
    controlnet_family,
    controlnet_from_unet,
    controlnet_to_original,
    load_controlnet,
    peek_controlnet,
    reload_controlnet,
    save_original_controlnet,
)
from sdtrt.runtime.models.presets import (  # noqa: E402
    SHIPPED_CONTROLNET_CONFIG_NAMES,
    config_folder,
    load_preset,
    shipped_config,
)
from sdtrt.runtime.models.single_file import save_original_checkpoint  # noqa: E402


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ControlNet loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny() -> object:
    return load_preset("tiny")


@pytest.fixture(scope="module")
def tiny_xl() -> object:
    return load_preset("tiny-xl")


@pytest.fixture(scope="module")
def controlnet(tiny: object) -> torch.nn.Module:
    return controlnet_from_unet(tiny.unet, seed=1, hint_channels=TINY_HINT_CHANNELS)


@pytest.fixture(scope="module")
def controlnet_xl(tiny_xl: object) -> torch.nn.Module:
    return controlnet_from_unet(tiny_xl.unet, seed=2, hint_channels=TINY_HINT_CHANNELS)


@pytest.fixture(scope="module")
def files(controlnet: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny ControlNet in every layout, and a folder with only its config (for single files)."""
    root = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(root / "control_tiny_folder", safe_serialization=True)
    config = root / "config"
    config.mkdir()
    (config / "config.json").write_text(controlnet.to_json_string())
    diffusers_file = root / "control_tiny_diffusers.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, diffusers_file)
    return {
        "folder": root / "control_tiny_folder",
        "diffusers_file": diffusers_file,
        "original": save_original_controlnet(controlnet, root / "control_v11p_tiny_canny.safetensors"),
        "bare": save_original_controlnet(controlnet, root / "control_bare.safetensors", prefix=False),
        "config": config,
    }


def _inputs(model: torch.nn.Module, xl: bool) -> dict[str, object]:
    generator = torch.Generator().manual_seed(3)
    config = model.config
    inputs: dict[str, object] = {
        "sample": torch.randn(2, config.in_channels, 8, 8, generator=generator),
        "timestep": torch.tensor([500.0, 20.0]),
        "encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim, generator=generator),
        "controlnet_cond": torch.rand(2, 3, 64, 64, generator=generator),
        "conditioning_scale": 1.0,
        "return_dict": False,
    }
    if xl:
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        text_embeds = torch.randn(2, width, generator=generator)
        inputs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    return inputs


def _residuals(model: torch.nn.Module, xl: bool = False) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = model(**_inputs(model, xl))
    return [*down, mid]


def _assert_same_residuals(loaded: torch.nn.Module, original: torch.nn.Module, xl: bool = False) -> None:
    want, got = _residuals(original, xl), _residuals(loaded, xl)
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max().item() < 1e-6


def test_fixtures_change_every_residual(controlnet: torch.nn.Module, controlnet_xl: torch.nn.Module) -> None:
    # diffusers starts the zero convolutions at zero: a ControlNet that outputs zeros would pass every test below.
    for model, xl in ((controlnet, False), (controlnet_xl, True)):
        for residual in _residuals(model, xl):
            assert residual.abs().max() > 1e-3 and (residual != 0).float().mean() > 0.5


@pytest.mark.parametrize("layout", ["folder", "diffusers_file", "original", "bare"])
def test_every_layout_loads_the_same_controlnet(
    layout: str, files: dict[str, Path], controlnet: torch.nn.Module, no_network: None
) -> None:
    config = None if layout == "folder" else files["config"]
    loaded = load_controlnet(files[layout], config_dir=config)
    assert isinstance(loaded, ControlNetSource)
    assert loaded.family == "sd1" and loaded.cross_attention_dim == 32
    assert loaded.format == {"folder": "diffusers_folder", "diffusers_file": "diffusers_file"}.get(
        layout, "original_file"
    )
    assert loaded.residual_count == len(_residuals(controlnet)) == 5  # 4 down + 1 mid
    assert not loaded.model.training and all(p.dtype == torch.float32 for p in loaded.model.parameters())
    _assert_same_residuals(loaded.model, controlnet)
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_names_and_sources(files: dict[str, Path]) -> None:
    original = load_controlnet(files["original"], config_dir=files["config"])
    assert original.name == "control_v11p_tiny_canny"
    source = original.source
    assert source["format"] == "original_file" and source["family"] == "sd1"
    assert source["path"] == str(files["original"].resolve()) and len(source["sha256"]) == 64
    assert source["config_dir"] == str(files["config"].resolve())
    folder = load_controlnet(files["folder"])
    assert folder.name == "control_tiny_folder" and folder.config_dir is None
    again = reload_controlnet(json.loads(json.dumps(source)))
    assert again.sha256 == original.sha256


def test_original_layout_has_the_cldm_names(controlnet: torch.nn.Module, files: dict[str, Path]) -> None:
    keys = set(safetensors_torch.load_file(files["original"]))
    assert all(k.startswith(CONTROL_PREFIX) for k in keys)
    # tiny: hint encoder of 4 levels (conv_in, 6 blocks, conv_out), 2 levels of 1 layer each, 4 zero convs
    for name in (
        "input_hint_block.0.weight",
        "input_hint_block.12.weight",
        "input_hint_block.14.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.2.0.op.weight",
        "input_blocks.3.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.bias",
        "zero_convs.3.0.weight",
        "middle_block_out.0.bias",
        "time_embed.2.weight",
    ):
        assert CONTROL_PREFIX + name in keys, name
    assert not any(k.startswith(CONTROL_PREFIX + "zero_convs.4") or "input_hint_block.16" in k for k in keys)
    assert len(keys) == len(controlnet.state_dict())
    assert set(safetensors_torch.load_file(files["bare"])) == {k[len(CONTROL_PREFIX) :] for k in keys}


@pytest.mark.parametrize("fixture", ["controlnet", "controlnet_xl"])
def test_original_layout_is_what_diffusers_converts(fixture: str, request: pytest.FixtureRequest) -> None:
    # diffusers' own converter for original-layout files reads ours back to the same diffusers weights.
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    model = request.getfixturevalue(fixture)
    original = {CONTROL_PREFIX + k: v for k, v in controlnet_to_original(model).items()}
    converted = single_file_utils.convert_controlnet_checkpoint(original, dict(model.config))
    state = model.state_dict()
    # diffusers' converter leaves out SDXL's size/crop embedding (label_emb -> add_embedding), mapped as in the UNet.
    left_out = {k for k in state if k.startswith("add_embedding.")}
    assert bool(left_out) == (fixture == "controlnet_xl")
    assert set(converted) == set(state) - left_out
    assert all(converted[k] is not None and torch.equal(converted[k], state[k]) for k in converted)


def test_sdxl_controlnet_round_trips(controlnet_xl: torch.nn.Module, tmp_path: Path, no_network: None) -> None:
    (tmp_path / "config.json").write_text(controlnet_xl.to_json_string())
    path = save_original_controlnet(controlnet_xl, tmp_path / "control_xl.safetensors")
    keys = set(safetensors_torch.load_file(path))
    assert {CONTROL_PREFIX + "label_emb.0.0.weight", CONTROL_PREFIX + "label_emb.0.2.bias"} <= keys
    loaded = load_controlnet(path, config_dir=tmp_path)
    assert loaded.family == "sdxl" and loaded.cross_attention_dim == 64
    _assert_same_residuals(loaded.model, controlnet_xl, xl=True)


def test_family_checks(files: dict[str, Path], controlnet_xl: torch.nn.Module, tiny: object, tiny_xl: object) -> None:
    sd1 = load_controlnet(files["folder"])
    check_controlnet_family(sd1, tiny.model)
    check_controlnet_family(sd1, tiny)
    check_controlnet_family(sd1, "sd1")
    xl = ControlNetSource("control_xl", "sdxl", 64, controlnet_xl, Path("x"), "0" * 64, "diffusers_folder")
    check_controlnet_family(xl, tiny_xl.model)
    with pytest.raises(SourceError, match=r"an SDXL ControlNet \(cross-attention 64\) on an SD 1.x model \(32\): "):
        check_controlnet_family(xl, tiny.model)
    with pytest.raises(SourceError, match=r"an SD 1.x ControlNet \(cross-attention 32\) on an SDXL model \(64\)"):
        check_controlnet_family(sd1, tiny_xl)
    with pytest.raises(SourceError, match="use a ControlNet for SD 2.x"):
        check_controlnet_family(sd1, "sd2")
    with pytest.raises(SourceError, match="attends to 32-wide text .* but the SD 1.x model has 768"):
        check_controlnet_family(sd1, load_preset_info("sd15-random"))


def load_preset_info(name: str) -> object:
    # The configs alone: sd15-random's ModelInfo without building its 860 M-parameter UNet.
    from sdtrt.runtime.models.bundle import model_info
    from sdtrt.runtime.models.presets import preset_configs

    text, unet, vae, scheduler = preset_configs(name)
    with torch.device("meta"):
        modules = (
            pytest.importorskip("transformers").CLIPTextModel(
                pytest.importorskip("transformers").CLIPTextConfig(**text)
            ),
            diffusers.UNet2DConditionModel(**unet),
            diffusers.AutoencoderKL(**vae),
        )
    return model_info(*modules, scheduler)


def test_peek_reads_the_family_from_the_header(
    files: dict[str, Path], controlnet_xl: torch.nn.Module, tiny: object, tiny_xl: object, tmp_path: Path
) -> None:
    want = ControlNetShape("control_v11p_tiny_canny", "sd1", 32, 4)
    assert (
        peek_controlnet(files["original"])
        == want
        == load_controlnet(files["original"], config_dir=files["config"]).shape
    )
    assert peek_controlnet(files["bare"]).family == peek_controlnet(files["diffusers_file"]).family == "sd1"
    assert peek_controlnet(files["folder"]) == ControlNetShape("control_tiny_folder", "sd1", 32, 4)
    xl_file = save_original_controlnet(controlnet_xl, tmp_path / "control_xl.safetensors")
    xl = peek_controlnet(xl_file)
    assert xl == ControlNetShape("control_xl", "sdxl", 64, 4)
    check_controlnet_family(xl, tiny_xl)
    with pytest.raises(SourceError, match=r"control_xl: an SDXL ControlNet \(cross-attention 64\) on an SD 1.x model"):
        check_controlnet_family(xl, tiny)
    pickled = tmp_path / "control.pt"
    torch.save(safetensors_torch.load_file(files["original"]), pickled)
    with pytest.raises(SourceError, match="is a pickle checkpoint"):
        peek_controlnet(pickled)
    assert peek_controlnet(pickled, allow_pickle=True).family == "sd1"


def test_family_from_shapes() -> None:
    def state(width: int, xl: bool = False, original: bool = False) -> dict[str, torch.Tensor]:
        attention = "input_blocks.1.1" if original else "down_blocks.0.attentions.0"
        out = {f"{attention}.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, width)}
        if xl:
            out["label_emb.0.0.weight" if original else "add_embedding.linear_1.weight"] = torch.zeros(4, 4)
        return out

    assert controlnet_family(state(768)) == ("sd1", 768)
    assert controlnet_family(state(1024, original=True)) == ("sd2", 1024)
    assert controlnet_family(state(2048, xl=True)) == ("sdxl", 2048)
    assert controlnet_family(state(2048, xl=True, original=True)) == ("sdxl", 2048)
    with pytest.raises(SourceError, match="no cross-attention weights"):
        controlnet_family({"conv_in.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["controlnet-sd15", "controlnet-sd21", "controlnet-sdxl"])
def test_shipped_configs_map_to_the_original_layout(name: str) -> None:
    config = json.loads((shipped_config(name) / "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    names = controlnet_to_original(model)
    # SD 1.x/2.x: 12 down residuals (zero_convs.0-11) + the middle one; SDXL: 9 + 1. Hint encoder ends at 14.
    zero_convs = 9 if name == "controlnet-sdxl" else 12
    assert f"zero_convs.{zero_convs - 1}.0.weight" in names and f"zero_convs.{zero_convs}.0.weight" not in names
    assert {"input_hint_block.14.weight", "middle_block_out.0.weight", "input_blocks.0.0.weight"} <= set(names)
    assert ("label_emb.0.0.weight" in names) == (name == "controlnet-sdxl")
    widths = {v.shape[1] for k, v in names.items() if k.endswith("attn2.to_k.weight")}
    assert widths == {{"controlnet-sd15": 768, "controlnet-sd21": 1024, "controlnet-sdxl": 2048}[name]}
    family = controlnet_family(names)[0]
    assert family == {"controlnet-sd15": "sd1", "controlnet-sd21": "sd2", "controlnet-sdxl": "sdxl"}[name]


# Names and shapes from lllyasviel's control_v11p_sd15_canny (340 tensors under control_model.).
V11_CANNY = {
    "time_embed.0.weight": (1280, 320),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "zero_convs.4.0.weight": (640, 640, 1, 1),
    "zero_convs.11.0.bias": (1280,),
    "input_hint_block.0.weight": (16, 3, 3, 3),
    "input_hint_block.8.weight": (96, 32, 3, 3),
    "input_hint_block.12.weight": (256, 96, 3, 3),
    "input_hint_block.14.weight": (320, 256, 3, 3),
    "middle_block.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "middle_block.2.emb_layers.1.weight": (1280, 1280),
    "middle_block_out.0.weight": (1280, 1280, 1, 1),
}


def test_shipped_controlnet_configs_are_not_model_configs() -> None:
    assert set(SHIPPED_CONTROLNET_CONFIG_NAMES) == set(FAMILY_CONFIGS.values())
    for name in SHIPPED_CONTROLNET_CONFIG_NAMES:
        assert (shipped_config(name) / "config.json").is_file()
    with pytest.raises(SourceError, match="neither a shipped config"):
        config_folder("controlnet-sd15", "sd15")  # a model's --config-dir needs a whole pipeline folder


def test_shipped_sd15_config_gives_the_v11_file_layout() -> None:
    config = json.loads((shipped_config("controlnet-sd15") / "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    names = controlnet_to_original(model)
    assert len(names) == 340
    assert {k: tuple(names[k].shape) for k in V11_CANNY} == V11_CANNY


@pytest.mark.parametrize("model_config", ["sd15", "sdxl"])
def test_shipped_configs_fit_the_shipped_unets(model_config: str) -> None:
    # A ControlNet copies its UNet's encoder: the shipped ControlNet config must give the same weights.
    unet_config = json.loads((shipped_config(model_config) / "unet" / "config.json").read_text())
    name = {"sd15": "controlnet-sd15", "sdxl": "controlnet-sdxl"}[model_config]
    config = json.loads((shipped_config(name) / "config.json").read_text())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        from_unet = diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        shipped = diffusers.ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in from_unet.state_dict().items()}
    assert want == {k: tuple(v.shape) for k, v in shipped.state_dict().items()}


def test_tiny_file_with_the_shipped_config_names_the_difference(files: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match=r"do not fit .*controlnet-sd15/config.json: \d+ missing .* unknown"):
        load_controlnet(files["original"])


def test_pickle_refused(controlnet: torch.nn.Module, files: dict[str, Path], tmp_path: Path) -> None:
    original = safetensors_torch.load_file(files["original"])
    path = tmp_path / "control_pickled.ckpt"
    torch.save({"state_dict": original}, path)
    with pytest.raises(SourceError, match="is a pickle checkpoint.*allow_pickle=True"):
        load_controlnet(path, config_dir=files["config"])
    loaded = load_controlnet(path, config_dir=files["config"], allow_pickle=True)
    assert loaded.allow_pickle and loaded.source["allow_pickle"]
    _assert_same_residuals(loaded.model, controlnet)
    folder = tmp_path / "pickled_folder"
    controlnet.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(SourceError, match="is a pickle checkpoint"):
        load_controlnet(folder)
    _assert_same_residuals(load_controlnet(folder, allow_pickle=True).model, controlnet)


def test_sd_checkpoint_is_not_a_controlnet(tiny: object, tmp_path: Path) -> None:
    path = save_original_checkpoint(tiny.text_encoder, tiny.unet, tiny.vae, tmp_path / "model.safetensors")
    with pytest.raises(SourceError, match=r"is not a ControlNet: it is an SD model checkpoint \(a UNet under model"):
        load_controlnet(path)
    unet_file = tmp_path / "unet.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tiny.unet.state_dict().items()}, unet_file)
    with pytest.raises(SourceError, match="is not a ControlNet: it is a diffusers UNet's weights"):
        load_controlnet(unet_file)
    control_lora = tmp_path / "control-lora-canny-rank128.safetensors"
    safetensors_torch.save_file(
        {"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(1)}, control_lora
    )
    with pytest.raises(SourceError, match="is a Control-LoRA .* not supported; give a full ControlNet"):
        load_controlnet(control_lora)


def test_folders_that_are_not_controlnets(tiny: object, tmp_path: Path) -> None:
    tiny.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(SourceError, match="describes a UNet2DConditionModel; expected a ControlNetModel folder"):
        load_controlnet(tmp_path / "unet")
    pipeline = tmp_path / "pipeline"
    (pipeline / "controlnet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "controlnet" / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="is a diffusers pipeline folder .*give its controlnet/ subfolder"):
        load_controlnet(pipeline)
    with pytest.raises(SourceError, match="does not exist; expected a diffusers ControlNet folder"):
        load_controlnet(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(SourceError, match="has a config.json but no weights"):
        load_controlnet(tmp_path / "empty")


def test_folder_whose_config_does_not_fit_its_weights(
    files: dict[str, Path], controlnet_xl: torch.nn.Module, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (files["folder"] / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    (folder / "config.json").write_text(controlnet_xl.to_json_string())
    with pytest.raises(SourceError, match="unknown .*config.json and weights come from different models"):
        load_controlnet(folder)


def test_missing_and_unknown_keys_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    state = safetensors_torch.load_file(files["original"])
    del state[CONTROL_PREFIX + "zero_convs.2.0.weight"]
    state[CONTROL_PREFIX + "zero_convs.9.0.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    safetensors_torch.save_file(state, path)
    with pytest.raises(SourceError, match=r"1 missing \(e.g. zero_convs.2.0.weight\), 1 unknown \(e.g. zero_convs.9"):
        load_controlnet(path, config_dir=files["config"])
    state = safetensors_torch.load_file(files["original"])
    state[CONTROL_PREFIX + "middle_block_out.0.weight"] = torch.zeros(3, 3, 1, 1)
    safetensors_torch.save_file(state, path)
    with pytest.raises(SourceError, match=r"middle_block_out.0.weight has shape \[3, 3, 1, 1\] but .* needs \[64, 64"):
        load_controlnet(path, config_dir=files["config"])


def test_bad_config_dir(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="neither a shipped ControlNet config .* nor a folder with a config.json"):
        load_controlnet(files["original"], config_dir=tmp_path)
    with pytest.raises(SourceError, match="do not fit .*controlnet-sdxl"):
        load_controlnet(files["original"], config_dir="controlnet-sdxl")
