"""The queue and websocket mechanics of ComfyUI's protocol: priority (``front``, ``number``), delete and clear,
interrupt by prompt id, history bounds, a full queue (503), and clients that are slow or vanish. The server is
``sdtrt serve``'s app run in this process (uvicorn in a thread, the real interpreter on the tiny model), so a test
can shrink a client's message queue."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from typing import Any

import pytest

from .proto_util import Recorder, default_workflow, queue_prompt, request, types, wait_history

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("websocket")

SEEDS = itertools.count(1000)


@pytest.fixture(scope="module")
def proto_inproc(tiny_fp32, tmp_path_factory):
    """``sdtrt serve``'s app in this process with a queue of 6 and a history of 3; (url, its ``ComfyJobs``)."""
    from sdtrt.serve.app import create_app
    from sdtrt.serve.server import ServeConfig, bind, open_models
    from sdtrt.serve.worker import LocalWorker

    root = tmp_path_factory.mktemp("comfy-queue")
    config = ServeConfig(tiny_fp32, queue_size=6, comfy_dir=root, comfy_history=3)
    checkpoints, pool = open_models(config)
    worker = LocalWorker(checkpoints, pool, queue_size=6)
    app = create_app(worker, checkpoints, comfy=config.comfy)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    jobs = app.state.comfy_jobs
    jobs.ckpt = checkpoints.current.name
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", jobs
    server.should_exit = True
    thread.join(timeout=60)
    sock.close()


def _wait(jobs: Any, steps: int = 2, save: str | None = None) -> dict[str, Any]:
    """The default workflow with ``steps`` steps (a few ms each on the tiny model), a new seed each time."""
    graph = default_workflow(jobs.ckpt, steps=steps, seed=next(SEEDS))
    graph["9"]["inputs"]["filename_prefix"] = save or f"steps{steps}"
    return graph


def _order(url: str) -> list[str]:
    return list(request(url + "/history")[1])


def test_priority_and_history(proto_inproc):
    url, jobs = proto_inproc
    ws = Recorder(url)
    first_status = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": ws.client_id}
    assert ws.next() == {"type": "status", "data": first_status}
    first = queue_prompt(url, _wait(jobs, 2000, "a"), ws.client_id)
    ws.until("progress")
    later = queue_prompt(url, _wait(jobs, 2, "b"), ws.client_id)
    front = queue_prompt(url, _wait(jobs, 2, "c"), ws.client_id, front=True)
    numbered = queue_prompt(url, _wait(jobs, 2, "d"), ws.client_id, number=-100)
    assert numbered["number"] == -100.0 and front["number"] < 0 < later["number"]
    queue = request(url + "/queue")[1]
    assert [row[1] for row in queue["queue_running"]] == [first["prompt_id"]]
    assert [row[1] for row in queue["queue_pending"]] == [numbered["prompt_id"], front["prompt_id"], later["prompt_id"]]
    row = queue["queue_pending"][0]
    assert row[0] == -100.0 and row[3]["client_id"] == ws.client_id and row[4] == ["9"] and row[2]["3"]
    assert request(url + "/prompt")[1] == {"exec_info": {"queue_remaining": 4}}
    assert request(url + "/interrupt", "POST", {"prompt_id": first["prompt_id"]})[0] == 200
    ws.until_done(later["prompt_id"])
    assert _order(url) == [numbered["prompt_id"], front["prompt_id"], later["prompt_id"]]  # the history keeps 3
    entry = wait_history(url, later["prompt_id"])
    (image,) = entry["outputs"]["9"]["images"]
    assert image["filename"] == "b_00001_.png" and entry["status"]["status_str"] == "success"
    assert request(url + "/history?max_items=1")[1] == {later["prompt_id"]: entry}
    assert list(request(url + "/history?offset=1&max_items=1")[1]) == [front["prompt_id"]]
    assert request(url + "/history", "POST", {"delete": [front["prompt_id"]]})[0] == 200
    assert _order(url) == [numbered["prompt_id"], later["prompt_id"]]
    assert request(url + "/history", "POST", {"clear": True})[0] == 200 and _order(url) == []
    ws.close()


def test_delete_clear_and_interrupt_by_id(proto_inproc):
    url, jobs = proto_inproc
    ws = Recorder(url)
    running = queue_prompt(url, _wait(jobs, 2000), ws.client_id)
    ws.until("progress")
    queued = [queue_prompt(url, _wait(jobs), ws.client_id)["prompt_id"] for _ in range(3)]
    assert request(url + "/queue", "POST", {"delete": [queued[0]]})[0] == 200
    assert [r[1] for r in request(url + "/queue")[1]["queue_pending"]] == queued[1:]
    assert request(url + "/interrupt", "POST", {"prompt_id": queued[1]})[0] == 200  # not running: no effect
    assert request(url + "/queue", "POST", {"clear": True})[0] == 200
    assert request(url + "/queue")[1]["queue_pending"] == []
    assert jobs.queue_body()["queue_running"][0][1] == running["prompt_id"]  # still running
    assert request(url + "/interrupt", "POST", {"prompt_id": running["prompt_id"]})[0] == 200
    messages = ws.until_done(running["prompt_id"])
    assert types(messages)[-3:] == ["execution_interrupted", "status", "executing"]
    assert wait_history(url, running["prompt_id"])["status"]["status_str"] == "error"
    for prompt_id in queued:
        assert request(f"{url}/history/{prompt_id}")[1] == {}
    ws.close()


