"""ComfyUI's nodes end to end on the tiny model (exported for real, ONNX Runtime on the CPU): the default workflow,
img2img, an inpainting mask from LoadImage's alpha, a two-KSampler hires graph, KSamplerAdvanced's split, LoRA and
clip skip, each image compared pixel for pixel with the runtime's stage functions called directly with the same
settings; SaveImage's file naming and PNG chunks; ``/object_info``'s schema for every node."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.runtime.lora import save_lora
from sdtrt.runtime.sampling import SIGMA_SAMPLERS, SIGMA_SCHEDULES
from sdtrt.serve.comfy.folders import ComfyFolders
from sdtrt.serve.comfy.graph import GraphExecutor, validate_prompt
from sdtrt.serve.comfy.nodes import NodeLibrary
from sdtrt.serve.comfy.nodes_latent import common_upscale
from sdtrt.serve.loras import LoraLibrary
from sdtrt.serve.models import Checkpoints

from ..test_lora_names import make_lora
from .test_graph import Recorder, default_graph, graph_context
from .test_graph import graph_pool as graph_pool  # a fixture, shared

POSITIVE = "beautiful scenery nature glass bottle landscape"
NEGATIVE = "text, watermark"


@pytest.fixture(scope="module")
def graph_lora_dir(tmp_path_factory, tiny_bundle) -> Path:
    folder = tmp_path_factory.mktemp("comfy-loras")
    save_lora(make_lora(tiny_bundle, 1), folder / "style.safetensors", "kohya", unet=tiny_bundle.unet)
    return folder


@pytest.fixture(scope="module")
def graph_nodes(tiny_fp32, graph_lora_dir, tmp_path_factory) -> NodeLibrary:
    folders = ComfyFolders(tmp_path_factory.mktemp("comfy-nodes")).create()
    return NodeLibrary(Checkpoints(tiny_fp32), LoraLibrary(graph_lora_dir), folders)


def run_graph(library: NodeLibrary, pool, prompt: dict, **context) -> dict:
    """Validate and run ``prompt`` with a fresh cache; the ui outputs."""
    return GraphExecutor(library).execute(
        prompt, validate_prompt(prompt, library), graph_context(pool, **context), Recorder()
    )


def saved(library: NodeLibrary, ui: dict, node: str = "9") -> np.ndarray:
    (entry,) = ui[node]["images"]
    folder = library.folders.folder(entry["type"])
    return np.array(Image.open(folder / entry["subfolder"] / entry["filename"]))


def pixels(images: torch.Tensor) -> np.ndarray:
    """SaveImage's 8-bit conversion of the first image."""
    return np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8)


def reference(pipe, latent, *, seed=5, steps=3, cfg=8.0, denoise=1.0, sampler="euler", scheduler="normal", loras=(),
              clip_loras=None, clip_skip=1, mask=None):  # fmt: skip
    """The stage functions called directly: encode (with the CLIP's LoRAs), sample (with the model's), no decode."""
    pipe.set_loras(list(loras if clip_loras is None else clip_loras))
    positive, negative = (pipe.encode_conditioning(t, clip_skip=clip_skip) for t in (POSITIVE, NEGATIVE))
    pipe.set_loras(list(loras))
    sigmas = pipe.ksampler_sigmas(scheduler, steps, denoise)
    return pipe.sample_latents(
        latent, positive, negative, sampler=sampler, sigmas=sigmas, cfg=cfg, seed=seed, noise_mask=mask
    )


@pytest.fixture
def pipe(graph_nodes, graph_pool):
    return graph_pool.get(graph_nodes.checkpoints.items[0])


@pytest.fixture
def graph(graph_nodes) -> dict:
    return default_graph(graph_nodes.checkpoints.items[0].name)


