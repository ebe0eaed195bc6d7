"""Clip skip on `sdtrt serve`: A1111's ``override_settings.CLIP_stop_at_last_layers`` (sent with `webuiapi`), the
server's ``--clip-skip`` default, refusals, and batches that never mix two clip skips. Images are checked pixel
for pixel against `sdtrt generate --clip-skip N` run as a subprocess."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.generate import merge_key
from sdtrt.serve.ray_app import RayConfig, ReplicaCore

from .test_server import SDTRT, Server, get, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "CLIP_stop_at_last_layers"
BASE = {"prompt": "a red square", "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def cli_image(tiny_fp32, tmp_path_factory):
    """``cli_image(clip_skip, seed)``: the pixels `sdtrt generate` writes for BASE (cached per argument)."""
    folder = tmp_path_factory.mktemp("cli-clip-skip")
    made: dict[tuple[int, int], np.ndarray] = {}

    def run(clip_skip: int, seed: int) -> np.ndarray:
        if (clip_skip, seed) not in made:
            out = folder / f"{clip_skip}-{seed}.png"
            args = [SDTRT, "generate", str(tiny_fp32), BASE["prompt"], "--steps", str(BASE["steps"]), "--size", "64"]
            args += ["--cfg", "7.5", "--scheduler", "euler", "--seed", str(seed), "--out", str(out)]
            done = subprocess.run([*args, "--clip-skip", str(clip_skip)], capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
            made[clip_skip, seed] = np.asarray(Image.open(out).convert("RGB"))
        return made[clip_skip, seed]

    return run


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32)  # default clip skip 1
    yield srv
    assert srv.stop() == 0


def test_webuiapi_override_equals_cli(server, cli_image):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    common = dict(prompt=BASE["prompt"], seed=42, steps=4, width=64, height=64, cfg_scale=7.5, sampler_name="Euler")
    skipped = api.txt2img(**common, override_settings={KEY: 2})
    plain = api.txt2img(**common)
    got = np.asarray(skipped.image.convert("RGB"))
    np.testing.assert_array_equal(got, cli_image(2, 42))
    np.testing.assert_array_equal(np.asarray(plain.image.convert("RGB")), cli_image(1, 42))
    assert not np.array_equal(got, cli_image(1, 42))
    assert skipped.info["clip_skip"] == 2 and plain.info["clip_skip"] == 1
    assert "Clip skip: 2" in skipped.info["infotexts"][0] and "Clip skip: 2" in skipped.image.info["parameters"]
    assert "Clip skip" not in plain.image.info["parameters"]


def test_img2img_override(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    common = dict(images=[source], prompt=BASE["prompt"], seed=3, steps=4, width=64, height=64, cfg_scale=7.5,
                  sampler_name="Euler", denoising_strength=0.8)  # fmt: skip
    skipped, plain = api.img2img(**common, override_settings={KEY: 2}), api.img2img(**common)
    assert skipped.info["clip_skip"] == 2 and "Clip skip: 2" in skipped.info["infotexts"][0]
    assert not np.array_equal(np.asarray(skipped.image), np.asarray(plain.image))


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (3, f"override_settings.{KEY}: clip skip 3 is past this text encoder's 2 layers; give 1..2"),
        (0, f"override_settings.{KEY} must be an integer >= 1"),
        ("2", f'override_settings.{KEY} must be an integer >= 1 .*got "2"'),
        (True, f"override_settings.{KEY} must be an integer >= 1"),
    ],
)
def test_bad_values_are_422(server, value, detail):
    import re

    status, body, _ = server.post("/sdapi/v1/txt2img", {**BASE, "seed": 1, "override_settings": {KEY: value}})
    assert status == 422 and re.search(detail, body["detail"]), body
    assert get(server.url + "/health")[0] == 200


def test_different_clip_skips_are_never_merged():
    base = {**BASE, "seed": 5}
    plain, one = parse_request(base).with_clip_skip(1), parse_request({**base, "override_settings": {KEY: 1}})
    two = parse_request({**base, "override_settings": {KEY: 2}}).with_clip_skip(1)
    assert merge_key(plain) == merge_key(one.with_clip_skip(1)) != merge_key(two)
    assert parse_request({**base, "override_settings": {KEY: 2}}).with_clip_skip(3).clip_skip == 2


def test_replica_runs_each_clip_skip_as_asked(tiny_fp32, cli_image):
    """One batch with both clip skips: each request gets its own image, as if it had run alone."""
    core = ReplicaCore(RayConfig(str(tiny_fp32)), name="r0")
    try:
        out = core.run([parse_request({**BASE, "seed": 7, "override_settings": {KEY: 2}}), parse_request(
            {**BASE, "seed": 8})])  # fmt: skip
    finally:
        core.pipe.close()
    assert [o.clip_skip for o in out] == [2, 1]
    images = [np.asarray(Image.open(io.BytesIO(o.images[0])).convert("RGB")) for o in out]
    np.testing.assert_array_equal(images[0], cli_image(2, 7))
    np.testing.assert_array_equal(images[1], cli_image(1, 8))


def test_server_default_and_refusal_at_start(tiny_fp32, cli_image):
    srv = Server(tiny_fp32, "--clip-skip", "2")
    try:
        status, body, _ = srv.post("/sdapi/v1/txt2img", {**BASE, "seed": 42})
        assert status == 200 and json.loads(body["info"])["clip_skip"] == 2
        np.testing.assert_array_equal(pixels(body["images"][0]), cli_image(2, 42))
        status, body, _ = srv.post("/sdapi/v1/txt2img", {**BASE, "seed": 42, "override_settings": {KEY: 1}})
        assert status == 200 and json.loads(body["info"])["clip_skip"] == 1
        np.testing.assert_array_equal(pixels(body["images"][0]), cli_image(1, 42))
        assert json.loads(get(srv.url + "/sdapi/v1/options")[1])[KEY] == 2  # the default, as clients read it
        assert srv.post("/sdapi/v1/options", {KEY: 2})[0] == 200  # the value it has: a no-op
        status, body, _ = srv.post("/sdapi/v1/options", {KEY: 1})
        assert status == 422 and "override_settings.CLIP_stop_at_last_layers" in body["detail"], body
    finally:
        assert srv.stop() == 0
    done = subprocess.run([SDTRT, "serve", str(tiny_fp32), "--port", "0", "--clip-skip", "3"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and lines == ["error: clip skip 3 is past this text encoder's 2 layers; give 1..2"]
