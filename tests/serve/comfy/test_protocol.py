"""ComfyUI's protocol on a real ``sdtrt serve`` running the tiny model: the websocket sequence of a prompt checked
message by message against ComfyUI's (execution.py, main.py prompt_worker, server.py), a cached re-run, an
interrupted and a failing prompt, previews, the same seed twice, the image against ``sdtrt generate``, the info
routes, a client that disconnects mid-prompt, and SIGTERM draining queued prompts."""

from __future__ import annotations

import io
import signal
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from ..test_server import Server
from .proto_util import (
    Recorder,
    default_workflow,
    img2img_workflow,
    queue_prompt,
    request,
    types,
    view_url,
    wait_history,
)

pytest.importorskip("fastapi")
pytest.importorskip("websocket")

ORDER = ("4", "5", "6", "7", "3", "8", "9")  # a dependency order of the default workflow (ComfyUI's own differs)
INPUTS = {"3": {"4", "5", "6", "7"}, "6": {"4"}, "7": {"4"}, "8": {"3", "4"}, "9": {"8"}}


@pytest.fixture(scope="module")
def proto_server(tiny_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-protocol")
    (root / "loras").mkdir()
    (root / "loras" / "style.safetensors").write_bytes(b"")  # listed by name; never loaded here
    srv = Server(tiny_fp32, "--comfy-dir", str(root), "--lora-dir", str(root / "loras"))
    srv.root = root
    info = request(srv.url + "/object_info/CheckpointLoaderSimple")[1]
    spec = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    srv.ckpt = (spec[1]["options"] if spec[0] == "COMBO" else spec[0])[0]
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log, srv.log


def _check_node_order(executing: list[str]) -> None:
    for position, node in enumerate(executing):
        assert INPUTS.get(node, set()) & set(executing) <= set(executing[:position]), executing


def test_websocket_sequence(proto_server):
    """One prompt's messages, in ComfyUI's order, with ComfyUI's fields."""
    ws = Recorder(proto_server.url)
    assert ws.next() == {
        "type": "status",
        "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": ws.client_id},
    }
    graph = default_workflow(proto_server.ckpt, seed=11)
    answer = queue_prompt(proto_server.url, graph, ws.client_id)
    prompt_id = answer["prompt_id"]
    assert answer["node_errors"] == {} and isinstance(answer["number"], int)
    messages = ws.until_done(prompt_id)
    kinds = types(messages)
    # queued (status 1), taken (status 1), then the execution, then status 0 and the final executing
    assert kinds[:4] == ["status", "status", "execution_start", "execution_cached"], kinds
    assert [m["data"]["status"]["exec_info"]["queue_remaining"] for m in messages[:2]] == [1, 1]
    assert kinds[-3:] == ["execution_success", "status", "executing"], kinds
    assert messages[-2]["data"] == {"status": {"exec_info": {"queue_remaining": 0}}}
    assert messages[-1]["data"] == {"node": None, "prompt_id": prompt_id}
    for message in (messages[2], messages[-3]):
        assert set(message["data"]) == {"prompt_id", "timestamp"} and message["data"]["prompt_id"] == prompt_id
    cached = messages[3]["data"]
    assert set(cached) == {"nodes", "prompt_id", "timestamp"} and cached["nodes"] == []
    body = messages[4:-3]
    executing = [m["data"]["node"] for m in body if m["type"] == "executing"]
    assert sorted(executing) == sorted(ORDER)
    _check_node_order(executing)
    node = None
    progress = []
    for message in body:
        data = message["data"]
        assert data["prompt_id"] == prompt_id
        if message["type"] == "executing":
            assert data == {"node": data["node"], "display_node": data["node"], "prompt_id": prompt_id}
            node = data["node"]
        elif message["type"] == "progress":
            assert set(data) == {"value", "max", "prompt_id", "node"} and data["node"] == node == "3"
            progress.append((data["value"], data["max"]))
        else:
            assert message["type"] == "executed" and node == "9", message
            assert set(data) == {"node", "display_node", "output", "prompt_id"} and data["node"] == "9"
            (image,) = data["output"]["images"]
            assert image["type"] == "output" and image["filename"].startswith("ComfyUI_")
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert types(body)[-1] == "executed"
    entry = wait_history(proto_server.url, prompt_id)
    assert entry["prompt"][:3] == [answer["number"], prompt_id, graph] and entry["prompt"][4] == ["9"]
    assert entry["outputs"] == {"9": body[-1]["data"]["output"]}
    assert entry["meta"] == {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    kept = [[m["type"], m["data"]] for m in messages if m["type"].startswith("execution_")]
    assert entry["status"]["messages"] == kept
    ws.close()


def test_cached_rerun(proto_server):
    """A new seed: the loader, the latent and the prompts come from the cache; KSampler and what follows run."""
    ws = Recorder(proto_server.url)
    for seed in (21, 22):
        prompt_id = queue_prompt(proto_server.url, default_workflow(proto_server.ckpt, seed=seed), ws.client_id)[
            "prompt_id"
        ]
        messages = ws.until_done(prompt_id)
    cached = next(m for m in messages if m["type"] == "execution_cached")["data"]["nodes"]
    assert sorted(cached) == ["4", "5", "6", "7"]
    assert [m["data"]["node"] for m in messages if m["type"] == "executing"][:-1] == ["3", "8", "9"]
    ws.close()


def test_interrupt_between_steps(proto_server):
    ws = Recorder(proto_server.url)
    graph = default_workflow(proto_server.ckpt, seed=31, steps=2000)
    prompt_id = queue_prompt(proto_server.url, graph, ws.client_id)["prompt_id"]
    ws.until("progress")
    assert request(proto_server.url + "/interrupt", "POST")[0] == 200
    messages = ws.until_done(prompt_id)
    kinds = types(messages)
    assert kinds[-3:] == ["execution_interrupted", "status", "executing"], kinds
    data = messages[-3]["data"]
    assert set(data) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert data["node_id"] == "3" and data["node_type"] == "KSampler"
    assert set(data["executed"]) <= {"4", "5", "6", "7"}  # what ran before KSampler (cached nodes did not run)
    steps = [m["data"]["value"] for m in ws.messages if isinstance(m, dict) and m["type"] == "progress"]
    assert steps[-1] < 2000  # stopped between steps, long before the end
    entry = wait_history(proto_server.url, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted" and entry["outputs"] == {}
    ws.close()


def test_execution_error(proto_server):
    """An input image that is valid when the prompt is queued and broken when it runs: LoadImage fails."""
    ws = Recorder(proto_server.url)
    name = f"broken-{uuid.uuid4().hex[:8]}.png"
    Image.new("RGB", (64, 64), "gray").save(proto_server.root / "input" / name)
    graph = img2img_workflow(proto_server.ckpt, name)
    slow = default_workflow(proto_server.ckpt, seed=91, steps=2000)
    blocker = queue_prompt(proto_server.url, slow, ws.client_id)["prompt_id"]  # holds the queue meanwhile
    ws.until("progress")
    prompt_id = queue_prompt(proto_server.url, graph, ws.client_id)["prompt_id"]
    (proto_server.root / "input" / name).write_bytes(b"not a png any more")
    assert request(proto_server.url + "/interrupt", "POST", {"prompt_id": blocker})[0] == 200
    ws.until_done(blocker)
    messages = ws.until_done(prompt_id)
    kinds = types(messages)
    assert kinds[-3:] == ["execution_error", "status", "executing"], kinds
    data = messages[-3]["data"]
    assert set(data) == {
        "prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type", "traceback",
        "current_inputs", "current_outputs", "timestamp",
    }  # fmt: skip
    assert data["node_id"] == "10" and data["node_type"] == "LoadImage", data
    assert isinstance(data["traceback"], list) and data["exception_message"]
    assert wait_history(proto_server.url, prompt_id)["status"]["status_str"] == "error"
    ws.close()


def test_previews_when_asked(proto_server):
    ws = Recorder(proto_server.url)
    graph = default_workflow(proto_server.ckpt, seed=41)
    prompt_id = queue_prompt(proto_server.url, graph, ws.client_id, extra_data={"preview_method": "auto"})["prompt_id"]
    messages = ws.until_done(prompt_id)
    kinds = types(messages)
    frames = [m for m in messages if isinstance(m, bytes)]
    assert len(frames) == 3 and all(kinds[kinds.index("<binary>") - 1] == "progress" for _ in frames)
    for frame in frames:
        assert frame[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01"  # PREVIEW_IMAGE, JPEG
        assert Image.open(io.BytesIO(frame[8:])).format == "JPEG"
    ws.close()


def _pixels(server: Server, prompt_id: str) -> np.ndarray:
    (image,) = wait_history(server.url, prompt_id)["outputs"]["9"]["images"]
    status, data, _ = request(view_url(server.url, image))
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_same_seed_same_image(proto_server):
    """The same graph and seed twice (a new filename_prefix defeats the cache) gives the same pixels."""
    first = default_workflow(proto_server.ckpt, seed=51)
    second = default_workflow(proto_server.ckpt, seed=51)
    second["9"]["inputs"]["filename_prefix"] = "again"
    ids = [queue_prompt(proto_server.url, g)["prompt_id"] for g in (first, second)]
    a, b = (_pixels(proto_server, i) for i in ids)
    np.testing.assert_array_equal(a, b)


def test_default_workflow_matches_generate(proto_server, tiny_fp32, tmp_path):
    """The default workflow's PNG equals ``sdtrt generate`` with ComfyUI's settings, pixel for pixel."""
    from click.testing import CliRunner

    from sdtrt.cli import main

    graph = default_workflow(proto_server.ckpt, seed=61, steps=4, cfg=7.0)
    got = _pixels(proto_server, queue_prompt(proto_server.url, graph)["prompt_id"])
    positive, negative = graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"]
    args = ["generate", str(tiny_fp32), positive, "--scheduler", "euler", "--sigma-schedule", "normal", "--seed", "61",
            "--steps", "4", "--cfg", "7.0", "--size", "64x64", "--negative", negative,
            "--out", str(tmp_path / "cli.png")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))


def test_info_routes(proto_server):
    url = proto_server.url
    info = request(url + "/object_info")[1]
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage"} <= set(info)
    assert request(url + "/api/object_info/KSampler")[1] == {"KSampler": info["KSampler"]}
    assert request(url + "/object_info/NoSuchNode")[1] == {}
    stats = request(url + "/system_stats")[1]
    assert set(stats["system"]) == {"os", "ram_total", "ram_free", "comfyui_version", "python_version",
                                    "pytorch_version", "embedded_python", "argv"}  # fmt: skip
    assert stats["system"]["comfyui_version"].startswith("sdtrt ") and stats["devices"][0]["type"] == "cpu"
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} == set(
        stats["devices"][0]
    )
    assert {"checkpoints", "loras", "vae", "controlnet"} <= set(request(url + "/models")[1])
    assert request(url + "/api/models/checkpoints")[1] == [proto_server.ckpt]
    assert request(url + "/models/loras")[1] == ["style.safetensors"]
    assert request(url + "/models/vae")[1] == []
    assert request(url + "/models/nope")[0] == 404
    assert request(url + "/embeddings")[1] == [] and request(url + "/api/extensions")[1] == []
    assert request(url + "/api/prompt")[1] == {"exec_info": {"queue_remaining": 0}}


def test_disconnect_mid_prompt(proto_server):
    """A client that leaves during its prompt: the prompt finishes, the next prompt runs as usual."""
    leaving = Recorder(proto_server.url)
    graph = default_workflow(proto_server.ckpt, seed=71, steps=300)
    first = queue_prompt(proto_server.url, graph, leaving.client_id, extra_data={"preview_method": "auto"})
    leaving.until("progress")
    leaving.close()
    staying = Recorder(proto_server.url)
    second = queue_prompt(proto_server.url, default_workflow(proto_server.ckpt, seed=72), staying.client_id)
    messages = staying.until_done(second["prompt_id"])
    assert "execution_success" in types(messages)
    assert wait_history(proto_server.url, first["prompt_id"])["status"]["status_str"] == "success"
    staying.close()


def test_shares_the_queue_with_a1111_in_arrival_order(proto_server):
    """A ComfyUI prompt, an A1111 request, a ComfyUI prompt: they run in that order on the one pipeline thread (when
    the A1111 answer arrives, the first prompt is done and the second has not finished)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..test_server import FAST, post, wait_for

    ws = Recorder(proto_server.url)
    first = queue_prompt(proto_server.url, default_workflow(proto_server.ckpt, seed=101, steps=300), ws.client_id)
    ws.until("progress")
    with ThreadPoolExecutor(1) as pool:
        a1111 = pool.submit(post, proto_server.url + "/sdapi/v1/txt2img", {**FAST, "steps": 200, "seed": 5})
        wait_for(proto_server, "queued", 1)  # the A1111 request waits behind the running prompt
        second = queue_prompt(proto_server.url, default_workflow(proto_server.ckpt, seed=102, steps=300))
        status, body, _ = a1111.result(timeout=120)
        assert status == 200, body
        assert request(f"{proto_server.url}/history/{first['prompt_id']}")[1]  # done before the A1111 request
        assert request(f"{proto_server.url}/history/{second['prompt_id']}")[1] == {}  # not done yet
    assert wait_history(proto_server.url, second["prompt_id"])["status"]["status_str"] == "success"
    ws.close()


def test_sigterm_drains_queued_prompts(tiny_fp32, tmp_path):
    srv = Server(tiny_fp32, "--comfy-dir", str(tmp_path))
    ckpt = request(srv.url + "/models/checkpoints")[1][0]
    ws = Recorder(srv.url)
    running = default_workflow(ckpt, seed=81, steps=200)
    running["9"]["inputs"]["filename_prefix"] = "running"
    queued = default_workflow(ckpt, seed=82)
    queued["9"]["inputs"]["filename_prefix"] = "queued"
    queue_prompt(srv.url, running, ws.client_id, prompt_id=str(uuid.uuid4()))
    ws.until("progress")
    queue_prompt(srv.url, queued)
    srv.proc.send_signal(signal.SIGTERM)
    begin = time.monotonic()
    assert srv.stop() == 0, srv.log
    assert time.monotonic() - begin < 60
    assert [p.name for p in sorted((tmp_path / "output").glob("*.png"))] == ["queued_00001_.png", "running_00001_.png"]


def test_comfy_options(tiny_fp32, tmp_path):
    """``--comfy-*`` are refused with ``--ray`` (ComfyUI's API is the plain server's) and checked for range."""
    from click.testing import CliRunner

    from sdtrt.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_fp32), "--ray", "--comfy-dir", str(tmp_path)])
    assert result.exit_code != 0 and "--comfy-dir: ComfyUI's API is served by the plain server only" in result.output
    result = CliRunner().invoke(main, ["serve", str(tiny_fp32), "--comfy-history", "0"])
    assert result.exit_code != 0 and "--comfy-history" in result.output
    result = CliRunner().invoke(main, ["serve", str(tiny_fp32), "--comfy-preview-method", "fast"])
    assert result.exit_code != 0 and "'fast' is not one of" in result.output
