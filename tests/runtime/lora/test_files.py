"""LoRA files: three spellings give the deltas they were built from, diffusers' own fuse_lora agrees, refusals
are clear."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdtrt.runtime.errors import LoraError  # noqa: E402
from sdtrt.runtime.lora.files import LORA_COMPONENTS, LoraFile, LoraLayer, read_lora  # noqa: E402
from sdtrt.runtime.lora.match import lora_deltas, lora_family  # noqa: E402
from sdtrt.runtime.lora.write import save_lora  # noqa: E402
from sdtrt.runtime.models.presets import load_preset  # noqa: E402

SCALE = 0.7
# UNet layers a LoRA touches: attention projections in every kind of block, 1x1 and 3x3 convs, the embedding MLPs
# and the down/upsamplers (whose SGM numbers depend on whether the level has attention).
UNET_PATHS = {
    "tiny": (
        "conv_in",
        "time_embedding.linear_1",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    ),
    "tiny-xl": (
        "conv_in",
        "time_embedding.linear_1",
        "add_embedding.linear_2",
        "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1.attentions.0.proj_in",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.1.attn1.to_q",
        "mid_block.resnets.1.time_emb_proj",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "up_blocks.0.resnets.1.conv1",
        "up_blocks.0.upsamplers.0.conv",
    ),
}
TEXT_SUFFIXES = {
    "text_encoder": ("layers.0.self_attn.q_proj", "layers.1.self_attn.out_proj", "layers.0.mlp.fc1"),
    "text_encoder_2": ("layers.0.self_attn.v_proj", "layers.1.self_attn.out_proj", "layers.1.mlp.fc2"),
}


@pytest.fixture(scope="module")
def bundles() -> dict:
    return {name: load_preset(name) for name in ("tiny", "tiny-xl")}


def _modules(bundle) -> dict[str, torch.nn.Module]:
    return {c: getattr(bundle, c) for c in LORA_COMPONENTS if getattr(bundle, c) is not None}


def _paths(bundle, name: str) -> list[tuple[str, str]]:
    out = [("unet", p) for p in UNET_PATHS[name]]
    for component, suffixes in TEXT_SUFFIXES.items():
        module = getattr(bundle, component)
        if module is not None:
            names = [n for n, _ in module.named_modules()]
            out += [(component, next(n for n in names if n.endswith(s))) for s in suffixes]
    return out


def _random_layer(weight: torch.Tensor, rank: int, alpha: float | None, gen: torch.Generator) -> LoraLayer:
    if weight.ndim == 4:  # LoCon: the kernel lives in down, up is 1x1
        down = torch.randn(rank, *weight.shape[1:], generator=gen) * 0.1
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(rank, weight.shape[1], generator=gen) * 0.1
        up = torch.randn(weight.shape[0], rank, generator=gen) * 0.1
    return LoraLayer(down, up, alpha)


def _build(bundle, name: str, seed: int = 0, alphas: str = "mixed") -> dict[tuple[str, str], LoraLayer]:
    """Random layers over ``_paths``. ``mixed``: ranks 2-4, alphas None/2/1/4 in turn. ``uniform``: kohya as
    trainers write it (one alpha for the Linear layers, another for the convs), the case diffusers handles."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (component, path) in enumerate(_paths(bundle, name)):
        weight = getattr(bundle, component).get_submodule(path).weight
        if alphas == "mixed":
            alpha = (None, 2.0, 1.0, 4.0)[i % 4]
        else:
            alpha = 1.0 if weight.ndim == 4 else 2.0
        layers[(component, path)] = _random_layer(weight, 2 + i % 3, alpha, gen)
    return layers


