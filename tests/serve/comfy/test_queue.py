"""The queue and websocket mechanics of ComfyUI's protocol with a stand-in graph interpreter (no model runs):
priority, delete/clear, interrupt by id, a slow client's dropped previews, a client that disconnects, history
bounds. The protocol's evidence on the real interpreter and model is in test_protocol.py / test_client.py."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
import threading
import time
import types as pytypes
from typing import Any

import pytest
from PIL import Image

from .proto_util import Recorder, queue_prompt, request, types, wait_history

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("websocket")


class _PromptError(Exception):
    def body(self) -> dict[str, Any]:
        return {"error": {"type": "invalid_prompt", "message": str(self), "details": "", "extra_info": {}},
                "node_errors": {}}  # fmt: skip


class _NodeFailed(Exception):
    def __init__(self, node_id: str, node_type: str, message: str) -> None:
        super().__init__(message)
        self.node_id, self.node_type = node_id, node_type
        self.exception_type, self.exception_message, self.traceback = "ValueError", message, ["line 1\n"]


class _Interrupted(Exception):
    def __init__(self, node_id: str, node_type: str, executed: list[str]) -> None:
        super().__init__("interrupted")
        self.node_id, self.node_type, self.executed = node_id, node_type, executed


@dataclasses.dataclass
class _Context:
    pipeline: Any
    cancel: threading.Event
    previews: bool = False
    prompt_id: str = ""


def _validate(prompt: Any, library: Any, max_nodes: int = 500) -> list[str]:
    if not isinstance(prompt, dict) or not prompt:
        raise _PromptError("the prompt must be a non-empty object")
    if len(prompt) > max_nodes:
        raise _PromptError(f"more than {max_nodes} nodes")
    return sorted(k for k, v in prompt.items() if v["class_type"] == "Save")


class _Executor:
    """Runs "Wait" (steps of 20 ms, progress and a preview each), "Fail" and "Save" (a 8x8 PNG) nodes in id order."""

    def __init__(self, library: Any) -> None:
        self.library, self.order = library, []

    def execute(self, prompt: dict, outputs: list[str], context: _Context, events: Any) -> dict[str, dict]:
        events.execution_cached([])
        self.order.append(context.prompt_id)
        done, ui = [], {}
        for node in sorted(prompt):
            kind, inputs = prompt[node]["class_type"], prompt[node]["inputs"]
            events.executing(node)
            if kind == "Wait":
                for step in range(inputs["steps"]):
                    if context.cancel.is_set():
                        raise _Interrupted(node, kind, done)
                    time.sleep(0.02)
                    events.progress(node, step + 1, inputs["steps"], Image.new("RGB", (8, 8), "red"))
            elif kind == "Fail":
                raise _NodeFailed(node, kind, "it fails")
            else:
                name = f"{inputs['prefix']}.png"
                Image.new("RGB", (8, 8), "blue").save(self.library.folders.output / name)
                ui[node] = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
                events.executed(node, ui[node])
            done.append(node)
        return ui


class _Library:
    def __init__(self, checkpoints: Any, loras: Any, folders: Any) -> None:
        self.folders = folders

    def object_info(self) -> dict[str, dict]:
        return {"Wait": {"name": "Wait"}}


@pytest.fixture(scope="module")
def proto_double(tiny_fp32, tmp_path_factory):
    """An in-process server (uvicorn in a thread) whose ComfyUI routes run the stand-in interpreter above."""
    from sdtrt.serve.app import create_app
    from sdtrt.serve.comfy.folders import ComfyFolders
    from sdtrt.serve.comfy.routes import ComfySettings, add_comfy_routes
    from sdtrt.serve.models import Checkpoints, PipelinePool
    from sdtrt.serve.server import bind
    from sdtrt.serve.worker import LocalWorker

    saved = {name: sys.modules.get(name) for name in ("sdtrt.serve.comfy.graph", "sdtrt.serve.comfy.nodes")}
    graph = pytypes.ModuleType("sdtrt.serve.comfy.graph")
    graph.__dict__.update(PromptError=_PromptError, NodeFailed=_NodeFailed, ExecutionInterrupted=_Interrupted,
                          ExecutionContext=_Context, validate_prompt=_validate, GraphExecutor=_Executor)  # fmt: skip
    nodes = pytypes.ModuleType("sdtrt.serve.comfy.nodes")
    nodes.NodeLibrary = _Library
    sys.modules.update({"sdtrt.serve.comfy.graph": graph, "sdtrt.serve.comfy.nodes": nodes})
    try:
        checkpoints = Checkpoints(tiny_fp32)
        worker = LocalWorker(checkpoints, PipelinePool(lambda checkpoint: object()), queue_size=6)
        app = create_app(worker, checkpoints)
        settings = ComfySettings(ComfyFolders(tmp_path_factory.mktemp("comfy")), max_history=3)
        jobs = add_comfy_routes(app, worker, settings)
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", jobs
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _wait(steps: int = 10, save: str | None = None) -> dict[str, Any]:
    graph = {"1": {"class_type": "Wait", "inputs": {"steps": steps}}}
    if save:
        graph["2"] = {"class_type": "Save", "inputs": {"prefix": save}}
    return graph


def test_sequence_priority_and_history(proto_double):
    url, jobs = proto_double
    ws = Recorder(url)
    first_status = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": ws.client_id}
    assert ws.next() == {"type": "status", "data": first_status}
    first = queue_prompt(url, _wait(30, "a"), ws.client_id)
    ws.until("execution_start")
    later = queue_prompt(url, _wait(1, "b"), ws.client_id)
    front = queue_prompt(url, _wait(1, "c"), ws.client_id, front=True)
    assert front["number"] < 0 < later["number"]
    status, queue, _ = request(url + "/queue")
    assert [row[1] for row in queue["queue_running"]] == [first["prompt_id"]]
    assert [row[1] for row in queue["queue_pending"]] == [front["prompt_id"], later["prompt_id"]]
    assert request(url + "/prompt")[1] == {"exec_info": {"queue_remaining": 3}}
    ws.until_done(later["prompt_id"])
    assert jobs.executor.order[-3:] == [first["prompt_id"], front["prompt_id"], later["prompt_id"]]
    entry = wait_history(url, first["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["outputs"] == {"2": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}
    assert entry["prompt"][1] == first["prompt_id"] and entry["prompt"][3]["client_id"] == ws.client_id
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    # the history keeps 3: one more prompt drops the oldest
    done = queue_prompt(url, _wait(1), ws.client_id)
    ws.until_done(done["prompt_id"])
    history = request(url + "/history")[1]
    assert list(history) == [front["prompt_id"], later["prompt_id"], done["prompt_id"]]
    assert list(request(url + "/history?max_items=1")[1]) == [done["prompt_id"]]
    ws.close()


def test_delete_clear_and_interrupt_by_id(proto_double):
    url, jobs = proto_double
    ws = Recorder(url)
    running = queue_prompt(url, _wait(200), ws.client_id)
    ws.until("progress")
    queued = [queue_prompt(url, _wait(1), ws.client_id)["prompt_id"] for _ in range(3)]
    assert request(url + "/queue", "POST", {"delete": [queued[0]]})[0] == 200
    assert [r[1] for r in request(url + "/queue")[1]["queue_pending"]] == queued[1:]
    assert request(url + "/interrupt", "POST", {"prompt_id": queued[1]})[0] == 200  # not running: no effect
    assert request(url + "/queue", "POST", {"clear": True})[0] == 200
    assert request(url + "/queue")[1]["queue_pending"] == []
    assert request(url + "/interrupt", "POST", {"prompt_id": running["prompt_id"]})[0] == 200
    messages = ws.until_done(running["prompt_id"])
    interrupted = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_id"] == "1" and interrupted[0]["node_type"] == "Wait"
    assert types(messages)[-2:] == ["status", "executing"]
    assert wait_history(url, running["prompt_id"])["status"]["status_str"] == "error"
    for prompt_id in queued:
        assert request(f"{url}/history/{prompt_id}")[1] == {}
    ws.close()


def test_error_message_and_previews(proto_double):
    url, _ = proto_double
    ws = Recorder(url)
    graph = {**_wait(2), "9": {"class_type": "Fail", "inputs": {}}}
    answer = queue_prompt(url, graph, ws.client_id, extra_data={"preview_method": "auto"})
    messages = ws.until_done(answer["prompt_id"])
    frames = [m for m in messages if isinstance(m, bytes)]
    assert len(frames) == 2 and frames[0][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01" and frames[0][8:10] == b"\xff\xd8"
    error = next(m["data"] for m in messages if isinstance(m, dict) and m["type"] == "execution_error")
    assert {k: error[k] for k in ("node_id", "node_type", "exception_type", "exception_message")} == {
        "node_id": "9", "node_type": "Fail", "exception_type": "ValueError", "exception_message": "it fails"
    }  # fmt: skip
    assert set(error) >= {"prompt_id", "executed", "traceback", "current_inputs", "current_outputs", "timestamp"}
    ws.close()


def test_slow_and_gone_clients_do_not_block(proto_double):
    url, jobs = proto_double
    jobs.clients.max_queue = 8
    try:
        slow = Recorder(url)  # never reads: its queue fills with previews, which are dropped first
        gone = Recorder(url)
        watcher = Recorder(url)
        answer = queue_prompt(url, _wait(60), slow.client_id, extra_data={"preview_method": "latent2rgb"})
        time.sleep(0.3)
        gone.ws.sock.shutdown(socket.SHUT_RDWR)  # vanishes without a close frame
        nxt = queue_prompt(url, _wait(1), watcher.client_id)
        watcher.until_done(nxt["prompt_id"])
        assert wait_history(url, answer["prompt_id"])["status"]["status_str"] == "success"
        received = [slow.next(5) for _ in range(8)]
        assert "status" in types(received)
    finally:
        jobs.clients.max_queue = 256


@pytest.mark.parametrize(
    "body, kind",
    [
        ({"prompt": {}, "prompt_id": "not-a-uuid"}, "invalid_prompt_id"),
        ({"client_id": "x"}, "no_prompt"),
        ({"prompt": {"1": {"class_type": "Save", "inputs": {"prefix": "p"}}}, "extra": 1}, "invalid_request"),
        ({"prompt": {"1": {}}, "extra_data": []}, "invalid_request"),
        ({"prompt": {"1": {}}, "extra_data": {"preview_method": "fancy"}}, "invalid_request"),
        ({"prompt": {"1": {}}, "number": "first"}, "invalid_request"),
    ],
)
def test_bad_prompt_bodies(proto_double, body, kind):
    url, _ = proto_double
    status, answer, _ = request(url + "/prompt", "POST", body)
    assert status == 400 and answer["error"]["type"] == kind and answer["node_errors"] == {}, answer
    assert set(answer["error"]) == {"type", "message", "details", "extra_info"}


def test_full_queue_is_503(proto_double):
    url, _ = proto_double
    ws = Recorder(url)
    first = queue_prompt(url, _wait(100), ws.client_id)
    ws.until("progress")
    answers = [request(url + "/prompt", "POST", {"prompt": _wait(1)}) for _ in range(8)]
    statuses = [a[0] for a in answers]
    assert statuses[:6] == [200] * 6 and statuses[6:] == [503, 503], statuses
    assert answers[-1][1]["error"]["type"] == "queue_full" and "--queue" in answers[-1][1]["error"]["message"]
    request(url + "/queue", "POST", {"clear": True})
    request(url + "/interrupt", "POST")
    ws.until_done(first["prompt_id"])
    ws.close()
