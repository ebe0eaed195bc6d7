"""`sdtrt serve` as a real subprocess on loopback, driven with urllib: A1111 payloads, errors, queue, SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SDTRT = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
FAST = {"prompt": "a red square", "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"}
SLOW = {"prompt": "slow", "steps": 12, "width": 256, "height": 256, "sampler_name": "Euler", "seed": 5}


class Server:
    def __init__(self, artifacts: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [SDTRT, "serve", str(artifacts), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []  # its stderr, read as it comes: a full pipe would stall the server's logging
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(timeout=10)
                raise AssertionError(self.log)
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def post(self, path: str, body: object) -> tuple[int, Any, Any]:
        return post(self.url + path, body)

    @property
    def log(self) -> str:
        """What the server wrote to stderr so far (all of it once ``stop`` returned)."""
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return code


@contextlib.contextmanager
def local_ray(config, listen_flags: bool = False) -> Iterator[tuple[str, int]]:
    """``build_app(config)`` served on a local Ray (2 CPUs) on a free loopback port, healthy; yields (url, port).
    ``listen_flags``: the host and port go to ``build_app`` too (what ``/cmd-flags`` reports)."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from sdtrt.serve.ray_app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        flags = {"host": "127.0.0.1", "port": port} if listen_flags else {}
        serve.run(build_app(config, **flags), route_prefix="/", name=config.app_name)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while get(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield url, port
    finally:
        serve.shutdown()
        ray.shutdown()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def post(url: str, body: object) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_for(server: Server, key: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while json.loads(get(server.url + "/health")[1])[key] < value:
        assert time.monotonic() < deadline, f"{key} never reached {value}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32)
    yield srv
    assert srv.stop() == 0


def generate_cli(artifacts: Path, out: Path, *args: str) -> np.ndarray:
    from click.testing import CliRunner

    from sdtrt.cli import main

    result = CliRunner().invoke(main, ["generate", str(artifacts), *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


def test_txt2img_matches_generate(server, tiny_fp32, tmp_path):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 42, "batch_size": 2})
    assert status == 200, body
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42, 43] and info["sampler_name"] == "Euler" and len(info["infotexts"]) == 2
    assert body["parameters"]["seed"] == 42 and body["parameters"]["batch_size"] == 2
    png = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert "Seed: 42" in png.info["parameters"] and "Sampler: Euler" in png.info["parameters"]
    args = ["a red square", "--steps", "3", "--size", "64x64", "--cfg", "7.5", "--scheduler", "euler"]
    for k, seed in enumerate((42, 43)):
        expected = generate_cli(tiny_fp32, tmp_path / f"{seed}.png", *args, "--seed", str(seed))
        np.testing.assert_array_equal(pixels(body["images"][k]), expected)


def test_n_iter_seeds_are_consecutive(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 7, "batch_size": 2, "n_iter": 2})
    assert status == 200, body
    assert json.loads(body["info"])["all_seeds"] == [7, 8, 9, 10] and len(body["images"]) == 4


def test_img2img_matches_generate(server, tiny_fp32, tmp_path):
    source = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    encoded = "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode()
    payload = {**FAST, "steps": 4, "seed": 3, "init_images": [encoded], "denoising_strength": 0.5}
    status, body, _ = server.post("/sdapi/v1/img2img", payload)
    assert status == 200, body
    assert body["parameters"]["init_images"] is None
    args = ["a red square", "--steps", "4", "--size", "64x64", "--cfg", "7.5", "--scheduler", "euler"]
    expected = generate_cli(
        tiny_fp32, tmp_path / "out.png", *args, "--seed", "3", "--init-image", str(source), "--strength", "0.5"
    )
    np.testing.assert_array_equal(pixels(body["images"][0]), expected)


@pytest.mark.parametrize(
    "path, payload, match",
    [
        ("txt2img", {"sampler_name": "Nope"}, "unknown sampler 'Nope'; expected one of: 'Euler'"),
        ("txt2img", {"width": 100, "height": 64}, "multiple of 8 pixels, got 100x64"),
        ("txt2img", {"steps": 0}, r"steps must be an integer >= 1, got 0"),
        ("txt2img", {"steps": "3"}, r"steps must be an integer"),
        ("txt2img", {"batch_size": 5, "n_iter": 4, "width": 64, "height": 64}, r"= 20 images; at most 16 per"),
        ("img2img", {"init_images": ["not base64!"]}, "init_images\\[0\\] is not valid base64"),
        ("img2img", {"init_images": ["aGVsbG8="]}, "not an image Pillow can read"),
        ("txt2img", [1, 2], "must be a JSON object"),
        (
            "txt2img",
            {"seed": 4294967295, "batch_size": 2, "width": 64, "height": 64},
            r"seeds 4294967295\.\.4294967296",
        ),
    ],
)
def test_bad_payloads_are_422(server, path, payload, match):
    import re

    status, body, _ = server.post(f"/sdapi/v1/{path}", payload)
    assert status == 422 and body["error"] == "invalid_request"
    assert re.search(match, body["detail"]), body["detail"]


def test_samplers_and_models(server):
    samplers = json.loads(get(server.url + "/sdapi/v1/samplers")[1])
    assert {"name": "Euler a", "aliases": ["euler_a", "k_euler_a", "k_euler_ancestral"], "options": {}} in samplers
    models = json.loads(get(server.url + "/sdapi/v1/sd-models")[1])
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["model_name"] == "tiny"


