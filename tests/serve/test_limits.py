"""Request limits and operations of `sdtrt serve` as a real subprocess: body 413 (Content-Length and chunked), prompt
and image-count bounds, decompression bombs, batches above the profile split into calls, the echo, one log line per
request with its id, every error in {"error", "detail"}, and a port in use."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_server import FAST, SDTRT, Server, get, pixels

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_fp32):
    srv = Server(tiny_fp32, "--max-images", "6")
    yield srv
    assert srv.stop() == 0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The resident memory of process ``pid`` now (VmRSS) or at its peak so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_request(port: int, head: bytes, body: bytes | list[bytes]) -> tuple[int, dict, dict[str, str], float]:
    """Send ``head`` then ``body`` (bytes, or chunks sent chunked) from a thread; read the answer meanwhile.

    Returns (status, JSON body, headers, seconds from the request's start to the full answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    start = time.perf_counter()

    def send() -> None:
        try:
            sock.sendall(head)
            if isinstance(body, bytes):
                sock.sendall(body)
            else:
                for chunk in body:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed without reading the rest: what is asked of it
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < _answer_length(data):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except ConnectionResetError:
        pass
    seconds = time.perf_counter() - start
    sock.close()
    head_text, _, payload = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(payload), headers, seconds


def _answer_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    return len(head) + 4 + (int(match.group(1)) if match else 1 << 30)


def test_a_100_mb_prompt_is_refused_at_once_without_reading_it(server):
    body = json.dumps({**FAST, "prompt": "a cat " * (100 * 2**20 // 6)}).encode()
    assert len(body) > 100 * 10**6
    head = (
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    before = rss_mb(server.proc.pid, "VmHWM")
    status, answer, headers, seconds = raw_request(server.port, head, body)
    growth = rss_mb(server.proc.pid, "VmHWM") - before  # the peak: nothing large was held even briefly
    print(f"\n100 MB prompt: {status} in {seconds * 1000:.0f} ms, server peak RSS growth {growth:.1f} MB")
    assert status == 413 and answer["error"] == "body_too_large", answer
    assert "limit of 32 MB" in answer["detail"] and "--max-body-mb" in answer["detail"]
    assert answer["request_id"] == headers["x-request-id"]
    assert seconds < 1.0 and growth < 300
    assert server.post("/sdapi/v1/txt2img", {**FAST, "seed": 1})[0] == 200  # still serving


def test_a_chunked_body_is_cut_off_past_the_limit(server):
    chunk = b"x" * 2**20
    head = (
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    before = rss_mb(server.proc.pid)
    status, answer, _, seconds = raw_request(server.port, head, [b'{"prompt": "'] + [chunk] * 40)
    growth = rss_mb(server.proc.pid) - before
    assert status == 413 and answer["error"] == "body_too_large" and "chunked" in answer["detail"], answer
    assert seconds < 5 and growth < 300, (seconds, growth)
    assert server.post("/sdapi/v1/txt2img", {**FAST, "seed": 2})[0] == 200


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"])
def test_a_prompt_over_the_character_bound_is_422(server, field):
    start = time.perf_counter()
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, field: "a cat " * 5_000})
    assert time.perf_counter() - start < 2.0
    assert status == 422 and body["error"] == "invalid_request", body
    assert f"{field} has 30000 characters; at most 20000" in body["detail"] and "--max-prompt-chars" in body["detail"]


def test_a_prompt_past_the_windows_runs_with_a_warning_in_info(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 3, "prompt": "cat " * 200})
    assert status == 200, body
    warnings = json.loads(body["info"])["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("prompt has 200 tokens") and "dropped the last" in warnings[0]
    status, short, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 3, "prompt": "cat"})
    assert "warnings" not in json.loads(short["info"])


def test_too_many_images_is_422(server):
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "batch_size": 4, "n_iter": 2})
    assert status == 422 and "batch_size x n_iter = 4 x 2 = 8 images; at most 6 per request" in body["detail"]


def test_a_batch_above_the_profile_runs_as_several_calls_with_the_seeds_of_one_by_one(server):
    status, batch, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 11, "batch_size": 6})  # profile: 1..4
    assert status == 200, batch
    assert json.loads(batch["info"])["all_seeds"] == list(range(11, 17)) and len(batch["images"]) == 6
    status, alone, _ = server.post("/sdapi/v1/txt2img", {**FAST, "seed": 11, "n_iter": 6})
    assert status == 200 and json.loads(alone["info"])["all_seeds"] == list(range(11, 17))
    for got, expected in zip(batch["images"], alone["images"], strict=True):
        np.testing.assert_array_equal(pixels(got), pixels(expected))
    assert len({pixels(image).tobytes() for image in batch["images"]}) == 6  # six different images


