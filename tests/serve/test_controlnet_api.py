"""The ControlNet extension's API on `sdtrt serve`: a real server on loopback, driven with urllib (and webuiapi).

Units in ``alwayson_scripts``: every bad field is a 422 naming the unit and the field, before any work; the
``/controlnet/...`` endpoints answer with the extension's shapes; ``detect`` runs the runtime's canny.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.control.hint import canny_edges, hint_pixels

from .test_server import FAST, Server, get, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def png_b64(array: np.ndarray, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def shape_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A white disc and a grey square on black: a hint with clear edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = 255
    image[size // 8 : size // 3, size // 8 : size // 3] = 128
    return image


HINT = png_b64(shape_image())


def unit(**fields) -> dict:
    base = {"enabled": True, "module": "none", "model": "edges", "image": HINT, "weight": 1.0}
    return {**base, **fields}


def txt2img_with(*units: dict, key: str = "controlnet", **payload) -> dict:
    return {**FAST, "seed": 1, **payload, "alwayson_scripts": {key: {"args": list(units)}}}


@pytest.fixture(scope="module")
def plain_server(tiny_fp32):
    """A model without ControlNets: enough for the schema's refusals and the preprocessor endpoints."""
    srv = Server(tiny_fp32)
    yield srv
    assert srv.stop() == 0


def get_json(server: Server, path: str) -> object:
    status, text = get(server.url + path)
    assert status == 200, text
    return json.loads(text)


# --- the schema: each bad field a 422 naming the unit and the field ------------------------------------------

BAD_UNITS = [
    ([unit(weight=-1)], r"^controlnet unit 0: weight must be >= 0, got -1$"),
    ([unit(weight=2.5)], r"^controlnet unit 0: weight must be <= 2, got 2\.5$"),
    ([unit(weight="1")], r"^controlnet unit 0: weight must be a number"),
    ([unit(guidance_start=0.5, guidance_end=0.5)], r"unit 0: guidance_start must be below guidance_end"),
    ([unit(guidance_start=0.6, guidance="0.2")], r"unit 0: guidance_end must be a number"),
    ([unit(guidance_start=0.6, guidance=0.2)], r"unit 0: guidance_start must be below guidance_end, got start 0\.6"),
    ([unit(guidance_end=1.5)], r"^controlnet unit 0: guidance_end must be <= 1, got 1\.5$"),
    ([unit(guidance_start=-0.1)], r"^controlnet unit 0: guidance_start must be >= 0, got -0\.1$"),
    ([unit(), unit(model="depth", colour="red")], r"^controlnet unit 1: unknown field\(s\) 'colour'"),
    ([unit(enabled=False, strength=1)], r"^controlnet unit 0: unknown field\(s\) 'strength'"),
    ([unit(guidance=0.5, guidance_end=0.5)], r"unit 0: give 'guidance_end' or its old name 'guidance', not both"),
    ([unit(image="not base64!")], r"^controlnet unit 0: image is not valid base64"),
    ([unit(image="aGVsbG8=")], r"^controlnet unit 0: image is not an image Pillow can read"),
    ([unit(image="")], r"^controlnet unit 0: image is missing"),
    ([unit(image={"image": HINT, "mask": HINT})], r"^controlnet unit 0: mask is not supported"),
    ([unit(mask=HINT)], r"^controlnet unit 0: mask is not supported"),
    ([unit(image=[HINT, HINT])], r"^controlnet unit 0: image must be one base64 image"),
    ([unit(module="depth_midas")], r"^controlnet unit 0: module 'depth_midas' is not available.*none, canny"),
    ([unit(model="None")], r"^controlnet unit 0: model must name one of the server's ControlNets"),
    ([unit(control_mode="Prompt first")], r"^controlnet unit 0: control_mode must be 0, 1, 2 or one of"),
    ([unit(resize_mode="Stretch")], r"^controlnet unit 0: resize_mode is invalid: unknown resize mode 'Stretch'"),
    ([unit(module="canny", threshold_a=300)], r"^controlnet unit 0: threshold_a must be from 1 to 255"),
    ([unit(module="canny", processor_res=32)], r"^controlnet unit 0: processor_res must be from 64 to 2048"),
    ([unit(enabled="yes")], r"^controlnet unit 0: enabled must be true or false"),
    ([unit(advanced_weighting=[1.0] * 13)], r"^controlnet unit 0: advanced_weighting is not supported"),
    (["a unit"], r"^controlnet unit 0 must be an object of unit fields, got str"),
]


