"""The start-up endpoints and the ``scheduler`` field, driven on a real `sdtrt serve` with webuiapi's own methods."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrt.serve.a1111_info import parse_parameters

from .test_server import Server, get, pixels, post

webuiapi = pytest.importorskip("webuiapi")

# alwayson_scripts given: webuiapi's default for it is one dict shared by every call, which keeps earlier units
FAST = {
    "prompt": "a red square",
    "negative_prompt": "blur, noise",
    "steps": 3,
    "width": 64,
    "height": 64,
    "alwayson_scripts": {},
}


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32, "--queue", "5")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def test_options_name_the_loaded_model_as_sd_models_does(api):
    options = api.get_options()
    (model,) = api.get_sd_models()
    assert options["sd_model_checkpoint"] == model["title"] and options["sd_checkpoint_hash"] == model["sha256"]
    assert re.fullmatch(r".+ \[[0-9a-f]{10}\]", model["title"]) and len(model["sha256"]) == 64
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 1
    assert options["sd_vae"] == "Automatic" and options["eta_noise_seed_delta"] == 0
    assert options["randn_source"] == "CPU"
    assert api.util_get_current_model() == model["title"]


def test_selecting_the_loaded_model_is_a_no_op(server, api):
    (model,) = api.get_sd_models()
    for name in (model["title"], model["model_name"], model["hash"], model["sha256"]):
        status, body, _ = server.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
        assert (status, body) == (200, None), name
    status, body, _ = server.post("/sdapi/v1/options", {"samples_format": "png", "CLIP_stop_at_last_layers": 1.0})
    assert (status, body) == (200, None)
    assert api.get_options()["sd_model_checkpoint"] == model["title"]


def test_a_switch_that_cannot_happen_is_refused(server, api):
    before = api.get_options()
    title = api.get_sd_models()[0]["title"]
    status, body, _ = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "other-model [0123456789]"})
    assert status == 422 and body["error"] == "invalid_request"
    assert "'other-model [0123456789]' is not a model of this server" in body["detail"]
    assert repr(title) in body["detail"]
    # all or nothing: one bad key refuses the whole body, and each bad key is named
    status, body, _ = server.post(
        "/sdapi/v1/options", {"sd_model_checkpoint": title, "no_such_option": 1, "samples_format": "jpg"}
    )
    assert status == 422
    assert "unknown or unsupported option 'no_such_option'" in body["detail"]
    assert "option 'samples_format' is 'png' on this server, got 'jpg'" in body["detail"]
    for change in ({"CLIP_stop_at_last_layers": 2}, {"sd_checkpoint_hash": "0" * 64}, {"img2img_fix_steps": 0}):
        status, body, _ = server.post("/sdapi/v1/options", change)
        assert status == 422 and repr(next(iter(change))) in body["detail"], body
    status, body, _ = server.post("/sdapi/v1/options", ["sd_model_checkpoint"])
    assert status == 422 and "JSON object" in body["detail"]
    assert api.get_options() == before


def test_webuiapi_util_set_model_selects_the_loaded_model(api, capsys):
    title = api.get_sd_models()[0]["title"]
    api.util_set_model(title.split(" [")[0].upper())  # webuiapi lowercases, then takes the closest title
    assert f"model changed to {title}" in capsys.readouterr().out
    api.util_wait_for_ready(check_interval=0.1)  # how clients wait after a switch: the server is idle at once
    assert api.util_get_current_model() == title
    api.util_set_model("no-such-model", find_closest=False)
    assert "model not found" in capsys.readouterr().out
    assert api.util_get_current_model() == title


def test_cmd_flags_are_the_serve_flags(server, api, tiny_fp32):
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["nowebui"] is True and flags["listen"] is False
    assert flags["port"] == server.port and flags["server_name"] == "127.0.0.1"
    assert Path(flags["ckpt"]) == Path(tiny_fp32)
    assert flags["queue"] == 5 and flags["backend"] == "onnxruntime" and flags["cache_interval"] == 1


def test_memory_reports_the_server_process(server, api):
    memory = api.get_memory()
    ram = memory["ram"]
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    assert 0.5 * rss < ram["used"] < 2 * rss, (ram, rss)  # the server's RSS, not this test's
    assert ram["free"] + ram["used"] == ram["total"] and ram["total"] > ram["used"]
    if torch.cuda.is_available():
        assert memory["cuda"]["system"]["total"] > 0
    else:
        assert memory["cuda"] == {"error": "unavailable"}


def test_what_sdtrt_has_none_of_is_an_empty_list(server, api):
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    for method in ("get_prompt_styles", "get_sd_vae", "get_hypernetworks", "get_face_restorers"):
        assert getattr(api, method)() == [], method
    assert api.get_realesrgan_models() == []
    script_info = json.loads(get(server.url + "/sdapi/v1/script-info")[1])
    assert [(s["name"], s["is_alwayson"], s["is_img2img"]) for s in script_info] == [
        ("controlnet", True, False),
        ("controlnet", True, True),
    ]


def test_schedulers_list_what_sdtrt_runs(api):
    schedulers = api.get_schedulers()
    assert [(s["name"], s["label"]) for s in schedulers] == [("automatic", "Automatic"), ("karras", "Karras")]
    assert set(schedulers[1]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert schedulers[1]["default_rho"] == 7.0
    assert api.util_get_scheduler_names() == ["automatic", "karras"]  # webuiapi lists the names


def test_sampler_plus_karras_is_the_combined_sampler(api):
    split = api.txt2img(**FAST, seed=11, sampler_name="DPM++ 2M", scheduler="Karras")
    combined = api.txt2img(**FAST, seed=11, sampler_name="DPM++ 2M Karras")  # webuiapi sends "automatic"
    lower = api.txt2img(**FAST, seed=11, sampler_name="dpmpp_2m", scheduler="karras")
    plain = api.txt2img(**FAST, seed=11, sampler_name="DPM++ 2M")
    assert split.parameters["scheduler"] == combined.parameters["scheduler"] == "Karras"
    assert plain.parameters["scheduler"] == "Automatic" and split.info["sampler_name"] == "DPM++ 2M Karras"
    np.testing.assert_array_equal(np.asarray(split.image), np.asarray(combined.image))
    np.testing.assert_array_equal(np.asarray(split.image), np.asarray(lower.image))
    difference = np.abs(np.asarray(split.image, dtype=float) - np.asarray(plain.image, dtype=float))
    assert difference.max() > 0  # Karras sigmas ran, not plain DPM++ 2M


def test_scheduler_on_img2img(server):
    init = pixels_b64(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    payload = {**FAST, "seed": 4, "init_images": [init], "denoising_strength": 0.7}
    split = server.post("/sdapi/v1/img2img", {**payload, "sampler_name": "DPM++ 2M", "scheduler": "KARRAS"})
    combined = server.post("/sdapi/v1/img2img", {**payload, "sampler_name": "DPM++ 2M Karras"})
    assert split[0] == combined[0] == 200 and split[1]["parameters"]["scheduler"] == "Karras"
    np.testing.assert_array_equal(pixels(split[1]["images"][0]), pixels(combined[1]["images"][0]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"sampler_name": "Euler", "scheduler": "Karras"},
            "scheduler 'Karras' with sampler 'Euler' is not implemented",
        ),
        ({"scheduler": "Karras"}, "scheduler 'Karras' with no sampler_name is not implemented"),
        ({"sampler_name": "Euler", "scheduler": "Exponential"}, "unknown scheduler 'Exponential'"),
        ({"sampler_name": "Euler", "scheduler": 3}, "scheduler must be a string"),
    ],
)
def test_a_scheduler_sdtrt_does_not_run_is_refused(server, fields, message):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, **fields})
    assert status == 422 and message in body["detail"], body
    if "string" not in message:
        assert "'Automatic' with any sampler, or 'DPM++ 2M' + 'Karras'" in body["detail"]
    assert server.post("/sdapi/v1/txt2img", {**FAST, "scheduler": "Automatic"})[0] == 200


def test_png_info_reads_back_what_the_server_wrote(api):
    result = api.txt2img(**FAST, seed=42, sampler_name="Euler", cfg_scale=6.5)
    info = api.png_info(result.image)
    assert info.info == result.info["infotexts"][0]
    fields = info.parameters
    assert fields["Prompt"] == FAST["prompt"] and fields["Negative prompt"] == FAST["negative_prompt"]
    assert (fields["Seed"], fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("42", "3", "Euler", "6.5")
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "64")
    assert fields["Model hash"] == result.info["sd_model_hash"] and fields["Schedule type"] == "Automatic"
    assert info.json["items"] == {}


def test_png_info_of_a_png_without_parameters_and_of_bad_input(server, api):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    info = api.png_info(Image.open(buffer))
    assert (info.info, info.parameters, info.json["items"]) == ("", {}, {})
    status, body, _ = server.post("/sdapi/v1/png-info", {"image": "not base64!"})
    assert status == 422 and "image is not valid base64" in body["detail"]
    status, body, _ = server.post("/sdapi/v1/png-info", {})
    assert status == 422 and '{"image": "<base64 PNG>"}' in body["detail"]


def test_parse_parameters_as_a1111_reads_infotext():
    text = (
        "a cat, (detailed)\nsecond line\nNegative prompt: ugly, blurry\nmore negative\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
        'Lora hashes: "style: abc123, detail: def456", Clip skip: 2'
    )
    fields = parse_parameters(text)
    assert fields["Prompt"] == "a cat, (detailed)\nsecond line"
    assert fields["Negative prompt"] == "ugly, blurry\nmore negative"
    assert (fields["Size-1"], fields["Size-2"], fields["Clip skip"]) == ("512", "768", "2")
    assert fields["Lora hashes"] == "style: abc123, detail: def456" and fields["Schedule type"] == "Karras"
    # fewer than three "key: value" pairs on the last line: it is prompt text
    assert parse_parameters("just a prompt: with a colon") == {
        "Prompt": "just a prompt: with a colon",
        "Negative prompt": "",
        "Clip skip": "1",
        "Schedule type": "Automatic",
    }


def pixels_b64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def ray_url(tiny_fp32):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from sdtrt.serve.ray_app import RayConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayConfig(str(tiny_fp32), cpus_per_replica=0.5, max_queued_requests=7)
        serve.run(build_app(config, host="127.0.0.1", port=port), route_prefix="/", name="sdtrt")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while get(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow  # ~50 s on 2 cores, almost all of it Ray starting
def test_ray_serves_the_same_start_up_endpoints(ray_url, tiny_fp32):
    api = webuiapi.WebUIApi(baseurl=ray_url + "/sdapi/v1")
    title = api.get_sd_models()[0]["title"]
    assert api.util_get_current_model() == title and api.get_options()["samples_format"] == "png"
    status, body = post(ray_url + "/sdapi/v1/options", {"sd_model_checkpoint": "elsewhere"})[:2]
    assert status == 422 and "is not a model of this server" in body["detail"]
    flags = api.get_cmd_flags()
    assert flags["ray"] is True and flags["queue"] == 7 and flags["port"] == int(ray_url.rsplit(":", 1)[1])
    assert Path(flags["ckpt"]) == Path(tiny_fp32) and flags["min_replicas"] == 1
    memory = api.get_memory()  # asked of the replica that holds the pipeline
    assert memory["ram"]["used"] > 0 and "cuda" in memory
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}} and api.get_sd_vae() == []
    split = api.txt2img(**FAST, seed=3, sampler_name="DPM++ 2M", scheduler="Karras")
    combined = api.txt2img(**FAST, seed=3, sampler_name="DPM++ 2M Karras")
    assert split.parameters["scheduler"] == "Karras"
    np.testing.assert_array_equal(np.asarray(split.image), np.asarray(combined.image))
    assert api.png_info(split.image).parameters["Seed"] == "3"


def test_webuiapi_samplers_and_set_options(api):
    from sdtrt.runtime.schedulers import A1111_LABELS

    assert api.util_get_sampler_names() == sorted(A1111_LABELS.values())
    assert {s["name"]: s["aliases"][0] for s in api.get_samplers()} == {v: k for k, v in A1111_LABELS.items()}
    assert api.set_options({"samples_format": "png"}) is None  # A1111's answer: null
    refused = api.set_options({"samples_format": "jpg"})
    assert refused["error"] == "invalid_request" and "samples_format" in refused["detail"]
    assert api.get_options()["samples_format"] == "png"