def test_the_default_workflow_equals_the_stage_functions(graph, graph_nodes, graph_pool, pipe):
    workflow = {"nodes": [], "links": [], "version": 0.4}
    ui = run_graph(graph_nodes, graph_pool, graph, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert ui == {"9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}
    expected = pixels(pipe.decode_images(reference(pipe, torch.zeros(1, 4, 8, 8))))
    np.testing.assert_array_equal(saved(graph_nodes, ui), expected)
    png = Image.open(graph_nodes.folders.output / "ComfyUI_00001_.png")
    assert json.loads(png.text["prompt"]) == graph and json.loads(png.text["workflow"]) == workflow


def test_ksampler_runs_the_sde_sampler_on_the_beta_schedule(graph, graph_nodes, graph_pool, pipe):
    graph["3"]["inputs"].update(sampler_name="dpmpp_2m_sde", scheduler="beta", steps=4)
    expected = pixels(pipe.decode_images(reference(pipe, torch.zeros(1, 4, 8, 8), steps=4, sampler="dpmpp_2m_sde",
                                                   scheduler="beta")))  # fmt: skip
    out = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    np.testing.assert_array_equal(out, expected)
    plain = pixels(pipe.decode_images(reference(pipe, torch.zeros(1, 4, 8, 8), steps=4, scheduler="beta")))
    assert not np.array_equal(out, plain)  # the sampler changed the image


def test_img2img_and_a_mask_from_the_alpha_channel(graph, graph_nodes, graph_pool, pipe):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(graph_nodes.folders.input / "photo.png")
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    graph["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["10", 0], denoise=0.6)
    del graph["5"]
    image = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)[None]
    latent = pipe.encode_images(image)
    expected = pixels(pipe.decode_images(reference(pipe, latent, denoise=0.6)))
    np.testing.assert_array_equal(saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph)), expected)

    graph["11"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["1", 1]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    mask = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)[None]  # ComfyUI: mask = 1 - alpha
    expected = pixels(pipe.decode_images(reference(pipe, latent, denoise=0.6, mask=mask)))
    np.testing.assert_array_equal(saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph)), expected)


def test_a_two_sampler_hires_graph(graph, graph_nodes, graph_pool, pipe):
    graph["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 1.5},
    }
    graph["11"] = {
        "class_type": "KSampler",
        "inputs": {**graph["3"]["inputs"], "seed": 7, "denoise": 0.5, "latent_image": ["10", 0]},
    }
    graph["8"]["inputs"]["samples"] = ["11", 0]
    got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    first = reference(pipe, torch.zeros(1, 4, 8, 8))
    upscaled = torch.nn.functional.interpolate(first, size=(12, 12), mode="nearest-exact")
    expected = pixels(pipe.decode_images(reference(pipe, upscaled, seed=7, denoise=0.5)))
    assert got.shape == (96, 96, 3)
    np.testing.assert_array_equal(got, expected)


def test_ksampler_advanced_split_in_two_equals_one_ksampler(graph, graph_nodes, graph_pool):
    graph["3"]["inputs"]["steps"] = 4
    whole = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    common = {k: v for k, v in graph["3"]["inputs"].items() if k not in ("seed", "denoise")}
    graph["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {**common, "add_noise": "enable", "noise_seed": 5, "start_at_step": 0, "end_at_step": 2,
                   "return_with_leftover_noise": "enable"},
    }  # fmt: skip
    graph["12"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {**common, "add_noise": "disable", "noise_seed": 0, "start_at_step": 2, "end_at_step": 10000,
                   "return_with_leftover_noise": "disable", "latent_image": ["3", 0]},
    }  # fmt: skip
    graph["8"]["inputs"]["samples"] = ["12", 0]
    split = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    assert (
        np.abs(split.astype(int) - whole.astype(int)).max() <= 1
    )  # the same steps; the latents are rescaled once more


def lora_graph(graph: dict, node: dict) -> dict:
    graph["10"] = node
    graph["3"]["inputs"]["model"] = ["10", 0]
    if node["class_type"] == "LoraLoader":
        graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 1]
    return graph


