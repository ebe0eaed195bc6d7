"""Step caching on `sdtrt serve`: real servers on loopback, driven with the A1111 client `webuiapi` and urllib.

A request chooses its caching with ``sdtrt_cache_interval`` / ``sdtrt_cache_schedule`` (in ``override_settings``
or top-level); the server's ``--cache-interval`` / ``--cache-schedule`` is the default for the others. A cached
image is checked against the pipeline called directly with the same caching (equal), and against the uncached
image (different, but close: PSNR >= MIN_PSNR dB; about 44 dB measured on the tiny model at N = 3, 8 steps).
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.compare import psnr
from sdtrt.runtime.pipeline import Pipeline

from .test_server import SDTRT, Server, get, parse_prometheus, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

STEPS = 8
BASE = {"prompt": "a red square", "steps": STEPS, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"}
MIN_PSNR = 30.0


def cached_payload(interval: int | None = None, schedule: str | None = None, **payload) -> dict:
    overrides = {}
    if interval is not None:
        overrides["sdtrt_cache_interval"] = interval
    if schedule is not None:
        overrides["sdtrt_cache_schedule"] = schedule
    return {**BASE, "seed": 42, **payload, "override_settings": overrides}


@pytest.fixture(scope="module")
def direct(tiny_fp32):
    """The pipeline called in this process: ``direct(interval, schedule, seed=..., image=...)`` -> pixels."""
    pipe = Pipeline.from_artifacts(tiny_fp32, device="cpu")

    def run(interval: int = 1, schedule: str = "uniform", seed: int = 42, **call) -> np.ndarray:
        result = pipe(BASE["prompt"], steps=STEPS, guidance_scale=BASE["cfg_scale"], seed=seed, height=64, width=64,
                      scheduler="euler", cache_interval=interval, cache_schedule=schedule, **call)  # fmt: skip
        return np.asarray(result.images[0].convert("RGB"))

    yield run
    pipe.close()


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32)  # default: no caching
    yield srv
    assert srv.stop() == 0


def close_but_not_equal(cached: np.ndarray, uncached: np.ndarray) -> float:
    value = psnr(cached, uncached, 255.0)
    assert not np.array_equal(cached, uncached), "the cached image equals the uncached one: caching did not run"
    assert value >= MIN_PSNR, f"cached vs uncached PSNR {value:.1f} dB < {MIN_PSNR} dB"
    return value


def test_webuiapi_override_runs_cached(server, direct):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    common = dict(prompt=BASE["prompt"], seed=42, steps=STEPS, width=64, height=64, cfg_scale=7.5, sampler_name="Euler")
    plain = api.txt2img(**common)
    cached = api.txt2img(**common, override_settings={"sdtrt_cache_interval": 3})
    assert cached.info["sdtrt_cache_interval"] == 3 and cached.info["sdtrt_cache_schedule"] == "uniform"
    assert cached.parameters["sdtrt_cache_interval"] == 3
    assert "Cache interval: 3, Cache schedule: uniform" in cached.info["infotexts"][0]
    assert "Cache interval: 3" in cached.image.info["parameters"]  # the PNG's A1111 metadata
    assert "sdtrt_cache_interval" not in plain.info and "Cache interval" not in plain.image.info["parameters"]
    got, uncached = np.asarray(cached.image.convert("RGB")), np.asarray(plain.image.convert("RGB"))
    np.testing.assert_array_equal(got, direct(3))
    np.testing.assert_array_equal(uncached, direct(1))
    print(f"\nserved N=3 vs uncached: {close_but_not_equal(got, uncached):.1f} dB")


def test_webuiapi_img2img_override_runs_cached(server, direct):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    common = dict(images=[source], prompt=BASE["prompt"], seed=42, steps=STEPS, width=64, height=64, cfg_scale=7.5,
                  sampler_name="Euler", denoising_strength=0.8)  # fmt: skip
    cached = api.img2img(**common, override_settings={"sdtrt_cache_interval": 2, "sdtrt_cache_schedule": "quadratic"})
    assert cached.info["sdtrt_cache_interval"] == 2 and cached.info["sdtrt_cache_schedule"] == "quadratic"
    got = np.asarray(cached.image.convert("RGB"))
    np.testing.assert_array_equal(got, direct(2, "quadratic", image=source, strength=0.8))
    close_but_not_equal(got, direct(1, image=source, strength=0.8))


def test_top_level_field_and_metrics(server, direct):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, "seed": 7, "sdtrt_cache_interval": 3,
                                                        "sdtrt_cache_schedule": "quadratic"})  # fmt: skip
    assert status == 200, body
    info = json.loads(body["info"])
    assert (info["sdtrt_cache_interval"], info["sdtrt_cache_schedule"]) == (3, "quadratic")
    np.testing.assert_array_equal(pixels(body["images"][0]), direct(3, "quadratic", seed=7))
    # the same value in both places is one choice, not a conflict
    status, body, _ = server.post("/sdapi/v1/txt2img", {**cached_payload(3), "sdtrt_cache_interval": 3})
    assert status == 200 and json.loads(body["info"])["sdtrt_cache_interval"] == 3
    samples = parse_prometheus(get(server.url + "/metrics")[1])
    assert samples['sdtrt_cached_requests_total{interval="3"}'] >= 2


@pytest.mark.parametrize(
    "payload, match",
    [
        (cached_payload(0), r"sdtrt_cache_interval must be an integer >= 1 .*got 0"),
        (cached_payload(-2), r"sdtrt_cache_interval must be an integer >= 1 .*got -2"),
        (cached_payload("3"), r"sdtrt_cache_interval must be an integer >= 1 .*got \"3\""),
        (cached_payload(2.5), r"sdtrt_cache_interval must be an integer >= 1 .*got 2\.5"),
        (cached_payload(True), r"sdtrt_cache_interval must be an integer >= 1 .*got true"),
        (cached_payload(3, "cubic"), r"sdtrt_cache_schedule must be one of 'uniform', 'quadratic', got \"cubic\""),
        ({**BASE, "sdtrt_cache_schedule": 3}, r"sdtrt_cache_schedule must be one of .*got 3"),
        (
            {**BASE, "override_settings": {"sdtrt_cache_intervall": 3}},
            r"unknown sdtrt field override_settings\.sdtrt_cache_intervall; the sdtrt fields are "
            r"sdtrt_cache_interval, sdtrt_cache_schedule",
        ),
        ({**BASE, "sdtrt_cache_shedule": "uniform"}, r"unknown sdtrt field sdtrt_cache_shedule"),
        (
            {**cached_payload(3), "sdtrt_cache_interval": 2},
            r"sdtrt_cache_interval is given twice with different values \(override_settings\.sdtrt_cache_interval"
            r"=3 and sdtrt_cache_interval=2\)",
        ),
        ({**BASE, "override_settings": [1]}, r"override_settings must be a JSON object, got list"),
    ],
)
def test_bad_cache_fields_are_422(server, payload, match):
    for path in ("txt2img", "img2img"):
        if path == "img2img":
            payload = {**payload, "init_images": [base64.b64encode(png(8)).decode()]}
        status, body, _ = server.post(f"/sdapi/v1/{path}", payload)
        assert status == 422 and body["error"] == "invalid_request", body
        assert re.search(match, body["detail"]), body["detail"]


def test_other_override_settings_are_still_ignored(server, direct):
    """A1111 settings sdtrt does not have (and unknown top-level fields) keep being ignored, as before."""
    # (CLIP_stop_at_last_layers is honoured now: tests/serve/test_clip_skip.py)
    payload = {**BASE, "seed": 42, "override_settings": {"img2img_color_correction": True}, "unknown_field": 1}
    status, body, _ = server.post("/sdapi/v1/txt2img", payload)
    assert status == 200 and "sdtrt_cache_interval" not in json.loads(body["info"])
    np.testing.assert_array_equal(pixels(body["images"][0]), direct(1))


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_server_default_and_the_override_that_beats_it(tiny_fp32, direct):
    srv = Server(tiny_fp32, "--cache-interval", "3", "--cache-schedule", "quadratic")
    try:
        default = srv.post("/sdapi/v1/txt2img", {**BASE, "seed": 42})
        off = srv.post("/sdapi/v1/txt2img", cached_payload(1))
        other = srv.post("/sdapi/v1/txt2img", cached_payload(2))  # the schedule left out: the server's
        uniform = srv.post("/sdapi/v1/txt2img", cached_payload(schedule="uniform"))  # the interval: the server's
    finally:
        assert srv.stop() == 0
    infos = [json.loads(body["info"]) for status, body, _ in (default, off, other, uniform) if status == 200]
    assert len(infos) == 4, (default, off, other, uniform)
    assert (infos[0]["sdtrt_cache_interval"], infos[0]["sdtrt_cache_schedule"]) == (3, "quadratic")
    assert "sdtrt_cache_interval" not in infos[1] and "sdtrt_cache_interval" not in off[1]["parameters"]
    assert (infos[2]["sdtrt_cache_interval"], infos[2]["sdtrt_cache_schedule"]) == (2, "quadratic")
    assert (infos[3]["sdtrt_cache_interval"], infos[3]["sdtrt_cache_schedule"]) == (3, "uniform")
    np.testing.assert_array_equal(pixels(default[1]["images"][0]), direct(3, "quadratic"))
    np.testing.assert_array_equal(pixels(off[1]["images"][0]), direct(1))
    np.testing.assert_array_equal(pixels(other[1]["images"][0]), direct(2, "quadratic"))
    np.testing.assert_array_equal(pixels(uniform[1]["images"][0]), direct(3, "uniform"))
    close_but_not_equal(pixels(default[1]["images"][0]), pixels(off[1]["images"][0]))


def refused(*args: str) -> tuple[str, float]:
    start = time.monotonic()
    proc = subprocess.run([SDTRT, "serve", *args, "--port", "0"], capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "serving" not in proc.stdout
    return lines[0], seconds


@pytest.mark.parametrize(
    "args, match",
    [
        (["--cache-interval", "0"], r"cache interval must be an integer >= 1 .*got 0"),
        (["--cache-interval", "-3"], r"cache interval must be an integer >= 1 .*got -3"),
        (["--cache-schedule", "cubic"], r"'cubic' is not one of 'uniform', 'quadratic'"),
        (["--cache-interval", "3", "--ray"], r"--cache-interval 3 needs the shallow UNet"),
    ],
)
def test_bad_defaults_are_refused_at_startup(tiny_fp32, no_shallow, args, match):
    artifacts = no_shallow if "--ray" in args else tiny_fp32
    line, _ = refused(str(artifacts), *args)
    assert re.search(match, line), line


def test_an_artifact_without_the_shallow_unet(no_shallow):
    line, seconds = refused(str(no_shallow), "--cache-interval", "3")
    assert re.search(r"--cache-interval 3 needs the shallow UNet, which the artifact .* lacks; re-export", line)
    assert "--step-cache" in line
    print(f"\nrefused in {seconds:.1f} s")
    srv = Server(no_shallow)  # without caching it serves, and refuses a request that asks for it
    try:
        status, body, _ = srv.post("/sdapi/v1/txt2img", cached_payload(3))
        ok, _, _ = srv.post("/sdapi/v1/txt2img", cached_payload(1))
    finally:
        assert srv.stop() == 0
    assert status == 422 and body["error"] == "invalid_request"
    assert re.search(r"sdtrt_cache_interval 3 needs the shallow UNet \(unet_shallow\), which this model's "
                     r"artifact lacks; send sdtrt_cache_interval 1", body["detail"]), body  # fmt: skip
    assert ok == 200