def png_b64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_decompression_bomb_is_422_from_its_header(server):
    bomb = png_b64(6000, 6000)  # 36 Mpixel, a few kB of PNG
    assert len(bomb) < 200_000
    before = rss_mb(server.proc.pid)
    start = time.perf_counter()
    status, body, _ = server.post("/sdapi/v1/img2img", {**FAST, "init_images": [bomb]})
    seconds, growth = time.perf_counter() - start, rss_mb(server.proc.pid) - before
    assert status == 422 and "init_images[0] is 6000x6000 = 36000000 pixels; at most 16777216" in body["detail"]
    assert seconds < 1.0 and growth < 30, (seconds, growth)
    status, body, _ = server.post("/sdapi/v1/img2img", {**FAST, "init_images": ["A" * (25 * 2**20)]})
    assert status == 422 and "characters of base64; at most 25165824" in body["detail"], body["detail"][:200]
    ok = server.post("/sdapi/v1/img2img", {**FAST, "seed": 4, "init_images": [png_b64(64, 64)]})
    assert ok[0] == 200


def test_the_echo_repeats_the_request_fields_only(server):
    junk = "j" * 2**20
    status, body, _ = server.post(
        "/sdapi/v1/img2img",
        {**FAST, "seed": 5, "init_images": [png_b64(64, 64)], "junk": junk, "styles": ["s"], "sdtrt_cache_interval": 1},
    )
    assert status == 200
    parameters = body["parameters"]
    assert "junk" not in parameters and parameters["init_images"] is None
    assert parameters["styles"] == ["s"] and parameters["sdtrt_cache_interval"] == 1
    assert parameters["prompt"] == FAST["prompt"]
    assert len(json.dumps(body)) < 200_000


def test_errors_404_405_and_validation_are_in_the_documented_form(server):
    for method, path, status, kind in [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/sdapi/v1/txt2img", 405, "method_not_allowed"),
        ("DELETE", "/health", 405, "method_not_allowed"),
    ]:
        request = urllib.request.Request(server.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        body = json.loads(error.value.read())
        assert error.value.code == status and body["error"] == kind and path in body["detail"], body
        assert set(body) == {"error", "detail", "request_id"}
        assert body["request_id"] == error.value.headers["X-Request-ID"]
    status, body, headers = server.post("/sdapi/v1/txt2img", {**FAST, "steps": 0})
    assert status == 422 and body["request_id"] == headers["X-Request-ID"]
    with urllib.request.urlopen(server.url + "/health", timeout=30) as answer:
        assert len(answer.headers["X-Request-ID"]) == 16


def test_one_log_line_per_request_and_start_and_drain_lines(tiny_fp32):
    srv = Server(tiny_fp32)
    try:
        assert srv.post("/sdapi/v1/txt2img", {**FAST, "seed": 6, "batch_size": 2})[0] == 200
        status, body, _ = srv.post("/sdapi/v1/txt2img", {**FAST, "steps": 0})
        with pytest.raises(urllib.error.HTTPError):
            get(srv.url + "/nope")
    finally:
        assert srv.stop() == 0
    log = srv.log
    assert "sdtrt.serve.server: started: listening on 127.0.0.1" in log
    assert re.search(r"INFO sdtrt.serve: POST /sdapi/v1/txt2img 200 \d+ ms images=2 model=tiny id=[0-9a-f]{16}\n", log)
    line = f"INFO sdtrt.serve: POST /sdapi/v1/txt2img 422 \\d+ ms images=0 model=- id={body['request_id']} "
    assert re.search(line + "error=invalid_request: steps must be", log), log
    assert re.search(r"GET /nope 404 \d+ ms .* error=not_found", log)
    assert "draining: SIGTERM received" in log and "stopped: drained in" in log
    assert len(re.findall(r"INFO sdtrt.serve: POST /sdapi/v1/txt2img", log)) == 2


def test_a_port_in_use_is_one_line_and_exit_1(tiny_fp32):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [SDTRT, "serve", str(tiny_fp32), "--port", str(port)], capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use"), result.stderr
    assert "--port" in result.stderr


def test_bad_limit_flags_are_one_line_errors(tiny_fp32):
    result = subprocess.run(
        [SDTRT, "serve", str(tiny_fp32), "--port", "0", "--max-images", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and result.stderr.strip() == "error: --max-images must be > 0, got 0"


def test_webuiapi_batch_above_the_profile_and_its_errors(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(prompt="a red square", steps=3, width=64, height=64, seed=21, batch_size=5, cfg_scale=7.5)
    assert len(result.images) == 5 and result.info["all_seeds"] == list(range(21, 26))
    assert result.parameters["batch_size"] == 5
    with pytest.raises(RuntimeError) as error:
        api.txt2img(prompt="a red square", steps=3, width=64, height=64, batch_size=4, n_iter=2)
    code, text = error.value.args
    assert code == 422 and json.loads(text)["error"] == "invalid_request"


def test_json_that_would_cost_many_times_its_size_is_422(server):
    for body, match in [
        (b'{"prompt": "a", "x": [' + b"{}," * 200_000 + b"{}]}", "holds 200003 JSON objects/arrays"),
        (b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nests JSON arrays/objects too deep"),
    ]:
        request = urllib.request.Request(server.url + "/sdapi/v1/txt2img", data=body)
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        answer = json.loads(error.value.read())
        assert error.value.code == 422 and match in answer["detail"], answer


def test_a_request_id_sent_by_a_proxy_is_kept(server):
    request = urllib.request.Request(server.url + "/nope", headers={"X-Request-ID": "proxy-id.42"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert json.loads(error.value.read())["request_id"] == "proxy-id.42" == error.value.headers["X-Request-ID"]