def test_loras_change_the_image_as_the_stage_functions_with_that_lora(
    graph, graph_nodes, graph_pool, pipe, graph_lora_dir
):
    path = str((graph_lora_dir / "style.safetensors").resolve())
    base = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    cases = [
        ({"strength_model": 0.8, "strength_clip": 0.8}, dict(loras=[(path, 0.8)])),
        ({"strength_model": 0.8, "strength_clip": 0.3}, dict(loras=[(path, 0.8)], clip_loras=[(path, 0.3)])),
        ({"strength_model": 0.8}, dict(loras=[(path, 0.8)], clip_loras=[])),
    ]
    images = []
    for strengths, settings in cases:
        kind = "LoraLoader" if "strength_clip" in strengths else "LoraLoaderModelOnly"
        inputs = {"model": ["4", 0], "lora_name": "style.safetensors", **strengths}
        if kind == "LoraLoader":
            inputs["clip"] = ["4", 1]
        prompt = lora_graph(
            default_graph(graph_nodes.checkpoints.items[0].name), {"class_type": kind, "inputs": inputs}
        )
        got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, prompt))
        np.testing.assert_array_equal(
            got, pixels(pipe.decode_images(reference(pipe, torch.zeros(1, 4, 8, 8), **settings)))
        )
        assert not np.array_equal(got, base)
        images.append(got)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    zero = {
        "model": ["4", 0],
        "clip": ["4", 1],
        "lora_name": "style.safetensors",
        "strength_model": 0,
        "strength_clip": 0,
    }
    prompt = lora_graph(graph, {"class_type": "LoraLoader", "inputs": zero})
    np.testing.assert_array_equal(saved(graph_nodes, run_graph(graph_nodes, graph_pool, prompt)), base)


def test_clip_set_last_layer(graph, graph_nodes, graph_pool, pipe):
    base = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    graph["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -1}}
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 0]
    np.testing.assert_array_equal(saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph)), base)
    graph["10"]["inputs"]["stop_at_clip_layer"] = -2
    got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    assert not np.array_equal(got, base)
    np.testing.assert_array_equal(
        got, pixels(pipe.decode_images(reference(pipe, torch.zeros(1, 4, 8, 8), clip_skip=2)))
    )


def test_save_image_names_files_as_comfyui(graph, graph_nodes, graph_pool):
    out = graph_nodes.folders.output
    (out / "sub" / "dir").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(out / "sub" / "dir" / "cat_00007_.png")
    Image.new("RGB", (4, 4)).save(out / "sub" / "dir" / "catalog_00020_.png")  # another prefix: not counted
    graph["9"]["inputs"]["filename_prefix"] = "sub/dir/cat"
    graph["5"]["inputs"]["batch_size"] = 2
    ui = run_graph(graph_nodes, graph_pool, graph)
    names = [(e["subfolder"], e["filename"], e["type"]) for e in ui["9"]["images"]]
    assert names == [("sub/dir", "cat_00008_.png", "output"), ("sub/dir", "cat_00009_.png", "output")]
    graph["9"]["inputs"]["filename_prefix"] = "size_%width%x%height%"
    assert run_graph(graph_nodes, graph_pool, graph)["9"]["images"][0]["filename"] == "size_64x64_00001_.png"


