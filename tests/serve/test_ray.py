"""The Ray Serve deployment: a local Ray on loopback, two replicas, the plain server's API and images.

Also the replica's batching without Ray: requests merged into one pipeline call give the images they give alone;
and step caching: the replicas' default (``RayConfig.cache_interval``) and a request's own ``sdtrt_cache_interval``.
"""

from __future__ import annotations

import json
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sdtrt.runtime.pipeline import Pipeline
from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.ray_app import RayConfig, ReplicaCore

from .test_server import FAST, get, local_ray, pixels, post


def reference_pixels(artifacts, seed: int, prompt: str, steps: int = FAST["steps"], **cache) -> np.ndarray:
    with Pipeline.from_artifacts(artifacts, device="cpu") as pipe:
        result = pipe(prompt, steps=steps, guidance_scale=FAST["cfg_scale"], seed=seed, height=64, width=64,
                      scheduler="euler", **cache)  # fmt: skip
    return np.asarray(result.images[0].convert("RGB"))


def test_replica_merges_compatible_requests_without_changing_their_images(tiny_fp32):
    core = ReplicaCore(RayConfig(str(tiny_fp32)), name="r0")
    requests = [
        parse_request({**FAST, "prompt": "a red square", "seed": 11}),
        parse_request({**FAST, "prompt": "a blue circle", "seed": 12, "batch_size": 2}),
        parse_request({**FAST, "seed": 13, "steps": 2}),  # other steps: not merged
        parse_request({**FAST, "seed": 14, "width": 72}),  # refused on its own, the others still run
    ]
    out = core.run(requests)
    assert [type(o).__name__ for o in out] == ["Generation", "Generation", "Generation", "RequestError"]
    assert out[1].seeds == [12, 13] and out[1].prompts == ["a blue circle"] * 2 and out[0].served_by == "r0"
    import io

    from PIL import Image

    alone = np.asarray(Image.open(io.BytesIO(out[0].images[0])).convert("RGB"))
    assert np.array_equal(alone, reference_pixels(tiny_fp32, 11, "a red square"))
    core.pipe.close()


@pytest.fixture(scope="module")
def ray_server(tiny_fp32):
    with local_ray(RayConfig(str(tiny_fp32), min_replicas=2, max_replicas=2, cpus_per_replica=0.5)) as (url, _):
        yield url


def test_two_replicas_serve_the_same_api_and_images(ray_server, tiny_fp32):
    seeds = list(range(100, 112))

    def one(seed: int):
        return post(ray_server + "/sdapi/v1/txt2img", {**FAST, "seed": seed})

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, seeds))
    assert [status for status, _, _ in answers] == [200] * len(seeds)
    infos = [json.loads(body["info"]) for _, body, _ in answers]
    assert [info["seed"] for info in infos] == seeds  # each answer is its own request's
    served_by = {info["served_by"] for info in infos}
    print(f"served by {len(served_by)} replicas: {sorted(served_by)}")
    assert len(served_by) == 2
    assert np.array_equal(pixels(answers[3][1]["images"][0]), reference_pixels(tiny_fp32, seeds[3], FAST["prompt"]))
    status, body, _ = post(ray_server + "/sdapi/v1/txt2img", {**FAST, "sampler_name": "Heun"})
    assert status == 422 and "Heun" in body["detail"]
    status, samplers = get(ray_server + "/sdapi/v1/samplers")
    assert status == 200 and any(s["name"] == "Euler a" for s in json.loads(samplers))


def png_pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_replica_applies_the_cache_default_and_the_override(tiny_fp32):
    """Default N = 3: requests that do not choose run cached (and merge); N = 1 asked for runs alone, in full."""
    from sdtrt.runtime.compare import psnr

    core = ReplicaCore(RayConfig(str(tiny_fp32), cache_interval=3), name="r0")
    base = {**FAST, "steps": 8}
    try:
        out = core.run(
            [
                parse_request({**base, "seed": 21}),
                parse_request({**base, "seed": 22, "prompt": "a blue circle"}),
                parse_request({**base, "seed": 21, "override_settings": {"sdtrt_cache_interval": 1}}),
            ]
        )
    finally:
        core.pipe.close()
    assert [o.cache_interval for o in out] == [3, 3, 1], out
    cached = png_pixels(out[0].images[0])
    assert np.array_equal(cached, reference_pixels(tiny_fp32, 21, FAST["prompt"], 8, cache_interval=3))
    assert np.array_equal(png_pixels(out[1].images[0]),
                          reference_pixels(tiny_fp32, 22, "a blue circle", 8, cache_interval=3))  # fmt: skip
    uncached = png_pixels(out[2].images[0])
    assert np.array_equal(uncached, reference_pixels(tiny_fp32, 21, FAST["prompt"], 8))
    assert not np.array_equal(cached, uncached) and psnr(cached, uncached, 255.0) >= 30.0


def test_ray_config_refuses_bad_caching(no_shallow):
    from sdtrt.runtime.errors import ArtifactError, ConfigError

    with pytest.raises(ConfigError, match=r"cache interval must be an integer >= 1 .*got 0"):
        RayConfig(str(no_shallow), cache_interval=0)
    with pytest.raises(ConfigError, match=r"cache schedule must be one of uniform, quadratic, got 'cubic'"):
        RayConfig(str(no_shallow), cache_schedule="cubic")
    with pytest.raises(ArtifactError, match=r"--cache-interval 2 needs the shallow UNet, which the artifact"):
        ReplicaCore(RayConfig(str(no_shallow), cache_interval=2))


def test_ray_request_override_runs_cached(ray_server, tiny_fp32):
    payload = {**FAST, "steps": 8, "seed": 31, "override_settings": {"sdtrt_cache_interval": 3}}
    status, body, _ = post(ray_server + "/sdapi/v1/txt2img", payload)
    assert status == 200, body
    info = json.loads(body["info"])
    assert (info["sdtrt_cache_interval"], info["sdtrt_cache_schedule"]) == (3, "uniform")
    got = pixels(body["images"][0])
    assert np.array_equal(got, reference_pixels(tiny_fp32, 31, FAST["prompt"], 8, cache_interval=3))
    status, body, _ = post(ray_server + "/sdapi/v1/txt2img", {**payload, "override_settings": {"sdtrt_cache": 3}})
    assert status == 422 and "unknown sdtrt field override_settings.sdtrt_cache" in body["detail"]


def test_ray_applies_the_plain_servers_limits_and_error_form(ray_server):
    from .test_limits import raw_request

    port = int(ray_server.rsplit(":", 1)[1])
    head = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (40 * 2**20)
    status, body, headers, seconds = raw_request(port, head, b"")
    assert status == 413 and body["error"] == "body_too_large" and body["request_id"] == headers["x-request-id"]
    status, body, _ = post(ray_server + "/sdapi/v1/txt2img", {**FAST, "prompt": "a" * 20_001})
    assert status == 422 and "--max-prompt-chars" in body["detail"]
    status, body, _ = post(ray_server + "/sdapi/v1/txt2img", {**FAST, "seed": 40, "batch_size": 6})  # profile: 1..4
    assert status == 200 and json.loads(body["info"])["all_seeds"] == list(range(40, 46)), body
    with pytest.raises(urllib.error.HTTPError) as error:
        get(ray_server + "/nope")
    assert error.value.code == 404 and json.loads(error.value.read())["error"] == "not_found"