def _expected(layers, scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """The deltas, computed apart from the module's code: einsum for convs, alpha / rank by hand."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (component, path), layer in layers.items():
        rank = layer.down.shape[0]
        factor = scale * (rank if layer.alpha is None else layer.alpha) / rank
        if layer.down.ndim == 4:
            delta = torch.einsum("or,rikl->oikl", layer.up[:, :, 0, 0], layer.down)
        else:
            delta = layer.up @ layer.down
        out.setdefault(component, {})[f"{path}.weight"] = factor * delta
    return out


def _assert_deltas(got, want, atol: float = 1e-7) -> None:
    assert got.keys() == want.keys()
    for component in want:
        assert got[component].keys() == want[component].keys(), component
        for key, value in want[component].items():
            assert got[component][key].dtype == torch.float32
            torch.testing.assert_close(got[component][key], value, atol=atol, rtol=1e-6, msg=f"{component} {key}")


def _write(layers, path: Path, spelling: str, bundle) -> Path:
    if spelling == "diffusers":
        return save_lora(layers, path, "diffusers")
    return save_lora(layers, path, "kohya", unet=bundle.unet, sgm_names=spelling == "kohya-sgm")


def _raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.write_bytes(safetensors_torch.save(tensors, metadata=metadata))
    return path


# ------------------------------------------------------------------------------------------------------------
# Reading and mapping


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_three_spellings_give_the_deltas_they_were_built_from(bundles, tmp_path: Path, name: str) -> None:
    bundle = bundles[name]
    layers = _build(bundle, name)
    want = _expected(layers, SCALE)
    results = {}
    for spelling in ("kohya", "kohya-sgm", "diffusers"):
        file = _write(layers, tmp_path / f"{spelling}.safetensors", spelling, bundle)
        keys = safetensors_torch.load_file(str(file)).keys()
        if spelling == "kohya-sgm":  # the file really uses the original block names
            assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
            assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
            assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for k in keys)
        if spelling.startswith("kohya"):
            te = "lora_te1_" if name == "tiny-xl" else "lora_te_"
            assert any(k.startswith(te + "text_model_encoder_layers_") for k in keys)
        lora = read_lora(file)
        assert lora.format == ("diffusers" if spelling == "diffusers" else "kohya")
        assert len(lora.layers) == len(layers)
        scales = sorted(layer.alpha_scale for layer in lora.layers.values())
        assert scales == sorted(layer.alpha_scale for layer in layers.values())
        results[spelling] = lora_deltas([(lora, SCALE)], _modules(bundle))
        _assert_deltas(results[spelling], want)
    for spelling in ("kohya-sgm", "diffusers"):
        for component, deltas in results["kohya"].items():
            for key, value in deltas.items():
                assert torch.equal(results[spelling][component][key], value), (spelling, component, key)


def test_layer_delta_applies_scale_and_alpha() -> None:
    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)
    product = up @ down
    torch.testing.assert_close(LoraLayer(down, up).delta(1.5, (5, 6)), 1.5 * product)
    torch.testing.assert_close(LoraLayer(down, up, alpha=1.0).delta(1.5, (5, 6)), 1.5 * 0.25 * product)
    torch.testing.assert_close(LoraLayer(down, up, alpha=8.0).delta(-1.0, (5, 6)), -2.0 * product)
    assert not LoraLayer(down, up).delta(0.0, (5, 6)).any()
    half = LoraLayer(down.half(), up.half(), alpha=2.0).delta(1.0, torch.Size([5, 6]))
    assert half.dtype == torch.float32
    conv = LoraLayer(torch.randn(3, 2, 3, 3, generator=gen), torch.randn(4, 3, 1, 1, generator=gen), alpha=3.0)
    want = torch.einsum("or,rikl->oikl", conv.up[:, :, 0, 0], conv.down) * 2.0
    torch.testing.assert_close(conv.delta(2.0, (4, 2, 3, 3)), want)
    # a Linear-shaped pair on a 1x1 conv weight (and back) is the same matrix
    assert LoraLayer(down, up).delta(1.0, (5, 6, 1, 1)).shape == (5, 6, 1, 1)


def test_alpha_from_kohya_keys_and_from_peft_metadata(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen)
    stem = "lora_unet_a"
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    kohya = read_lora(_raw(tmp_path / "k.safetensors", tensors))
    assert kohya.layers["unet", "a"].alpha == 2.0 and kohya.layers["unet", "a"].alpha_scale == 0.5
    plain = {"unet.a.b.lora_A.weight": down, "unet.a.b.lora_B.weight": up}
    plain |= {"unet.c.lora_A.weight": down.clone(), "unet.c.lora_B.weight": up.clone()}
    assert read_lora(_raw(tmp_path / "p.safetensors", plain)).layers["unet", "a.b"].alpha is None
    config = {"unet.r": 4, "unet.lora_alpha": 16, "unet.alpha_pattern": {"a.b": 2}}
    meta = {"lora_adapter_metadata": json.dumps(config)}
    peft = read_lora(_raw(tmp_path / "m.safetensors", plain, meta))
    assert peft.layers["unet", "a.b"].alpha == 2.0 and peft.layers["unet", "c"].alpha == 16.0
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}
    rs = read_lora(_raw(tmp_path / "r.safetensors", plain, {"lora_adapter_metadata": json.dumps(config)}))
    assert math.isclose(rs.layers["unet", "c"].alpha_scale, 8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)


def test_two_loras_add_up(bundles, tmp_path: Path) -> None:
    bundle = bundles["tiny"]
    first, second = _build(bundle, "tiny", seed=3), _build(bundle, "tiny", seed=4)
    del second["unet", "conv_in"]
    extra = bundle.unet.get_submodule("up_blocks.0.resnets.0.conv2").weight
    second["unet", "up_blocks.0.resnets.0.conv2"] = _random_layer(extra, 2, 1.0, torch.Generator().manual_seed(5))
    a = read_lora(save_lora(first, tmp_path / "a.safetensors", "kohya"))
    b = read_lora(save_lora(second, tmp_path / "b.safetensors", "diffusers"))
    got = lora_deltas([(a, 0.5), (b, -1.25)], _modules(bundle))
    want = _expected(first, 0.5)
    for component, deltas in _expected(second, -1.25).items():
        for key, value in deltas.items():
            mine = want.setdefault(component, {})
            mine[key] = mine[key] + value if key in mine else value
    _assert_deltas(got, want, atol=1e-6)
    assert "up_blocks.0.resnets.0.conv2.weight" in got["unet"] and "conv_in.weight" in got["unet"]


def test_old_diffusers_spellings(bundles, tmp_path: Path) -> None:
    bundle = bundles["tiny"]
    gen = torch.Generator().manual_seed(6)
    block = "down_blocks.0.attentions.0"
    attn = f"{block}.transformer_blocks.0.attn1"
    text = "text_model.encoder.layers.0"
    spelled = {  # file stem -> (component, module path it means)
        f"unet.{attn}.processor.to_q_lora": ("unet", f"{attn}.to_q"),
        f"unet.{attn}.processor.to_out_lora": ("unet", f"{attn}.to_out.0"),
        f"unet.{block}.proj_in.lora": ("unet", f"{block}.proj_in"),
        f"text_encoder.{text}.self_attn.to_k_lora": ("text_encoder", "encoder.layers.0.self_attn.k_proj"),
        f"text_encoder.{text}.mlp.fc1.lora_linear_layer": ("text_encoder", "encoder.layers.0.mlp.fc1"),
    }
    tensors, layers = {}, {}
    for stem, (component, path) in spelled.items():
        layer = _random_layer(getattr(bundle, component).get_submodule(path).weight, 2, None, gen)
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = layer.down, layer.up
        layers[(component, path)] = layer
    lora = read_lora(_raw(tmp_path / "old.safetensors", tensors))
    assert lora.format == "diffusers"
    _assert_deltas(lora_deltas([(lora, SCALE)], _modules(bundle)), _expected(layers, SCALE))


def test_hashes_and_name(bundles, tmp_path: Path) -> None:
    layers = _build(bundles["tiny"], "tiny")
    file = save_lora(layers, tmp_path / "my_style.safetensors", "kohya")
    data = file.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    lora = read_lora(file)
    assert lora.name == "my_style" and lora.path == str(file)
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    assert lora.addnet_hash == hashlib.sha256(data[8 + header :]).hexdigest()
    assert lora.short_hash == lora.addnet_hash[:12]
    # A1111 prefers the hash kohya's trainer recorded in the metadata
    recorded = "ABCDEF0123456789" * 4
    tagged = read_lora(save_lora(layers, tmp_path / "tagged.safetensors", metadata={"sshs_model_hash": recorded}))
    assert tagged.short_hash == recorded[:12].lower()
    assert tagged.addnet_hash == lora.addnet_hash  # the tensor data did not change, only the header


# ------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("spelling", ["kohya", "diffusers"])
def test_lora_for_another_family_names_keys_and_families(bundles, tmp_path: Path, spelling: str) -> None:
    sd = read_lora(_write(_build(bundles["tiny"], "tiny"), tmp_path / "sd.safetensors", spelling, bundles["tiny"]))
    xl = _build(bundles["tiny-xl"], "tiny-xl")
    xl = read_lora(_write(xl, tmp_path / "xl.safetensors", spelling, bundles["tiny-xl"]))
    unet_key = "lora_unet_down_blocks_0_attentions_0" if spelling == "kohya" else "unet.down_blocks.0.attentions.0"
    with pytest.raises(LoraError, match=r"5 of 13 layers have no matching") as info:
        lora_deltas([(sd, 1.0)], _modules(bundles["tiny-xl"]))
    assert unet_key in str(info.value)
    assert "seems to be for SD 1.x/2.x" in str(info.value) and "the model given is SDXL" in str(info.value)
    te2_key = "lora_te2_" if spelling == "kohya" else "text_encoder_2."
    with pytest.raises(LoraError, match=rf"layers have no matching .*{te2_key}") as info:
        lora_deltas([(xl, 1.0)], _modules(bundles["tiny"]))
    assert "seems to be for SDXL" in str(info.value) and "the model given is SD 1.x/2.x" in str(info.value)
    with pytest.raises(LoraError, match="seems to be for SDXL"):  # a good LoRA does not hide a bad one
        lora_deltas([(sd, 1.0), (xl, 1.0)], _modules(bundles["tiny"]))


@pytest.mark.parametrize(("width", "family"), [(768, "SD 1.x"), (1024, "SD 2.x"), (2048, "SDXL")])
def test_family_from_cross_attention_width(bundles, width: int, family: str) -> None:
    layer = LoraLayer(torch.zeros(4, width), torch.zeros(320, 4), key="lora_unet_down_blocks_2_attn2_to_k")
    path = "down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = LoraFile("x.safetensors", "x", "0" * 64, "kohya", {("unet", path): layer})
    assert lora_family(lora)[0] == family
    with pytest.raises(LoraError, match=rf"seems to be for {family} \(.*to_k input width {width}"):
        lora_deltas([(lora, 1.0)], _modules(bundles["tiny"]))


def test_shape_mismatch_names_layer_and_both_shapes(bundles, tmp_path: Path) -> None:
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # tiny: [32, 32]
    layer = LoraLayer(torch.zeros(2, 7), torch.zeros(32, 2))
    lora = read_lora(save_lora({("unet", path): layer}, tmp_path / "wide.safetensors", "kohya"))
    with pytest.raises(LoraError, match=r"attn2_to_k.*delta has shape \(32, 7\).*weight has shape \(32, 32\)"):
        lora_deltas([(lora, 1.0)], _modules(bundles["tiny"]))
    with pytest.raises(LoraError, match=r"up \(5, 3\) does not fit down \(2, 7\)"):
        LoraLayer(torch.zeros(2, 7), torch.zeros(5, 3))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_pickle_file_is_refused(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"lora{suffix}"
    torch.save({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(LoraError, match=r"is a pickle file .* only as \.safetensors"):
        read_lora(file)


@pytest.mark.parametrize(
    ("keys", "what"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x"], "full Stable Diffusion checkpoint"),
        (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "diffusers/transformers model weights"),
        (["emb_params"], "textual-inversion embedding"),
        (["something.else"], "no LoRA weights"),
    ],
)
def test_safetensors_that_is_not_a_lora_says_what_it_is(tmp_path: Path, keys: list[str], what: str) -> None:
    file = _raw(tmp_path / "x.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(LoraError, match=rf"is not a LoRA file: it holds {len(keys)} tensors .*{what}"):
        read_lora(file)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("lora_unet_a.hada_w1_a", "LoHa"),
        ("lora_unet_a.lokr_w1", "LoKr"),
        ("lora_unet_a.dora_scale", "DoRA"),
        ("unet.a.lora_magnitude_vector", "DoRA"),
    ],
)
def test_other_adapter_kinds_are_refused(tmp_path: Path, key: str, kind: str) -> None:
    tensors = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(LoraError, match=rf"is a .*{kind}.* file \(key {key}\)"):
        read_lora(_raw(tmp_path / "x.safetensors", {**tensors, key: torch.zeros(2)}))


def test_broken_lora_files_are_refused(bundles, tmp_path: Path) -> None:
    half = _raw(tmp_path / "half.safetensors", {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(LoraError, match="lora_unet_conv_in has no up weight"):
        read_lora(half)
    stray = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(LoraError, match=r"1 tensors are not LoRA weights, e.g. extra"):
        read_lora(_raw(tmp_path / "stray.safetensors", {**stray, "extra": torch.zeros(1)}))
    with pytest.raises(LoraError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(LoraError, match="starting with"):
        read_lora(tmp_path / "junk.safetensors")
    # one module named twice (diffusers and SGM spellings) would be applied twice
    layer = LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2))
    twice = {}
    for name in ("down_blocks_0_attentions_0_proj_in", "input_blocks_1_1_proj_in"):
        twice[f"lora_unet_{name}.lora_down.weight"] = layer.down[:, :, None, None].clone()
        twice[f"lora_unet_{name}.lora_up.weight"] = layer.up[:, :, None, None].clone()
    lora = read_lora(_raw(tmp_path / "twice.safetensors", twice))
    with pytest.raises(LoraError, match=r"both target unet down_blocks\.0\.attentions\.0\.proj_in"):
        lora_deltas([(lora, 1.0)], _modules(bundles["tiny"]))


# ------------------------------------------------------------------------------------------------------------
# The contract the backends rely on: diffusers' load_lora_weights + fuse_lora adds exactly these deltas


@pytest.mark.parametrize(
    ("name", "spelling"),
    [("tiny", "kohya"), ("tiny", "diffusers"), ("tiny-xl", "kohya-sgm"), ("tiny-xl", "diffusers")],
)
def test_diffusers_fuse_lora_adds_exactly_these_deltas(tmp_path: Path, name: str, spelling: str) -> None:
    pytest.importorskip("peft")
    from sdtrt.runtime.models.reference import diffusers_pipeline

    bundle = load_preset(name)  # fresh: fusing changes the modules
    modules = _modules(bundle)
    # kohya files carry one alpha per kind of layer; with per-layer alphas diffusers mis-scales attention layers
    layers = _build(bundle, name, seed=7, alphas="mixed" if spelling == "diffusers" else "uniform")
    file = _write(layers, tmp_path / f"{name}-{spelling}.safetensors", spelling, bundle)
    deltas = lora_deltas([(read_lora(file), SCALE)], modules)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in modules.items()}
    pipe = diffusers_pipeline(bundle, "euler")
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=list(modules), lora_scale=SCALE)
    pipe.unload_lora_weights()
    for component, module in modules.items():
        after = module.state_dict()
        assert after.keys() == before[component].keys()
        for key, value in after.items():
            change = value - before[component][key]
            want = deltas.get(component, {}).get(key, torch.zeros_like(change))
            torch.testing.assert_close(change, want, atol=1e-6, rtol=0, msg=f"{component} {key}")
    assert sum(len(d) for d in deltas.values()) == len(layers)