def test_preview_image_writes_to_temp(graph, graph_nodes, graph_pool):
    graph["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    (entry,) = run_graph(graph_nodes, graph_pool, graph)["9"]["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert (graph_nodes.folders.temp / entry["filename"]).is_file()


def test_latent_upscale_center_crop_and_size_rules():
    latent = torch.arange(1 * 4 * 8 * 16, dtype=torch.float32).reshape(1, 4, 8, 16)
    cropped = common_upscale(latent, 8, 8, "nearest-exact", "center")
    torch.testing.assert_close(cropped, latent[..., 4:12])  # the middle square, ComfyUI's round((16 - 8) / 2)
    torch.testing.assert_close(
        common_upscale(latent, 32, 16, "bilinear", "disabled"),
        torch.nn.functional.interpolate(latent, size=(16, 32), mode="bilinear"),
    )
    with pytest.raises(ValueError, match="bislerp"):
        common_upscale(latent, 8, 8, "bislerp", "disabled")


def test_latent_upscale_node_keeps_the_aspect_with_one_side_zero(graph_nodes, graph_pool):
    from sdtrt.serve.comfy.nodes_latent import LatentUpscale

    latent = {"samples": torch.zeros(1, 4, 8, 16)}
    (out,) = LatentUpscale().run(None, latent, "nearest-exact", 0, 128, "disabled")
    assert tuple(out["samples"].shape) == (1, 4, 16, 32)
    (same,) = LatentUpscale().run(None, latent, "nearest-exact", 0, 0, "disabled")
    assert same is latent


OBJECT_INFO_KEYS = {
    "input", "input_order", "is_input_list", "output", "output_is_list", "output_name", "name", "display_name",
    "description", "python_module", "category", "output_node", "deprecated", "experimental", "api_node",
}  # fmt: skip
COMFY_NODES = {  # class_type: (display_name, category, outputs), as ComfyUI's nodes.py declares them
    "CheckpointLoaderSimple": ("Load Checkpoint", "loaders", ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ("CLIP Text Encode (Prompt)", "conditioning", ["CONDITIONING"]),
    "CLIPSetLastLayer": ("CLIP Set Last Layer", "conditioning", ["CLIP"]),
    "EmptyLatentImage": ("Empty Latent Image", "latent", ["LATENT"]),
    "KSampler": ("KSampler", "sampling", ["LATENT"]),
    "KSamplerAdvanced": ("KSampler (Advanced)", "sampling", ["LATENT"]),
    "VAEDecode": ("VAE Decode", "latent", ["IMAGE"]),
    "VAEEncode": ("VAE Encode", "latent", ["LATENT"]),
    "LoadImage": ("Load Image", "image", ["IMAGE", "MASK"]),
    "SaveImage": ("Save Image", "image", []),
    "PreviewImage": ("Preview Image", "image", []),
    "LatentUpscale": ("Upscale Latent", "latent", ["LATENT"]),
    "LatentUpscaleBy": ("Upscale Latent By", "latent", ["LATENT"]),
    "LoraLoader": ("Load LoRA (Model and CLIP)", "loaders", ["MODEL", "CLIP"]),
    "LoraLoaderModelOnly": ("Load LoRA", "loaders", ["MODEL"]),
    "SetLatentNoiseMask": ("Set Latent Noise Mask", "latent/inpaint", ["LATENT"]),
    "VAEEncodeForInpaint": ("VAE Encode (for Inpainting)", "latent/inpaint", ["LATENT"]),
    "InpaintModelConditioning": (
        "InpaintModelConditioning",
        "conditioning/inpaint",
        ["CONDITIONING", "CONDITIONING", "LATENT"],
    ),
    "ControlNetLoader": ("Load ControlNet Model", "loaders", ["CONTROL_NET"]),
    "ControlNetApplyAdvanced": ("Apply ControlNet", "conditioning/controlnet", ["CONDITIONING", "CONDITIONING"]),
    "SdtrtStepCache": ("Step Cache (sdtrt)", "sdtrt", ["MODEL"]),
}


def test_object_info_describes_every_node_in_comfyuis_schema(graph_nodes):
    info = json.loads(json.dumps(graph_nodes.object_info()))  # as the route sends it
    assert set(info) == set(COMFY_NODES)
    for name, node in info.items():
        assert set(node) - {"output_tooltips"} == OBJECT_INFO_KEYS, name
        display, category, outputs = COMFY_NODES[name]
        assert (node["name"], node["display_name"], node["category"], node["output"]) == (
            name,
            display,
            category,
            outputs,
        )
        assert node["python_module"] == ("custom_nodes.sdtrt" if category == "sdtrt" else "nodes")
        assert isinstance(node["description"], str)
        assert node["output_is_list"] == [False] * len(outputs) and len(node["output_name"]) == len(outputs)
        assert node["output_node"] is (name in ("SaveImage", "PreviewImage"))
        assert not (node["deprecated"] or node["experimental"] or node["api_node"] or node["is_input_list"])
        assert set(node["input"]) <= {"required", "optional", "hidden"}
        assert node["input_order"] == {kind: list(spec) for kind, spec in node["input"].items()}
        for kind, spec in node["input"].items():
            for entry in spec.values() if kind != "hidden" else ():
                assert isinstance(entry, list) and 1 <= len(entry) <= 2
                assert isinstance(entry[0], str | list) and (len(entry) == 1 or isinstance(entry[1], dict))
    required = {name: node["input"]["required"] for name, node in info.items()}
    assert required["CheckpointLoaderSimple"]["ckpt_name"][0] == [c.name for c in graph_nodes.checkpoints.items]
    assert required["KSampler"]["sampler_name"][0] == list(SIGMA_SAMPLERS)
    assert required["KSampler"]["scheduler"][0] == list(SIGMA_SCHEDULES)
    assert required["LoraLoader"]["lora_name"][0] == ["style.safetensors"]
    seed = {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}
    assert required["KSampler"]["seed"] == ["INT", {**seed, "tooltip": "The random seed used for creating the noise."}]
    assert required["EmptyLatentImage"]["width"][1] | {"tooltip": ""} == {
        "default": 512, "min": 16, "max": 16384, "step": 8, "tooltip": ""}  # fmt: skip
    assert info["SaveImage"]["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert info["ControlNetApplyAdvanced"]["input"]["optional"] == {"vae": ["VAE"]}
    assert info["ControlNetApplyAdvanced"]["output_name"] == ["positive", "negative"]
    assert required["ControlNetLoader"]["control_net_name"] == [[]]  # this model has no ControlNets
    assert graph_nodes.node_info("KSampler") == {"KSampler": graph_nodes.object_info()["KSampler"]}
    assert graph_nodes.node_info("Nope") == {}


def test_load_image_lists_the_input_folder_as_it_changes(graph_nodes):
    Image.new("RGB", (8, 8)).save(graph_nodes.folders.input / "new-upload.png")
    listed = graph_nodes.object_info()["LoadImage"]["input"]["required"]["image"]
    assert "new-upload.png" in listed[0] and listed[1] == {"image_upload": True}


def test_vae_encode_for_inpaint_grays_the_masked_pixels_and_grows_the_mask(graph, graph_nodes, graph_pool, pipe):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[20:40, 24:30, 3] = 0  # the hole: mask 1 there
    Image.fromarray(rgba, "RGBA").save(graph_nodes.folders.input / "hole.png")
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": "hole.png"}}
    graph["10"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["1", 0], "vae": ["4", 2], "mask": ["1", 1], "grow_mask_by": 6},
    }
    graph["3"]["inputs"]["latent_image"] = ["10", 0]
    del graph["5"]
    got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    hole = torch.zeros(1, 1, 64, 64)
    hole[..., 20:40, 24:30] = 1.0
    gray = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)[None]
    gray = torch.where(hole[:, 0, :, :, None] > 0, torch.full_like(gray, 0.5), gray)
    grown = torch.nn.functional.max_pool2d(hole, 6, stride=1, padding=3)[..., :64, :64]  # a 6x6 box dilation
    assert grown.sum() == (20 + 5) * (6 + 5)
    latent = reference(pipe, pipe.encode_images(gray), mask=grown)
    np.testing.assert_array_equal(got, pixels(pipe.decode_images(latent)))


def control_graph(ckpt_name: str, strength: float = 1.0) -> dict:
    """The default workflow with a LoadImage hint through ControlNetLoader "edges" and ControlNetApplyAdvanced."""
    graph = default_graph(ckpt_name)
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    graph["21"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges"}}
    graph["22"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {"positive": ["6", 0], "negative": ["7", 0], "control_net": ["21", 0], "image": ["20", 0],
                   "vae": ["4", 2], "strength": strength, "start_percent": 0.0, "end_percent": 0.5},
    }  # fmt: skip
    graph["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return graph


def test_controlnet_nodes_equal_the_stage_functions_with_that_control(tiny_control_fp32, graph_pool, tmp_path):
    from sdtrt.runtime.control.comfy import ControlApply

    library = NodeLibrary(Checkpoints(tiny_control_fp32), LoraLibrary(None), ComfyFolders(tmp_path).create())
    assert library.object_info()["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == ["depth", "edges"]
    hint = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(hint).save(library.folders.input / "hint.png")
    name = library.checkpoints.items[0].name
    base = saved(library, run_graph(library, graph_pool, default_graph(name)))
    got = saved(library, run_graph(library, graph_pool, control_graph(name)))
    pipe = graph_pool.get(library.checkpoints.items[0])
    pipe.set_loras([])
    positive, negative = (pipe.encode_conditioning(t) for t in (POSITIVE, NEGATIVE))
    apply = ControlApply("edges", torch.from_numpy(hint.astype(np.float32) / 255.0)[None], 1.0, 0.0, 0.5)
    positive, negative = (replace(c, controls=(apply,)) for c in (positive, negative))
    latent = pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, sampler="euler", cfg=8.0, seed=5,
                                 sigmas=pipe.ksampler_sigmas("normal", 3))  # fmt: skip
    np.testing.assert_array_equal(got, pixels(pipe.decode_images(latent)))
    assert not np.array_equal(got, base)
    np.testing.assert_array_equal(saved(library, run_graph(library, graph_pool, control_graph(name, 0.0))), base)


def test_step_cache_node_samples_with_the_shallow_unet(graph, graph_nodes, graph_pool, pipe):
    graph["10"] = {
        "class_type": "SdtrtStepCache",
        "inputs": {"model": ["4", 0], "cache_interval": 2, "cache_schedule": "uniform"},
    }
    graph["3"]["inputs"].update(model=["10", 0], steps=4)
    got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    pipe.set_loras([])
    positive, negative = (pipe.encode_conditioning(t) for t in (POSITIVE, NEGATIVE))
    sigmas = pipe.ksampler_sigmas("normal", 4)
    common = dict(sampler="euler", sigmas=sigmas, cfg=8.0, seed=5)
    cached = pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, cache_interval=2, **common)
    np.testing.assert_array_equal(got, pixels(pipe.decode_images(cached)))
    full = pipe.sample_latents(torch.zeros(1, 4, 8, 8), positive, negative, **common)
    assert not torch.equal(cached, full)  # the shallow UNet ran on steps 2 and 4
    graph["10"]["inputs"].update(cache_interval=3, cache_schedule="quadratic")
    got = saved(graph_nodes, run_graph(graph_nodes, graph_pool, graph))
    quadratic = pipe.sample_latents(
        torch.zeros(1, 4, 8, 8), positive, negative, cache_interval=3, cache_schedule="quadratic", **common
    )
    np.testing.assert_array_equal(got, pixels(pipe.decode_images(quadratic)))


def test_inpaint_model_conditioning_on_an_inpainting_model(tiny_inpaint_fp32, graph_pool, tmp_path):
    library = NodeLibrary(Checkpoints(tiny_inpaint_fp32), LoraLibrary(None), ComfyFolders(tmp_path).create())
    rgba = np.random.default_rng(4).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:40, 16:48, 3] = 0
    Image.fromarray(rgba, "RGBA").save(library.folders.input / "photo.png")
    graph = default_graph(library.checkpoints.items[0].name)
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    graph["20"] = {
        "class_type": "InpaintModelConditioning",
        "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["1", 0], "mask": ["1", 1],
                   "noise_mask": True},
    }  # fmt: skip
    graph["3"]["inputs"].update(positive=["20", 0], negative=["20", 1], latent_image=["20", 2])
    del graph["5"]
    got = saved(library, run_graph(library, graph_pool, graph))
    pipe = graph_pool.get(library.checkpoints.items[0])
    image = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)[None]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 16:48] = 1.0
    gray = torch.where(mask[:, 0, :, :, None] > 0, torch.full_like(image, 0.5), image)
    concat = pipe.encode_images(gray)
    positive, negative = (
        replace(pipe.encode_conditioning(t), concat_latent_image=concat, concat_mask=mask) for t in (POSITIVE, NEGATIVE)
    )
    latent = pipe.sample_latents(pipe.encode_images(image), positive, negative, sampler="euler", cfg=8.0, seed=5,
                                 sigmas=pipe.ksampler_sigmas("normal", 3), noise_mask=mask)  # fmt: skip
    np.testing.assert_array_equal(got, pixels(pipe.decode_images(latent)))


def test_ckpt_name_lists_every_served_model(models_dir, tmp_path):
    library = NodeLibrary(Checkpoints(models_dir), LoraLibrary(None), ComfyFolders(tmp_path).create())
    names = library.object_info()["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert names == ["alpha", "beta"]