@pytest.mark.parametrize("units, match", BAD_UNITS)
def test_each_bad_unit_field_is_a_422_naming_unit_and_field(plain_server, units, match):
    status, body, _ = plain_server.post("/sdapi/v1/txt2img", txt2img_with(*units))
    assert status == 422 and body["error"] == "invalid_request", body
    assert re.search(match, body["detail"]), body["detail"]


@pytest.mark.parametrize(
    "scripts, match",
    [
        ({"ADetailer": {"args": [False]}}, r"always on script\(s\) 'ADetailer' not found"),
        ({"controlnet": {"args": []}, "ControlNet": {"args": []}}, "gives the ControlNet script twice"),
        ({"controlnet": [unit()]}, r'alwayson_scripts\.controlnet must be an object \{"args"'),
        ({"controlnet": {"args": unit()}}, r"alwayson_scripts\.controlnet\.args must be a list"),
        ([1], "alwayson_scripts must be an object"),
    ],
)
def test_bad_alwayson_scripts_are_422(plain_server, scripts, match):
    status, body, _ = plain_server.post("/sdapi/v1/txt2img", {**FAST, "alwayson_scripts": scripts})
    assert status == 422 and re.search(match, body["detail"]), body


def test_a_model_without_controlnets_refuses_units_naming_the_fix(plain_server):
    for key in ("controlnet", "ControlNet", "controlNet"):
        status, body, _ = plain_server.post("/sdapi/v1/txt2img", txt2img_with(unit(), key=key))
        assert status == 422, body
        assert body["detail"].startswith("controlnet unit 0: 1 unit(s) are enabled but this model serves 0")
        assert "sdtrt export CONTROLNET --into FOLDER" in body["detail"]


def test_disabled_units_and_empty_args_change_nothing(plain_server):
    status, plain, _ = plain_server.post("/sdapi/v1/txt2img", {**FAST, "seed": 1})
    assert status == 200, plain
    disabled = unit(enabled=False, weight=-1, model="no such model", image="")  # values of disabled units unread
    no_enabled = {"model": "edges", "image": HINT}  # the extension's default is enabled: false
    for scripts in ({"ControlNet": {"args": []}}, {"controlnet": {"args": [disabled, no_enabled]}}):
        status, body, _ = plain_server.post("/sdapi/v1/txt2img", {**FAST, "seed": 1, "alwayson_scripts": scripts})
        assert status == 200, body
        assert np.array_equal(pixels(body["images"][0]), pixels(plain["images"][0]))


# --- the extension's endpoints ------------------------------------------------------------------------------


