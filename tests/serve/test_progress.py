"""Progress, interrupt and skip, driven with webuiapi (A1111's client) against a real `sdtrt serve` subprocess.

The interrupt test is the evidence that a long request stops within one step: it prints the step time and the
time from the interrupt to the response (run with -s to see them). The Ray deployment's limits are checked on a
real local Ray.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .test_server import FAST, Server, get, post

webuiapi = pytest.importorskip("webuiapi")

LONG = {"prompt": "a long walk on the beach", "steps": 200, "width": 256, "height": 256, "seed": 11, "cfg_scale": 7.0}
SKIP = {"prompt": "two images", "steps": 30, "width": 128, "height": 128, "seed": 21, "cfg_scale": 7.0}


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32, "--timeout", "300")
    yield srv
    assert srv.stop() == 0


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(baseurl=server.url + "/sdapi/v1", sampler="Euler", steps=20)


def poll(api: Any, until: Any, timeout: float = 60.0) -> tuple[dict[str, Any], float]:
    """Poll ``/progress`` until ``until(body)`` holds; the body and the time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        body = api.get_progress()
        if until(body):
            return body, time.monotonic()
        assert time.monotonic() < deadline, f"progress never got there: {body['state']}"
        time.sleep(0.05)


def step_of(body: dict[str, Any]) -> int:
    """The step of the running request; -1 while none runs (``state`` keeps the last request's steps)."""
    return body["state"]["sampling_step"] if body["state"]["job_count"] else -1


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_idle_progress_is_what_clients_wait_for(api):
    body = api.get_progress()
    assert body["progress"] == 0 and body["eta_relative"] == 0 and body["current_image"] is None
    keys = {"job", "job_count", "job_no", "sampling_step", "sampling_steps", "interrupted", "skipped", "job_timestamp"}
    assert keys <= set(body["state"]) and body["state"]["job_count"] == 0
    start = time.monotonic()
    api.util_wait_for_ready(check_interval=0.05)
    assert time.monotonic() - start < 1.0


def test_interrupt_stops_a_long_request_within_one_step(api):
    with ThreadPoolExecutor(max_workers=2) as pool:
        request = pool.submit(api.txt2img, sampler_name="Euler", **LONG)
        first, t_first = poll(api, lambda b: step_of(b) >= 2)
        waiting = pool.submit(api.util_wait_for_ready, 0.05)
        later, t_later = poll(api, lambda b: step_of(b) >= step_of(first) + 5 and b["current_image"])
        step_s = (t_later - t_first) / (step_of(later) - step_of(first))
        state = later["state"]
        assert state["job"] == "scripts_txt2img" and state["job_count"] == 1 and state["sampling_steps"] == 200
        assert 0.01 < later["progress"] < 0.5 and later["eta_relative"] > 0 and not waiting.done()
        preview = Image.open(io.BytesIO(base64.b64decode(later["current_image"])))
        assert preview.format == "PNG" and preview.size == (256 // 8, 256 // 8)  # latent size: a cheap preview
        skipless = get(api.baseurl + "/progress?skip_current_image=true")[1]
        assert json.loads(skipless)["current_image"] is None
        t_interrupt = time.monotonic()
        assert api.interrupt() == {}
        result = request.result(timeout=60)
        latency = time.monotonic() - t_interrupt
        waiting.result(timeout=10)  # util_wait_for_ready returns once the request is over
    after = api.get_progress()
    assert after["progress"] == 0 and after["state"]["job_count"] == 0 and after["state"]["interrupted"]
    stopped = after["state"]["sampling_step"]
    print(f"\ninterrupt: stopped at step {stopped} of 200; one step {step_s * 1000:.0f} ms; "
          f"interrupt -> response {latency * 1000:.0f} ms")  # fmt: skip
    start = time.monotonic()
    api.txt2img(sampler_name="Euler", **{**LONG, "steps": 1})
    one_step_request = time.monotonic() - start  # a whole request of one step: text, step, decode, PNG, HTTP
    print(f"a one-step request of the same size: {one_step_request * 1000:.0f} ms")
    assert stopped < 40  # far below the 200 asked for
    assert len(result.images) == 1 and result.info["all_seeds"] == [11] and result.images[0].size == (256, 256)
    # the remainder of the step running when the interrupt came, the decode and the HTTP answer
    assert latency < 2 * step_s + 1.5


def test_interrupt_leaves_queued_requests_alone(api, server):
    with ThreadPoolExecutor(max_workers=2) as pool:
        long = pool.submit(api.txt2img, sampler_name="Euler", **LONG)
        poll(api, lambda b: step_of(b) >= 1)
        queued = pool.submit(server.post, "/sdapi/v1/txt2img", {**FAST, "seed": 5})
        deadline = time.monotonic() + 30
        while json.loads(get(server.url + "/health")[1])["queued"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        api.interrupt()
        assert len(long.result(timeout=60).images) == 1
        status, body, _ = queued.result(timeout=60)
    assert status == 200
    state = api.get_progress()["state"]
    assert not state["interrupted"] and state["sampling_step"] == FAST["steps"]  # it ran every step
    again = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 5})[1]
    assert body["images"] == again["images"]


