"""Hires fix on `sdtrt serve`: a real server on loopback driven with the A1111 client `webuiapi` and urllib; the
images equal `sdtrt generate --hires-*`'s for the same seed, pixel for pixel."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.errors import RequestError
from sdtrt.serve.generate import merge_key

from .test_server import Server, generate_cli, get, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BASE = {"prompt": "a red square", "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"}
CLI = ["a red square", "--steps", "4", "--size", "64x64", "--cfg", "7.5", "--scheduler", "euler"]


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32)
    yield srv
    assert srv.stop() == 0


def test_webuiapi_hires_equals_the_cli(server, tiny_fp32, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(
        prompt=BASE["prompt"], seed=42, steps=4, width=64, height=64, cfg_scale=7.5, sampler_name="Euler",
        enable_hr=True, hr_scale=2, denoising_strength=0.6, hr_second_pass_steps=3,
    )  # fmt: skip
    assert result.image.size == (128, 128)  # the second pass's size
    assert result.info["width"] == 64 and result.info["denoising_strength"] == 0.6  # as A1111: the first pass's
    text = result.info["infotexts"][0]
    assert "Size: 64x64" in text and "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 3" in text
    assert "Hires upscaler: Latent" in result.image.info["parameters"]
    hires = ["--hires-scale", "2", "--hires-denoise", "0.6", "--hires-steps", "3"]
    expected = generate_cli(tiny_fp32, tmp_path / "cli.png", *CLI, "--seed", "42", *hires)
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), expected)
    plain = api.txt2img(prompt=BASE["prompt"], seed=42, steps=4, width=64, height=64, sampler_name="Euler")
    assert plain.image.size == (64, 64) and "Hires" not in plain.info["infotexts"][0]


def test_pixel_upscaler_resize_and_second_pass_fields(server, tiny_fp32, tmp_path):
    payload = {**BASE, "seed": 7, "batch_size": 2, "enable_hr": True, "hr_upscaler": "Lanczos", "hr_resize_x": 128,
               "hr_resize_y": 96, "denoising_strength": 0.5, "hr_sampler_name": "DPM++ 2M", "hr_prompt": "a blue disc",
               "hr_cfg": 5, "hr_scheduler": "Automatic", "hr_checkpoint_name": None}  # fmt: skip
    status, body, _ = server.post("/sdapi/v1/txt2img", payload)
    assert status == 200, body
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8]
    assert [pixels(b).shape for b in body["images"]] == [(96, 128, 3)] * 2  # covers 128x128, cropped to 96
    assert "Hires sampler: DPM++ 2M, Hires prompt: a blue disc, Hires resize: 128x96" in info["infotexts"][0]
    assert "Hires upscaler: Lanczos, Hires CFG Scale: 5" in info["infotexts"][0]
    args = ["--hires-size", "128x96", "--hires-upscaler", "Lanczos", "--hires-denoise", "0.5", "--hires-sampler"]
    args += ["dpmpp_2m", "--hires-prompt", "a blue disc", "--hires-cfg", "5"]
    expected = generate_cli(tiny_fp32, tmp_path / "cli.png", *CLI, "--seed", "8", *args)
    np.testing.assert_array_equal(pixels(body["images"][1]), expected)


def test_upscaler_lists(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    upscalers = api.get_upscalers()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = [m["name"] for m in api.get_latent_upscale_modes()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and len(modes) == 6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hr_scale": 4, "width": 128, "height": 128}, r"512x512 is outside the profile .*sdtrt export tiny .*512x512"),
        ({"hr_upscaler": "R-ESRGAN 4x+"}, r"unknown hires upscaler 'R-ESRGAN 4x\+'; expected one of: Latent"),
        ({"hr_scheduler": "Karras"}, r"hr_scheduler 'Karras' is not supported"),
        ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name 'other.safetensors' is not supported"),
        ({"hr_scale": 0}, r"hires scale must be a number > 0"),
        ({"denoising_strength": 0}, r"denoising strength must be in \(0, 1\]"),
        ({"hr_second_pass_steps": -1}, "hires steps must be an integer >= 0"),
        ({"hr_sampler_name": "Heun"}, "unknown sampler 'Heun'"),
        ({"enable_hr": "yes"}, "enable_hr must be true or false"),
    ],
)
def test_bad_hires_requests_are_422(server, fields, message):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, "enable_hr": True, **fields})
    assert status == 422, body
    assert body["error"] == "invalid_request"
    assert re.search(message, body["detail"]), body["detail"]
    assert get(server.url + "/health")[0] == 200  # still serving


def test_hires_requests_never_merge_with_plain_ones():
    plain = parse_request({**BASE, "seed": 1})
    hires = parse_request({**BASE, "seed": 2, "enable_hr": True})
    same = parse_request({**BASE, "seed": 3, "prompt": "other", "enable_hr": True})
    other = parse_request({**BASE, "seed": 4, "enable_hr": True, "hr_scale": 1.5})
    assert merge_key(plain) != merge_key(hires) == merge_key(same) != merge_key(other)
    assert parse_request({**BASE, "enable_hr": False, "hr_scale": 99}).hires is None
    with pytest.raises(RequestError, match="hr_resize_x must be an integer"):
        parse_request({**BASE, "enable_hr": True, "hr_resize_x": "wide"})


def test_replica_merges_hires_requests_with_the_images_they_give_alone(tiny_fp32):
    from sdtrt.serve.ray_app import RayConfig, ReplicaCore

    core = ReplicaCore(RayConfig(str(tiny_fp32)), name="r0")
    try:
        for upscaler in ("Lanczos", "Latent"):
            hr = {"enable_hr": True, "hr_upscaler": upscaler, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
            requests = [
                parse_request({**BASE, "seed": 31, **hr}),
                parse_request({**BASE, "prompt": "a blue circle", "seed": 32, "batch_size": 2, **hr}),
                parse_request({**BASE, "seed": 34}),  # plain: runs on its own
            ]
            out = core.run(requests)
            assert [pixels_of(g).shape for g in out] == [(128, 128, 3), (128, 128, 3), (64, 64, 3)]
            assert out[1].seeds == [32, 33] and "Hires upscaler: " + upscaler in out[1].infotexts[1]
            (alone,) = core.run([requests[1]])
            np.testing.assert_array_equal(pixels_of(out[1], 1), pixels_of(alone, 1))
    finally:
        core.pipe.close()


def pixels_of(generation, k: int = 0) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(generation.images[k])).convert("RGB"))