def test_version_lists_and_control_types(plain_server):
    assert get_json(plain_server, "/controlnet/version") == {"version": 3}
    assert get_json(plain_server, "/controlnet/model_list") == {"model_list": []}
    assert get_json(plain_server, "/controlnet/model_list?update=false") == {"model_list": []}
    modules = get_json(plain_server, "/controlnet/module_list")
    assert get_json(plain_server, "/controlnet/module_list?alias_names=true") == modules
    assert modules["module_list"] == ["none", "canny"]
    resolution = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    assert modules["module_detail"]["none"] == {"model_free": False, "sliders": [resolution]}
    assert modules["module_detail"]["canny"]["sliders"] == [
        resolution,
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    types = get_json(plain_server, "/controlnet/control_types")["control_types"]
    assert list(types) == ["All", "Canny"]
    assert types["Canny"] == {
        "module_list": ["none", "canny"],
        "model_list": ["None"],
        "default_option": "canny",
        "default_model": "None",
    }
    assert get_json(plain_server, "/controlnet/settings") == {"control_net_unit_count": 0}
    assert get_json(plain_server, "/sdapi/v1/scripts")["txt2img"] == ["controlnet"]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_detect_canny_equals_the_runtime_canny(plain_server):
    source = shape_image(96, seed=3)
    payload = {
        "controlnet_module": "canny",
        "controlnet_input_images": [png_b64(source), png_b64(source[:, :80], data_url=True)],
        "controlnet_processor_res": 128,
        "controlnet_threshold_a": 50,
        "controlnet_threshold_b": 150.7,  # truncated to 150, as the extension's int() does
    }
    status, body, _ = plain_server.post("/controlnet/detect", payload)
    assert status == 200, body
    assert body["info"] == "Success" and len(body["images"]) == 2
    for got, image in zip(body["images"], (source, source[:, :80]), strict=True):
        expected = canny_edges(hint_pixels(image), 50, 150, 128)
        np.testing.assert_array_equal(decode(got), expected)
        assert set(np.unique(expected)) == {0, 255}  # real edges, not an empty map
    defaults = {"controlnet_module": "canny", "controlnet_images": [png_b64(source)]}  # webuiapi's field name
    status, body, _ = plain_server.post("/controlnet/detect", defaults)
    assert status == 200, body
    np.testing.assert_array_equal(decode(body["images"][0]), canny_edges(source, 100, 200, 512))
    status, body, _ = plain_server.post("/controlnet/detect", {"controlnet_input_images": [png_b64(source)]})
    assert status == 200 and np.array_equal(decode(body["images"][0]), source)  # module "none": unchanged


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"controlnet_module": "openpose", "controlnet_input_images": [HINT]}, "'openpose' is not available"),
        ({"controlnet_module": "canny", "controlnet_input_images": []}, "must be a non-empty list"),
        ({"controlnet_input_images": ["nope!"]}, r"controlnet_input_images\[0\] is not valid base64"),
        ({"controlnet_input_images": [HINT], "controlnet_threshold_a": 0}, "threshold_a must be from 1 to 255"),
        ({"controlnet_input_images": [HINT], "controlnet_processor_res": 4096}, "processor_res must be from 64"),
        ({"controlnet_input_images": [HINT], "controlnet_masks": [HINT]}, "controlnet_masks is not supported"),
        ({"controlnet_input_images": [HINT], "controlnet_resolution": 512}, "unknown field.*'controlnet_resolution'"),
    ],
)
def test_detect_refusals_are_422(plain_server, payload, match):
    status, body, _ = plain_server.post("/controlnet/detect", payload)
    assert status == 422 and re.search(match, body["detail"]), body


def test_requests_merge_only_with_the_same_controlnet_units():
    """One pipeline call has one set of controls for all its images: only identical units may share it."""
    from sdtrt.serve.a1111 import parse_request
    from sdtrt.serve.generate import merge_key

    def key(*units: dict, **payload) -> object:
        return merge_key(parse_request(txt2img_with(*units, **payload)))

    assert key(unit()) == key(unit(), prompt="another prompt", seed=9) is not None
    assert key(unit()) != merge_key(parse_request({**FAST, "seed": 1}))
    others = [
        unit(model="depth"),
        unit(control_mode=2),  # guess mode
        unit(weight=0.5),
        unit(image=png_b64(shape_image(seed=1))),
        unit(guidance_end=0.8),
        unit(module="canny"),
        unit(resize_mode=0),
    ]
    for other in others:
        assert key(other) != key(unit()), other
    assert key(unit(), unit(model="depth")) != key(unit())


# --- served ControlNets: the same images as the pipeline called with the same controls -----------------------


@pytest.fixture(scope="module")
def control_server(tiny_control_fp32):
    srv = Server(tiny_control_fp32)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def control_pipe(tiny_control_fp32):
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(tiny_control_fp32, device="cpu") as pipe:
        yield pipe


def direct(pipe, controls, **call) -> np.ndarray:
    """The pipeline called as the server calls it for FAST with seed 1."""
    args = {"steps": FAST["steps"], "guidance_scale": FAST["cfg_scale"], "seed": 1, "height": 64, "width": 64}
    result = pipe(FAST["prompt"], scheduler="euler", controls=controls, **{**args, **call})
    return np.asarray(result.images[0].convert("RGB"))


