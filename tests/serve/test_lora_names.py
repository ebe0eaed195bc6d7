"""LoRAs by name on `sdtrt serve --lora-dir`: ``<lora:NAME:WEIGHT>`` tags sent with `webuiapi` give the image of
`sdtrt generate --lora FILE:WEIGHT` pixel for pixel, do not leak into the next request, unknown names are refused,
``/sdapi/v1/loras`` and ``refresh-loras`` list the folder, and the infotext carries ``Lora hashes``."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt.runtime.errors import ConfigError
from sdtrt.runtime.lora import LoraLayer, read_lora, save_lora
from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.errors import RequestError
from sdtrt.serve.generate import merge_key
from sdtrt.serve.loras import LoraLibrary, resolve_tags

from .test_server import SDTRT, Server, get

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "a red square"
COMMON = dict(seed=42, steps=4, width=64, height=64, cfg_scale=7.5, sampler_name="Euler")


def make_lora(bundle, seed: int, rank: int = 4) -> dict[tuple[str, str], LoraLayer]:
    """A rank-``rank`` LoRA on the UNet's attention projections and conv_in, and the text encoder's projections."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, module in (("unet", bundle.unet), ("text_encoder", bundle.text_encoder)):
        for path, child in module.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            linear = isinstance(child, torch.nn.Linear) and "attn" in path and leaf in ("to_q", "to_k", "q_proj")
            conv = component == "unet" and path == "conv_in"
            if not (linear or conv):
                continue
            w = child.weight
            down = torch.randn((rank, *w.shape[1:]) if conv else (rank, w.shape[1]), generator=generator) * 0.3
            up = torch.randn((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank), generator=generator) * 0.3
            layers[(component, path)] = LoraLayer(down, up, alpha=float(rank) / 2)
    return layers


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_bundle) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_lora(make_lora(tiny_bundle, 1), folder / "style.safetensors", "kohya", unet=tiny_bundle.unet)
    return folder


@pytest.fixture(scope="module")
def server(tiny_fp32, lora_dir):
    srv = Server(tiny_fp32, "--lora-dir", str(lora_dir))
    yield srv
    assert srv.stop() == 0


