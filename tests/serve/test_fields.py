"""A1111 fields sdtrt does not run: accepted at the value that leaves them off, a 422 naming them otherwise.

Driven on a real `sdtrt serve` with webuiapi, which sends every A1111 field on every request: its defaults must run
(and give the image a plain request gives), and each field it can set to "on" must be refused, not ignored.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from sdtrt.serve.fields import NO_EFFECT, OFF_VALUES
from sdtrt.serve.limits import A1111_FIELDS

from .test_server import Server, pixels

webuiapi = pytest.importorskip("webuiapi")

BASE = {"prompt": "a red square", "steps": 3, "width": 64, "height": 64, "seed": 7, "cfg_scale": 7.5}


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def test_every_field_has_a_rule():
    """Each A1111 field is parsed, off-valued or without effect: a new one cannot slip through unconsidered."""
    parsed = {
        "prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
        "steps", "cfg_scale", "width", "height", "eta", "denoising_strength", "override_settings", "alwayson_scripts",
        "init_images", "resize_mode", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
        "override_settings_restore_afterwards", "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "mask_round",
        "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    }  # fmt: skip
    assert A1111_FIELDS == parsed | set(OFF_VALUES) | NO_EFFECT
    assert not (parsed & set(OFF_VALUES)) and not (parsed & NO_EFFECT) and not (set(OFF_VALUES) & NO_EFFECT)


def test_webuiapi_defaults_run_as_a_plain_request(server, api):
    """webuiapi sends restore_faces=False, subseed_strength=0, eta=1.0, s_noise=1, ... : all off, same image."""
    plain = server.post("/sdapi/v1/txt2img", {**BASE, "sampler_name": "Euler a"})
    assert plain[0] == 200, plain[1]
    result = api.txt2img(**BASE, sampler_name="Euler a", alwayson_scripts={})
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), pixels(plain[1]["images"][0]))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("restore_faces", True, "face restoration is not implemented"),
        ("tiling", True, "tiling is not implemented"),
        ("subseed_strength", 0.3, "variation seeds"),
        ("seed_resize_from_h", 512, "seed resizing"),
        ("s_churn", 0.5, "churn"),
        ("s_noise", 0.9, "ancestral noise scale"),
        ("styles", ["cinematic"], "prompt styles"),
        ("script_name", "x/y/z plot", "scripts are not implemented"),
        ("send_images", False, "always carries the images"),
        ("save_images", True, "saves nothing"),
    ],
)
def test_a_field_set_on_is_refused_by_name(api, field, value, match):
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(**BASE, sampler_name="Euler", alwayson_scripts={}, **{field: value})
    assert f"{field} " in str(caught.value) and re.search(match, str(caught.value)), caught.value


def test_fields_webuiapi_does_not_send_are_refused_too(server):
    for field, value, match in (("refiner_checkpoint", "sdxl_refiner", "refiner"), ("firstpass_image", "x", "")):
        status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, field: value})
        assert status == 422 and f"{field} " in body["detail"] and match in body["detail"], body


def test_overrides_that_would_persist_in_a1111_are_refused(server):
    """A1111 keeps override_settings for later requests when told not to restore them; sdtrt never does."""
    keep = {"override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": False}
    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, **keep})
    assert status == 422 and "would keep CLIP_stop_at_last_layers for later requests" in body["detail"], body
    restored = {**keep, "override_settings_restore_afterwards": True}
    assert server.post("/sdapi/v1/txt2img", {**BASE, **restored})[0] == 200
    fixed = {"override_settings": {"eta_ddim": 0.0}, "override_settings_restore_afterwards": False}
    assert server.post("/sdapi/v1/txt2img", {**BASE, **fixed})[0] == 200  # the server's own value: nothing kept


def test_eta_runs_only_with_the_value_its_sampler_runs(server):
    euler_a = server.post("/sdapi/v1/txt2img", {**BASE, "sampler_name": "Euler a", "eta": 1.0})
    euler = server.post("/sdapi/v1/txt2img", {**BASE, "sampler_name": "Euler", "eta": 0.3})  # euler reads no eta
    assert euler_a[0] == 200 and euler[0] == 200
    for sampler, eta in (("DDIM", 1.0), ("Euler a", 0.5)):
        status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, "sampler_name": sampler, "eta": eta})
        assert status == 422 and f"eta {eta} with this sampler" in body["detail"], body
    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, "eta": 0.5})
    assert status == 422 and "needs a sampler_name" in body["detail"]


@pytest.mark.parametrize("key", ["prompt", "negative_prompt"])
def test_lora_tags_are_refused_not_encoded_as_text(server, key):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, key: "a cat <lora:style:0.8>"})
    assert status == 422 and "<lora:style:0.8>" in body["detail"] and key in body["detail"], body


def test_img2img_refuses_what_it_does_not_run(server):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 90, 200)).save(buffer, format="PNG")
    init = {**BASE, "init_images": [base64.b64encode(buffer.getvalue()).decode()], "denoising_strength": 0.5}
    assert server.post("/sdapi/v1/img2img", {**init, "resize_mode": 0, "mask_blur": 4})[0] == 200
    # the same aspect ratio: every resize mode gives what "Just resize" gives
    assert server.post("/sdapi/v1/img2img", {**init, "resize_mode": 1, "width": 128, "height": 128})[0] == 200
    for extra, match in (
        ({"mask": init["init_images"][0], "inpaint_full_res": False}, "mask: the mask repaints nothing"),
        ({"enable_hr": True}, "img2img has no hires fix"),
        ({"include_init_images": True}, "generated images only"),
        ({"resize_mode": 1, "width": 128}, "resize_mode 1 .* not implemented for the init image, which is 64x64"),
    ):
        status, body, _ = server.post("/sdapi/v1/img2img", {**init, **extra})
        assert status == 422 and re.search(match, body["detail"]), (extra, body)
    assert server.post("/sdapi/v1/txt2img", BASE)[0] == 200  # still serving