def test_slow_and_gone_clients_do_not_block(proto_inproc):
    """A client that never reads and one that vanishes without a close frame: the prompts run, and a third client
    gets all of its messages (what a full client queue drops: ``test_a_full_client_queue``)."""
    url, jobs = proto_inproc
    jobs.clients.max_queue = 8
    try:
        slow = Recorder(url)
        gone = Recorder(url)
        answer = queue_prompt(url, _wait(jobs, 300), slow.client_id, extra_data={"preview_method": "latent2rgb"})
        time.sleep(0.2)
        gone.ws.sock.shutdown(socket.SHUT_RDWR)
        watcher = Recorder(url)
        nxt = queue_prompt(url, _wait(jobs, 3), watcher.client_id)
        messages = watcher.until_done(nxt["prompt_id"])
        assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2, 3]
        assert wait_history(url, answer["prompt_id"])["status"]["status_str"] == "success"
        assert gone.client_id not in jobs.clients.ids
        watcher.close()
    finally:
        jobs.clients.max_queue = 256


def test_full_queue_is_503(proto_inproc):
    url, jobs = proto_inproc
    ws = Recorder(url)
    first = queue_prompt(url, _wait(jobs, 2000), ws.client_id)
    ws.until("progress")
    answers = [request(url + "/prompt", "POST", {"prompt": _wait(jobs)}) for _ in range(8)]
    statuses = [a[0] for a in answers]
    assert statuses[:6] == [200] * 6 and statuses[6:] == [503, 503], statuses
    error = answers[-1][1]
    assert error["error"]["type"] == "queue_full" and "--queue" in error["error"]["message"]
    assert error["node_errors"] == {} and answers[-1][2]["Retry-After"]
    assert request(url + "/prompt")[1] == {"exec_info": {"queue_remaining": 7}}  # the refused ones left nothing
    request(url + "/queue", "POST", {"clear": True})
    request(url + "/interrupt", "POST")
    ws.until_done(first["prompt_id"])
    ws.close()


class _StuckSocket:
    """A Starlette-like websocket whose sends never complete (a client that stopped reading)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.closed: int | None = None

    async def accept(self) -> None:
        pass

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await asyncio.Event().wait()

    send_bytes = send_text

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def close(self, code: int = 1000) -> None:
        self.closed = code


def test_a_full_client_queue():
    """Previews are dropped first (the oldest), then progress; a queue full of other messages disconnects."""
    from sdtrt.serve.comfy.messages import Clients

    async def scenario() -> None:
        clients = Clients(lambda sid: {"sid": sid}, max_queue=4)
        socket_ = _StuckSocket()
        serving = asyncio.create_task(clients.serve(socket_, "slow"))
        await asyncio.sleep(0.01)  # the first status message is on its way, and stuck
        client = clients._clients["slow"]  # noqa: SLF001 (the queue is what this test checks)

        async def send(*messages: tuple[str, int]) -> None:
            for kind, value in messages:
                if kind == "preview":
                    clients.send_preview(bytes([value]), "slow")
                else:
                    clients.send(kind, {"value": value}, "slow")
            await asyncio.sleep(0.01)

        def queued() -> list[Any]:
            return [p[0] if isinstance(p, bytes) else json.loads(p)["type"] + str(json.loads(p)["data"]["value"])
                    for _, p in client.queue]  # fmt: skip

        await send(("preview", 1), ("preview", 2), ("progress", 1), ("preview", 3))
        assert queued() == [1, 2, "progress1", 3]
        await send(("progress", 2))  # the oldest preview goes
        assert queued() == [2, "progress1", 3, "progress2"]
        await send(("executing", 1), ("executing", 2))  # previews go first
        assert queued() == ["progress1", "progress2", "executing1", "executing2"]
        await send(("preview", 4))  # a preview cannot push out progress: it is dropped itself
        assert queued() == ["progress1", "progress2", "executing1", "executing2"]
        await send(("executed", 1), ("executed", 2))
        assert queued() == ["executing1", "executing2", "executed1", "executed2"] and socket_.closed is None
        await send(("execution_success", 1))  # nothing left to drop: the client is disconnected
        assert "slow" not in clients.ids and socket_.closed == 1013
        serving.cancel()

    asyncio.run(scenario())


def test_reconnect_is_told_the_running_node(proto_inproc):
    """A client that reconnects with its id while its prompt runs gets the status, then the node running."""
    url, jobs = proto_inproc
    ws = Recorder(url)
    running = queue_prompt(url, _wait(jobs, 2000), ws.client_id)
    ws.until("progress")
    ws.close()
    again = Recorder(url, ws.client_id)
    assert again.next()["data"]["sid"] == ws.client_id
    assert again.next() == {"type": "executing", "data": {"node": "3"}}
    assert request(url + "/interrupt", "POST")[0] == 200
    assert types(again.until_done(running["prompt_id"]))[-3:] == ["execution_interrupted", "status", "executing"]
    again.close()