def cli_image(artifacts: Path, out: Path, *lora: str) -> np.ndarray:
    args = [SDTRT, "generate", str(artifacts), PROMPT, "--steps", "4", "--size", "64", "--cfg", "7.5"]
    args += ["--scheduler", "euler", "--seed", "42", "--out", str(out)]
    args += [a for spec in lora for a in ("--lora", spec)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return np.asarray(Image.open(out).convert("RGB"))


def test_lora_tag_equals_cli_lora_and_does_not_leak(server, tiny_fp32, lora_dir, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    base = np.asarray(api.txt2img(prompt=PROMPT, **COMMON).image.convert("RGB"))
    tagged = api.txt2img(prompt=f"{PROMPT} <lora:style:0.8>", **COMMON)
    after = np.asarray(api.txt2img(prompt=PROMPT, **COMMON).image.convert("RGB"))
    got = np.asarray(tagged.image.convert("RGB"))
    np.testing.assert_array_equal(got, cli_image(tiny_fp32, tmp_path / "lora.png", f"{lora_dir}/style.safetensors:0.8"))
    np.testing.assert_array_equal(base, cli_image(tiny_fp32, tmp_path / "base.png"))
    assert not np.array_equal(got, base)
    np.testing.assert_array_equal(after, base)  # the next request without a tag runs without the LoRA
    short = read_lora(lora_dir / "style.safetensors").short_hash
    assert f'Lora hashes: "style: {short}"' in tagged.image.info["parameters"]
    assert "<lora:style:0.8>" in tagged.info["infotexts"][0]
    assert "Lora hashes" not in api.txt2img(prompt=PROMPT, **COMMON).image.info["parameters"]


def test_unknown_and_misplaced_tags_are_422(server):
    for body, words in (
        ({"prompt": "x <lora:nope:0.5>"}, ["'nope'", "style"]),
        ({"prompt": "x", "negative_prompt": "<lora:style:1>"}, ["LoRA tags go in prompt"]),
        ({"prompt": "x <lora:style:heavy>"}, ["weight must be a number"]),
        ({"prompt": "x <lyco:style:1>"}, ["<lyco:style:1>"]),
    ):
        status, answer, _ = server.post("/sdapi/v1/txt2img", {**COMMON, **body})
        assert status == 422 and all(w in answer["detail"] for w in words), answer


def test_get_and_refresh_loras(server, lora_dir, tiny_bundle):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    listed = api.get_loras()
    assert [x["name"] for x in listed] == ["style"]
    assert listed[0]["path"] == str((lora_dir / "style.safetensors").resolve())
    assert isinstance(listed[0]["metadata"], dict) and listed[0]["alias"] == "style"
    save_lora(make_lora(tiny_bundle, 2), lora_dir / "other.safetensors", "kohya", unet=tiny_bundle.unet)
    try:
        assert [x["name"] for x in api.get_loras()] == ["style"]  # not before the rescan
        assert server.post("/sdapi/v1/refresh-loras", {})[:2] == (200, None)  # webuiapi has no refresh_loras
        assert [x["name"] for x in api.get_loras()] == ["other", "style"]
        status, text = get(server.url + "/sdapi/v1/loras")
        assert status == 200 and "other.safetensors" in text
    finally:
        (lora_dir / "other.safetensors").unlink()
        server.post("/sdapi/v1/refresh-loras", {})
    assert [x["name"] for x in api.get_loras()] == ["style"]
    assert json.loads(get(server.url + "/sdapi/v1/cmd-flags")[1])["lora_dir"] == str(lora_dir)  # A1111's key


def test_tags_are_removed_and_different_sets_never_merge(lora_dir):
    library = LoraLibrary(lora_dir)
    plain = resolve_tags(parse_request({"prompt": "a cat, red"}), library)
    tagged = resolve_tags(parse_request({"prompt": "a cat, <lora:style:0.5> red <lora:style>"}), library)
    assert tagged.prompt == "a cat,  red " and plain.loras == ()
    assert tagged.loras == ((str((lora_dir / "style.safetensors").resolve()), 1.5),)  # named twice: the weights add up
    assert merge_key(plain) != merge_key(tagged)
    with pytest.raises(RequestError, match="no LoRAs: start it with --lora-dir"):
        resolve_tags(parse_request({"prompt": "<lora:style:1>"}), LoraLibrary())


def test_hr_prompt_tags_are_removed_and_must_name_the_same_set(lora_dir):
    library = LoraLibrary(lora_dir)
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    same = resolve_tags(parse_request({"prompt": "a <lora:style:0.5>", **hires, "hr_prompt": "b <lora:style:0.5>"}),
                        library)  # fmt: skip
    assert same.hires is not None and same.hires.prompt == "b " and len(same.loras) == 1
    with pytest.raises(RequestError, match="hr_prompt names other LoRAs than prompt"):
        resolve_tags(parse_request({"prompt": "a", **hires, "hr_prompt": "b <lora:style:0.5>"}), library)


def test_ray_replica_runs_each_requests_own_lora_set(tiny_fp32, lora_dir):
    """The Ray replica's batching (without Ray): tagged and plain requests in one batch are never merged, and each
    gives the image of `Pipeline.set_loras` with its own set."""
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.serve.ray_app import RayConfig, ReplicaCore

    library = LoraLibrary(lora_dir)
    body = {**COMMON, "sampler_name": "Euler", "prompt": PROMPT}
    tagged = resolve_tags(parse_request({**body, "prompt": f"{PROMPT} <lora:style:0.8>"}), library)
    core = ReplicaCore(RayConfig(str(tiny_fp32), lora_dir=str(lora_dir)), name="r0")
    try:
        out = core.run([tagged, parse_request(body), tagged])
    finally:
        core.pipe.close()
    images = [np.asarray(Image.open(io.BytesIO(o.images[0])).convert("RGB")) for o in out]
    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as pipe:
        call = dict(steps=4, guidance_scale=7.5, seed=42, height=64, width=64, scheduler="euler")
        base = np.asarray(pipe(PROMPT, **call).images[0].convert("RGB"))
        pipe.set_loras([(lora_dir / "style.safetensors", 0.8)])
        with_lora = np.asarray(pipe(PROMPT, **call).images[0].convert("RGB"))
    np.testing.assert_array_equal(images[0], with_lora)
    np.testing.assert_array_equal(images[2], with_lora)
    np.testing.assert_array_equal(images[1], base)
    assert not np.array_equal(base, with_lora)
    with pytest.raises(ConfigError, match="is not a folder"):
        RayConfig(str(tiny_fp32), lora_dir=str(lora_dir / "missing"))


@pytest.mark.slow
def test_ray_deployment_lists_and_applies_loras(tiny_fp32, lora_dir):
    """`--ray`: the ingress reads the tags and lists the folder; the replica gives the plain server's images."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import socket
    import time

    from sdtrt.serve.ray_app import RayConfig, build_app

    from .test_server import pixels, post

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayConfig(str(tiny_fp32), cpus_per_replica=0.5, lora_dir=str(lora_dir))
        serve.run(build_app(config), route_prefix="/", name="sdtrt")
        deadline = time.monotonic() + 60
        while get(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [x["name"] for x in json.loads(get(url + "/sdapi/v1/loras")[1])] == ["style"]
        body = {**COMMON, "prompt": f"{PROMPT} <lora:style:0.8>"}
        status, tagged, _ = post(url + "/sdapi/v1/txt2img", body)
        status_plain, plain, _ = post(url + "/sdapi/v1/txt2img", {**COMMON, "prompt": PROMPT})
        status_unknown, unknown, _ = post(url + "/sdapi/v1/txt2img", {**COMMON, "prompt": "<lora:nope:1>"})
    finally:
        serve.shutdown()
        ray.shutdown()
    assert status == 200 and status_plain == 200 and status_unknown == 422 and "'nope'" in unknown["detail"]
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.from_artifacts(tiny_fp32, device="cpu") as pipe:
        call = dict(steps=4, guidance_scale=7.5, seed=42, height=64, width=64, scheduler="euler")
        base = np.asarray(pipe(PROMPT, **call).images[0].convert("RGB"))
        pipe.set_loras([(lora_dir / "style.safetensors", 0.8)])
        with_lora = np.asarray(pipe(PROMPT, **call).images[0].convert("RGB"))
    np.testing.assert_array_equal(pixels(tagged["images"][0]), with_lora)
    np.testing.assert_array_equal(pixels(plain["images"][0]), base)
    assert "Lora hashes" in json.loads(tagged["info"])["infotexts"][0]