def hint_image(b64: str = HINT) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_model_list_and_control_types_name_the_served_controlnets(control_server):
    assert get_json(control_server, "/controlnet/model_list") == {"model_list": ["depth", "edges"]}
    types = get_json(control_server, "/controlnet/control_types")["control_types"]
    assert types["All"]["model_list"] == ["None", "depth", "edges"] and types["Canny"]["model_list"] == ["None"]
    assert get_json(control_server, "/controlnet/settings") == {"control_net_unit_count": 2}


def test_one_unit_equals_the_pipeline_with_its_control(control_server, control_pipe):
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.inputs import ControlInput

    sent = unit(
        model="edges [0123abcd]",
        module="Canny",
        weight=1.2,
        threshold_a=50,
        threshold_b=150,
        resize_mode="Just Resize",
        processor_res=256,
    )
    status, body, _ = control_server.post("/sdapi/v1/txt2img", txt2img_with(sent, key="ControlNet"))
    assert status == 200, body
    control = ControlInput(
        "edges",
        hint_image(),
        1.2,
        resize_mode="just_resize",
        preprocess="canny",
        low_threshold=50,
        high_threshold=150,
        processor_res=256,
    )
    expected = direct(control_pipe, [control])
    got = pixels(body["images"][0])
    assert psnr(got, expected, 255.0) >= 40.0, psnr(got, expected, 255.0)
    assert psnr(got, direct(control_pipe, []), 255.0) < 30.0  # the ControlNet changes the image
    info = json.loads(body["info"])
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 1.2' in info["infotexts"][0]


def test_two_units_equal_the_pipeline_with_both_controls(control_server, control_pipe):
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.inputs import ControlInput

    depth_hint = png_b64(shape_image(48, seed=5))
    units = [
        unit(model="edges"),
        unit(enabled=False, model="edges"),  # disabled: skipped, and it does not count as a second "edges"
        {
            "enabled": True,
            "model": "Depth",
            "input_image": depth_hint,
            "weight": 0.5,
            "guidance": 0.7,
            "control_mode": "ControlNet is more important",
            "resize_mode": 2,
            "lowvram": True,
        },
    ]
    status, body, _ = control_server.post("/sdapi/v1/txt2img", txt2img_with(*units, key="controlNet"))
    assert status == 200, body
    controls = [
        ControlInput("edges", hint_image()),
        ControlInput("depth", hint_image(depth_hint), 0.5, 0.0, 0.7, guess_mode=True, resize_mode="resize_and_fill"),
    ]
    got = pixels(body["images"][0])
    assert psnr(got, direct(control_pipe, controls), 255.0) >= 40.0
    assert psnr(got, direct(control_pipe, controls[:1]), 255.0) < 30.0


def test_img2img_unit_without_image_takes_the_init_image(control_server, control_pipe):
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.hint import pixel_perfect_resolution
    from sdtrt.runtime.control.inputs import ControlInput

    init = shape_image(80, seed=7)
    payload = {
        **FAST,
        "seed": 1,
        "steps": 6,
        "init_images": [png_b64(init, data_url=True)],
        "denoising_strength": 0.9,
        "resize_mode": 1,
        "alwayson_scripts": {
            "controlnet": {"args": [{"enabled": True, "model": "edges", "module": "canny", "pixel_perfect": True}]}
        },
    }
    status, body, _ = control_server.post("/sdapi/v1/img2img", payload)
    assert status == 200, body
    res = pixel_perfect_resolution(80, 80, 64, 64, "crop_and_resize")
    image = Image.fromarray(init)
    control = ControlInput("edges", image, resize_mode="crop_and_resize", preprocess="canny", processor_res=res)
    expected = direct(control_pipe, [control], image=image, strength=0.9, steps=6)
    got = pixels(body["images"][0])
    assert psnr(got, expected, 255.0) >= 40.0
    assert psnr(got, direct(control_pipe, [], image=image, strength=0.9, steps=6), 255.0) < 30.0