def test_skip_ends_the_current_image_and_the_next_one_runs(api, server):
    with ThreadPoolExecutor(max_workers=1) as pool:
        request = pool.submit(api.txt2img, sampler_name="Euler", n_iter=2, **SKIP)
        poll(api, lambda b: b["state"]["job_no"] == 0 and step_of(b) >= 2)
        assert api.skip() is None  # A1111 answers null
        second, _ = poll(api, lambda b: b["state"]["job_no"] == 1 or b["state"]["job_count"] == 0)
        result = request.result(timeout=60)
    assert second["state"]["job"] == "Batch 2 out of 2" and not second["state"]["skipped"]
    assert result.info["all_seeds"] == [21, 22] and len(result.images) == 2
    after = api.get_progress()["state"]
    assert after["job_no"] == 1 and after["sampling_step"] == SKIP["steps"] and not after["interrupted"]
    full_first = api.txt2img(sampler_name="Euler", **SKIP)
    full_second = api.txt2img(sampler_name="Euler", **{**SKIP, "seed": 22})
    assert not np.array_equal(as_array(result.images[0]), as_array(full_first.image))  # cut short
    assert np.array_equal(as_array(result.images[1]), as_array(full_second.image))  # ran whole, unaffected


def test_interrupt_and_skip_while_idle_change_nothing(api, server):
    assert api.interrupt() == {} and api.skip() is None
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 9, "n_iter": 2})
    assert status == 200 and len(body["images"]) == 2
    state = api.get_progress()["state"]
    assert not state["interrupted"] and not state["skipped"] and state["job_no"] == 1


@pytest.fixture(scope="module")
def ray_url(tiny_fp32):
    """The Ray deployment of ``test_ray`` (a local Ray, two replicas), started for this module."""
    from . import test_ray

    yield from test_ray.ray_server.__wrapped__(tiny_fp32)


@pytest.mark.slow  # a second local Ray start (~40 s here)
def test_ray_reports_requests_in_flight_and_refuses_interrupt(ray_url):
    """On Ray, /progress knows the requests in flight through the ingress but no steps; interrupt/skip are 501."""
    api = webuiapi.WebUIApi(baseurl=ray_url + "/sdapi/v1", sampler="Euler")
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        request = pool.submit(post, ray_url + "/sdapi/v1/txt2img", {**LONG, "steps": 60, "sampler_name": "Euler"})
        busy, _ = poll(api, lambda b: b["state"]["job_count"] >= 1)
        assert busy["progress"] == 0.01 and "Ray" in busy["textinfo"] and busy["state"]["sampling_steps"] == 0
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            status, body, _ = post(ray_url + path, {})
            assert status == 501 and body["error"] == "not_supported" and "--ray" in body["detail"]
        status, answer, _ = request.result(timeout=120)
    assert status == 200 and len(answer["images"]) == 1  # ran to the end
    api.util_wait_for_ready(check_interval=0.05)