def test_concurrent_clients_get_their_own_images(server):
    clients, per_client = 4, 3

    def client(c: int) -> list[tuple[int, list[int], float]]:
        rows = []
        for m in range(per_client):
            seed = 1000 + 10 * c + m
            start = time.perf_counter()
            status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "steps": 2, "seed": seed})
            assert status == 200, body
            rows.append((seed, json.loads(body["info"])["all_seeds"], time.perf_counter() - start))
        return rows

    with ThreadPoolExecutor(clients) as pool:
        rows = [r for rs in pool.map(client, range(clients)) for r in rs]
    seeds = sorted(seed for seed, _, _ in rows)
    assert seeds == sorted({1000 + 10 * c + m for c in range(clients) for m in range(per_client)})
    assert all(got == [sent] for sent, got, _ in rows)
    latencies = sorted(t for _, _, t in rows)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\n{len(rows)} requests, p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line == "" or line.startswith(("# HELP ", "# TYPE ")), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_count_what_was_sent(tiny_fp32):
    srv = Server(tiny_fp32)
    try:
        for seed in range(3):
            assert srv.post("/sdapi/v1/txt2img", {**FAST, "steps": 2, "seed": seed, "batch_size": 2})[0] == 200
        assert srv.post("/sdapi/v1/txt2img", {"steps": 0})[0] == 422
        samples = parse_prometheus(get(srv.url + "/metrics")[1])
    finally:
        assert srv.stop() == 0
    assert samples['sdtrt_requests_total{endpoint="txt2img",status="200"}'] == 3
    assert samples['sdtrt_requests_total{endpoint="txt2img",status="422"}'] == 1
    assert samples["sdtrt_images_total"] == 6
    assert samples['sdtrt_errors_total{kind="invalid_request"}'] == 1
    assert samples['sdtrt_request_seconds_count{endpoint="txt2img"}'] == 4
    assert samples['sdtrt_request_seconds_bucket{endpoint="txt2img",le="+Inf"}'] == 4
    assert samples["sdtrt_queue_length"] == 0


def test_full_queue_is_429_and_sigterm_drains(tiny_fp32):
    srv = Server(tiny_fp32, "--queue", "1")
    results: dict[str, tuple[int, Any, Any]] = {}
    try:
        first = threading.Thread(target=lambda: results.update(a=srv.post("/sdapi/v1/txt2img", SLOW)))
        first.start()
        wait_for(srv, "running", 1)
        second = threading.Thread(target=lambda: results.update(b=srv.post("/sdapi/v1/txt2img", SLOW)))
        second.start()
        wait_for(srv, "queued", 1)
        status, body, headers = srv.post("/sdapi/v1/txt2img", FAST)
        assert status == 429 and body["error"] == "overloaded" and "queue is full" in body["detail"]
        assert int(headers["Retry-After"]) >= 1
        srv.proc.send_signal(signal.SIGTERM)  # while the first runs and the second waits: both are answered
        first.join(timeout=120)
        second.join(timeout=120)
    finally:
        code = srv.stop()
    assert results["a"][0] == 200 and results["b"][0] == 200
    assert code == 0, srv.log


def test_a_request_that_waited_past_the_timeout_is_503(tiny_fp32):
    srv = Server(tiny_fp32, "--queue", "4", "--timeout", "0.2")
    results: dict[str, tuple[int, Any, Any]] = {}
    try:
        first = threading.Thread(target=lambda: results.update(a=srv.post("/sdapi/v1/txt2img", SLOW)))
        first.start()
        wait_for(srv, "running", 1)
        status, body, _ = srv.post("/sdapi/v1/txt2img", FAST)  # waits behind SLOW for longer than 0.2 s
        first.join(timeout=120)
    finally:
        srv.stop()
    assert status == 503 and body["error"] == "timeout" and "raise --timeout" in body["detail"]
    assert results["a"][0] == 200  # the running request still completed


def test_a_failure_inside_the_pipeline_is_500_and_the_worker_keeps_serving(tiny_fp32):
    """The worker with a real pipeline whose UNet engine fails once (the failure is injected: no valid request
    makes a healthy engine fail)."""
    import asyncio

    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.serve.a1111 import parse_request
    from sdtrt.serve.errors import GenerationFailed
    from sdtrt.serve.models import Checkpoints, PipelinePool
    from sdtrt.serve.worker import LocalWorker

    pipe = Pipeline.from_artifacts(tiny_fp32, device="cpu")
    unet = pipe.engines["unet"]
    real = unet.infer
    calls = {"n": 0}

    def failing_once(feeds):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(feeds)

    unet.infer = failing_once

    async def scenario():
        checkpoints = Checkpoints(tiny_fp32)
        worker = LocalWorker(checkpoints, PipelinePool(lambda _: pipe), queue_size=2, timeout=60)
        await worker.start()
        try:
            with pytest.raises(GenerationFailed, match="device lost") as failed:
                await worker.generate(parse_request({**FAST, "seed": 1}))
            ok = await worker.generate(parse_request({**FAST, "seed": 2}))
        finally:
            await worker.stop()
        return failed.value, ok

    error, ok = asyncio.run(scenario())
    assert error.status == 500 and ok.seeds == [2]
