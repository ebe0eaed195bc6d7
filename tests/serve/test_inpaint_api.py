"""Inpainting on `sdtrt serve`: img2img with A1111's ``mask`` fields, sent with `webuiapi` and urllib to a real server
on loopback. The images equal `sdtrt generate --mask` (or the Python pipeline) pixel for pixel for the same seed,
keep the init image's pixels outside the mask, work with ControlNet units and LoRA tags, and every bad field is a 422
before any work; the Ray replica's core runs the same requests."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.lora import save_lora
from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.errors import RequestError
from sdtrt.serve.generate import merge_key

from .test_lora_names import make_lora
from .test_server import Server, generate_cli, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "a red square"
COMMON = dict(seed=42, steps=4, width=64, height=64, cfg_scale=7.5, sampler_name="Euler")
CLI = [PROMPT, "--steps", "4", "--size", "64x64", "--cfg", "7.5", "--scheduler", "euler"]


def init_array(width: int = 64, height: int = 64) -> np.ndarray:
    """A smooth colour gradient with a grey block: an init image whose pixels tell where they came from."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height) + 64], -1)
    image[height // 8 : height // 4, width // 8 : width // 4] = 128
    return image.astype(np.uint8)


def mask_array(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (24, 20, 48, 44)) -> np.ndarray:
    """Black with a white rectangle ``box`` (x1, y1, x2, y2): the part that repaints."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return mask


def b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INIT, MASK = init_array(), mask_array()
# what the blurred mask leaves untouched: more than 3 blur radii (4 px) from the white rectangle
FAR = np.ones((64, 64), dtype=bool)
FAR[20 - 12 : 44 + 12, 24 - 12 : 48 + 12] = False
BODY = {"prompt": PROMPT, **COMMON, "init_images": [b64(INIT)], "mask": b64(MASK), "denoising_strength": 0.75,
        "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 4}  # fmt: skip


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_bundle) -> Path:
    folder = tmp_path_factory.mktemp("inpaint-loras")
    save_lora(make_lora(tiny_bundle, 1), folder / "style.safetensors", "kohya", unet=tiny_bundle.unet)
    return folder


@pytest.fixture(scope="module")
def server(tiny_control_fp32, lora_dir):
    srv = Server(tiny_control_fp32, "--lora-dir", str(lora_dir))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def api(server):
    webuiapi = pytest.importorskip("webuiapi")
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


@pytest.fixture(scope="module")
def pipe(tiny_control_fp32):
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(tiny_control_fp32, device="cpu") as pipe:
        yield pipe


def files(tmp_path: Path, init: np.ndarray = INIT, mask: np.ndarray = MASK) -> list[str]:
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]


def direct(pipe, seed: int, mask: np.ndarray = MASK, **inpaint) -> np.ndarray:
    """The pipeline called as the server calls it for ``BODY`` (``inpaint``: the ``Inpaint`` fields)."""
    from sdtrt.runtime.inpaint import Inpaint

    settings = {"blur": 4, "fill": "original", **inpaint}
    call = dict(steps=4, guidance_scale=7.5, seed=seed, height=64, width=64, scheduler="euler", strength=0.75)
    result = pipe(PROMPT, image=Image.fromarray(INIT), inpaint=Inpaint(Image.fromarray(mask), **settings), **call)
    return np.asarray(result.images[0].convert("RGB"))


def test_webuiapi_inpaint_equals_the_cli(api, tiny_control_fp32, tmp_path):
    result = api.img2img(images=[Image.fromarray(INIT)], mask_image=Image.fromarray(MASK), prompt=PROMPT, **COMMON,
                         denoising_strength=0.75, inpainting_fill=1, mask_blur=4, inpaint_full_res=False)  # fmt: skip
    got = np.asarray(result.image.convert("RGB"))
    args = [*files(tmp_path), "--strength", "0.75", "--mask-blur", "4", "--inpainting-fill", "original", "--seed", "42"]
    np.testing.assert_array_equal(got, generate_cli(tiny_control_fp32, tmp_path / "cli.png", *CLI, *args))
    np.testing.assert_array_equal(got[FAR], INIT[FAR])  # outside the (blurred) mask: the init image's pixels
    inside = got[24:40, 28:44].astype(int) - INIT[24:40, 28:44]
    assert np.abs(inside).mean() > 5  # the white part repainted
    text = result.image.info["parameters"]
    assert "Denoising strength: 0.75, Mask blur: 4" in text
    assert "Masked content" not in text and "Inpaint area" not in text  # original, whole picture: A1111 writes none
    assert result.info["infotexts"][0] == text
    assert result.info["extra_generation_params"] == {"Denoising strength": 0.75, "Mask blur": 4}
    assert result.parameters["mask"] is None and result.parameters["mask_blur"] == 4


def test_webuiapi_defaults_only_masked_keep_the_init_size(api, tiny_control_fp32, tmp_path):
    """webuiapi's (and A1111's) defaults: fill, only masked, padding 0; the images have the init image's size."""
    init, mask = init_array(96, 80), mask_array(96, 80, (40, 30, 60, 50))
    result = api.img2img(images=[Image.fromarray(init)], mask_image=Image.fromarray(mask), prompt=PROMPT, **COMMON)
    got = np.asarray(result.image.convert("RGB"))
    assert got.shape == (80, 96, 3) and result.info["width"] == 64  # as A1111: the working size in info
    args = [*files(tmp_path, init, mask), "--strength", "0.75", "--inpainting-fill", "fill", "--only-masked"]
    expected = generate_cli(tiny_control_fp32, tmp_path / "cli.png", *CLI, *args, "--only-masked-padding", "0",
                            "--seed", "42")  # fmt: skip
    np.testing.assert_array_equal(got, expected)
    far = np.ones((80, 96), dtype=bool)
    far[30 - 12 : 50 + 12, 40 - 12 : 60 + 12] = False
    np.testing.assert_array_equal(got[far], init[far])
    text = result.image.info["parameters"]
    assert "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, Masked content: fill" in text