@pytest.mark.parametrize(
    "units, match",
    [
        (
            [unit(model="openpose [abc123]")],
            r"^controlnet unit 0: model 'openpose \[abc123\]' is not served; this "
            r"model has depth, edges",
        ),
        ([unit(), unit(model="Edges [d14c016b]")], r"^controlnet unit 1: model 'edges' is already used by unit 0"),
        (
            [unit(), unit(model="depth"), unit(model="depth")],
            r"^controlnet unit 2: 3 unit\(s\) are enabled but "
            r"this model serves 2 ControlNet\(s\) \(depth, edges\)",
        ),
    ],
)
def test_units_the_artifact_cannot_run_are_422(control_server, units, match):
    status, body, _ = control_server.post("/sdapi/v1/txt2img", txt2img_with(*units))
    assert status == 422 and re.search(match, body["detail"]), body


def test_the_webuiapi_client_end_to_end(control_server, control_pipe):
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.inputs import ControlInput

    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=control_server.port)
    assert api.controlnet_version() == 3
    assert api.controlnet_model_list() == ["depth", "edges"]
    assert api.controlnet_module_list() == ["none", "canny"]
    hint = hint_image().convert("RGB")
    cn = webuiapi.ControlNetUnit(
        image=hint,
        module="canny",
        model="edges [d14c016b]",
        weight=0.9,
        resize_mode="Crop and Resize",
        threshold_a=60,
        threshold_b=160,
        control_mode=2,
    )
    result = api.txt2img(
        prompt=FAST["prompt"],
        seed=1,
        steps=FAST["steps"],
        width=64,
        height=64,
        cfg_scale=FAST["cfg_scale"],
        sampler_name="Euler",
        controlnet_units=[cn],
    )
    control = ControlInput(
        "edges", hint, 0.9, guess_mode=True, preprocess="canny", low_threshold=60, high_threshold=160
    )
    got = np.asarray(result.image.convert("RGB"))
    assert psnr(got, direct(control_pipe, [control]), 255.0) >= 40.0
    assert result.info["all_seeds"] == [1]
    detected = api.controlnet_detect([hint], module="canny", processor_res=64, threshold_a=60, threshold_b=160)
    assert detected.info == "Success"
    np.testing.assert_array_equal(np.asarray(detected.image), canny_edges(np.asarray(hint), 60, 160, 64))


def test_replica_merges_only_requests_with_the_same_units(tiny_control_fp32, control_pipe):
    """The Ray replica's batching: same units -> one call; other units -> their own; images as called alone."""
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.serve.a1111 import parse_request
    from sdtrt.serve.ray_app import RayConfig, ReplicaCore

    core = ReplicaCore(RayConfig(str(tiny_control_fp32)), name="r0")
    try:
        requests = [
            parse_request(txt2img_with(unit(), seed=1)),
            parse_request(txt2img_with(unit(), seed=1, prompt="a blue circle")),
            parse_request(txt2img_with(unit(control_mode=2), seed=1)),
            parse_request({**FAST, "seed": 1}),
        ]
        out = core.run(requests)
    finally:
        core.pipe.close()
    assert out[0].seconds == out[1].seconds  # one pipeline call
    assert len({out[0].seconds, out[2].seconds, out[3].seconds}) == 3
    references = [
        direct(control_pipe, [ControlInput("edges", hint_image())]),
        np.asarray(
            control_pipe(
                "a blue circle",
                scheduler="euler",
                controls=[ControlInput("edges", hint_image())],
                steps=3,
                guidance_scale=7.5,
                seed=1,
                height=64,
                width=64,
            )
            .images[0]
            .convert("RGB")
        ),
        direct(control_pipe, [ControlInput("edges", hint_image(), guess_mode=True)]),
        direct(control_pipe, []),
    ]
    for gen, reference in zip(out, references, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(gen.images[0])).convert("RGB")), reference)


def test_my_prompt_is_more_important_is_the_extensions_soft_weights(control_server, control_pipe):
    from sdtrt.runtime.compare import psnr
    from sdtrt.runtime.control.inputs import ControlInput

    status, body, _ = control_server.post("/sdapi/v1/txt2img", txt2img_with(unit(model="edges", control_mode=1)))
    assert status == 200, body
    got = pixels(body["images"][0])
    soft = direct(control_pipe, [ControlInput("edges", hint_image(), soft_weights=True)])
    assert psnr(got, soft, 255.0) >= 40.0
    assert psnr(got, direct(control_pipe, [ControlInput("edges", hint_image())]), 255.0) < 40.0