def test_fills_invert_and_batch_keep_per_image_seeds(server, pipe):
    inverted = 255 - MASK  # inverted again by inpainting_mask_invert: the same white rectangle repaints
    body = {**BODY, "mask": b64(inverted), "inpainting_mask_invert": 1, "inpainting_fill": 2, "batch_size": 2,
            "seed": 7, "mask_blur_x": 2, "mask_blur_y": 2}  # fmt: skip
    del body["mask_blur"]
    status, answer, _ = server.post("/sdapi/v1/img2img", body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [7, 8]
    assert "Mask mode: Inpaint not masked, Mask blur: 2, Masked content: latent noise" in info["infotexts"][1]
    images = [pixels(text) for text in answer["images"]]
    for seed, image in zip((7, 8), images, strict=True):
        np.testing.assert_array_equal(image, direct(pipe, seed, inverted, blur=2, invert=True, fill="latent noise"))
    assert not np.array_equal(images[0], images[1])
    status, answer, _ = server.post("/sdapi/v1/img2img", {**BODY, "inpainting_fill": 3})
    assert status == 200, answer
    np.testing.assert_array_equal(pixels(answer["images"][0]), direct(pipe, 42, fill="latent nothing"))


def test_inpaint_with_a_controlnet_unit(server):
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[16:48, 30:34] = 255
    unit = {"enabled": True, "module": "none", "model": "edges", "image": b64(edges), "weight": 1.0}
    plain = server.post("/sdapi/v1/img2img", BODY)
    status, answer, _ = server.post("/sdapi/v1/img2img", {**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert plain[0] == 200 and status == 200, answer
    controlled, alone = pixels(answer["images"][0]), pixels(plain[1]["images"][0])
    assert not np.array_equal(controlled, alone)
    np.testing.assert_array_equal(controlled[FAR], INIT[FAR])
    assert "ControlNet 0" in json.loads(answer["info"])["infotexts"][0]
    status, answer, _ = server.post(
        "/sdapi/v1/img2img", {**BODY, "inpaint_full_res": True, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    )
    assert status == 422 and "inpaint_full_res true (only masked) with ControlNet units" in answer["detail"]


def test_inpaint_with_a_lora_tag_equals_the_cli(server, tiny_control_fp32, lora_dir, tmp_path):
    status, answer, _ = server.post("/sdapi/v1/img2img", {**BODY, "prompt": f"{PROMPT} <lora:style:0.8>"})
    assert status == 200, answer
    got = pixels(answer["images"][0])
    args = [*files(tmp_path), "--strength", "0.75", "--seed", "42", "--lora", f"{lora_dir}/style.safetensors:0.8"]
    np.testing.assert_array_equal(got, generate_cli(tiny_control_fp32, tmp_path / "cli.png", *CLI, *args))
    plain = server.post("/sdapi/v1/img2img", BODY)[1]
    assert not np.array_equal(got, pixels(plain["images"][0]))
    np.testing.assert_array_equal(got[FAR], INIT[FAR])


BAD = [
    ({"mask": b64(mask_array(32, 32))}, r"^mask is 32x32 but init_images\[0\] is 64x64; send a mask of the init"),
    ({"mask": b64(np.zeros((64, 64), np.uint8))}, r"^mask: the mask repaints nothing: it has no white"),
    (
        {
            "mask": b64(MASK),
            "inpainting_mask_invert": 1,
            "inpaint_full_res": False,
            "mask_blur": 0,
            "init_images": None,
        },
        r"^mask needs the image it applies to: add init_images",
    ),  # fmt: skip
    (
        {"mask": b64(np.full((64, 64), 255, np.uint8)), "inpainting_mask_invert": 1},
        r"repaints nothing: .* once inverted",
    ),
    ({"mask": b64(mask_array(box=(30, 30, 32, 32))), "mask_blur": 0}, r"^mask: .* smaller than one latent pixel"),
    ({"mask": "not base64!"}, r"^mask is not valid base64"),
    ({"inpainting_fill": 4}, r"^inpainting_fill must be one of 0\.\.3 \(0 fill, 1 original, 2 latent noise, 3 latent"),
    ({"inpainting_fill": "fill"}, r"^inpainting_fill must be one of 0\.\.3"),
    ({"mask_blur": -1}, r"^mask_blur must be an integer number of pixels in 0\.\.256, got -1"),
    ({"mask_blur": None, "mask_blur_x": 4, "mask_blur_y": 8}, r"^mask_blur_x 4 and mask_blur_y 8 differ"),
    ({"mask_round": False}, r"^mask_round false \(a soft latent mask\) is not implemented"),
    ({"inpaint_full_res_padding": 300}, r"^inpaint_full_res_padding must be an integer number of pixels in 0\.\.256"),
    ({"inpainting_mask_invert": 2}, r"^inpainting_mask_invert must be 0/1 or true/false, got 2"),
    ({"latent_mask": b64(MASK)}, r"a separate latent mask is not implemented"),
    ({"initial_noise_multiplier": 0.9}, r"the initial noise is not scaled"),
]


@pytest.mark.parametrize(("fields", "match"), BAD)
def test_bad_inpainting_fields_are_422(server, fields, match):
    status, answer, _ = server.post("/sdapi/v1/img2img", {**BODY, **fields})
    assert status == 422 and re.search(match, answer["detail"]), (fields, answer)


def test_refusals_before_any_work_and_on_txt2img(server):
    status, answer, _ = server.post("/sdapi/v1/txt2img", {**COMMON, "prompt": PROMPT, "mask": b64(MASK)})
    assert status == 422 and answer["detail"].startswith("mask is img2img's"), answer
    # without a mask the inpainting fields cannot change the image: A1111's defaults and any valid value run
    plain = {k: v for k, v in BODY.items() if k != "mask"}
    for extra in ({}, {"mask_blur_x": 2, "mask_blur_y": 9, "mask_round": False, "inpainting_fill": 3}):
        assert server.post("/sdapi/v1/img2img", {**plain, **extra})[0] == 200
    with pytest.raises(RequestError, match="inpainting_fill must be"):
        parse_request({**plain, "inpainting_fill": 9}, img2img=True)
    request = parse_request(BODY, img2img=True)
    assert request.inpaint is not None and merge_key(request) is None  # img2img is never merged
    assert request.inpaint.fill == "original" and not request.inpaint.only_masked and request.inpaint.blur == 4
    defaults = parse_request({"prompt": "x", "init_images": [b64(INIT)], "mask": b64(MASK)}, img2img=True).inpaint
    assert (defaults.blur, defaults.fill, defaults.only_masked, defaults.padding) == (4, "fill", True, 0)  # A1111's


def test_alpha_masks_read_as_a1111_reads_them():
    """A mask with transparency (A1111's UI sends RGBA) is read from its alpha channel."""
    from sdtrt.serve.inpaint import mask_image

    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: the colour says nothing here
    rgba[20:44, 24:48, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(mask_image(buffer.getvalue())), MASK)
    opaque = np.dstack([np.stack([MASK] * 3, -1), np.full((64, 64), 255, np.uint8)])
    buffer = io.BytesIO()
    Image.fromarray(opaque, "RGBA").save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(mask_image(buffer.getvalue())), MASK)


def test_replica_core_runs_inpainting(tiny_control_fp32, pipe):
    """The Ray replica runs img2img requests one by one with the same functions: the same images."""
    from sdtrt.serve.ray_app import RayConfig, ReplicaCore

    core = ReplicaCore(RayConfig(str(tiny_control_fp32)), name="r0")
    try:
        out = core.run([parse_request({**BODY, "seed": 5}, img2img=True), parse_request({**BODY, "mask": b64(
            np.zeros((64, 64), np.uint8))}, img2img=True)])  # fmt: skip
    finally:
        core.pipe.close()
    image = np.asarray(Image.open(io.BytesIO(out[0].images[0])).convert("RGB"))
    np.testing.assert_array_equal(image, direct(pipe, 5))
    assert "Mask blur: 4" in out[0].infotexts[0]
    assert isinstance(out[1], RequestError) and "repaints nothing" in str(out[1])
