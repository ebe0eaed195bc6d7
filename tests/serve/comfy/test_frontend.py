"""ComfyUI's web frontend on `sdtrt serve`: its files at / with the types browsers need, and every endpoint it calls
while it starts (users, settings, userdata, features, i18n, templates, model folders, jobs), on a real server
subprocess; the user-data store's path safety and ComfyUI's jobs shapes, directly."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request

import pytest

from sdtrt.serve.comfy.joblist import JobsQueryError, job_detail, jobs_page
from sdtrt.serve.comfy.templates import template_workflow
from sdtrt.serve.comfy.userdata import UnsafeName, UserData

from ..test_server import Server

pytest.importorskip("fastapi")


def ui_request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def ui_json(url: str, method: str = "GET", body: object = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = ui_request(url, method, data)
    return status, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def ui_server(tiny_fp32, tmp_path_factory):
    """`sdtrt serve` on the tiny model, its ComfyUI folders (and the user's files) in a fresh folder."""
    root = tmp_path_factory.mktemp("ui-serve") / "comfy"
    server = Server(tiny_fp32, "--comfy-dir", str(root))
    server.comfy_root = root
    yield server
    assert server.stop() == 0


# -- the frontend's files ----------------------------------------------------------------------------------------
def test_index_and_assets_are_served_with_their_types(ui_server):
    pytest.importorskip("comfyui_frontend_package")
    status, headers, body = ui_request(ui_server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-cache"
    html = body.decode()
    assert '<div id="vue-app">' in html
    script = re.search(r'<script type="module" crossorigin src="\./([^"]+)"', html).group(1)
    status, headers, body = ui_request(f"{ui_server.url}/{script}")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and len(body) > 1000
    for path, media in (("materialdesignicons.min.css", "text/css"), ("fonts/inter-latin-normal.woff2", "font/woff2")):
        status, headers, _ = ui_request(f"{ui_server.url}/{path}")
        assert (status, headers["content-type"].split(";")[0]) == (200, media), path
    status, headers, body = ui_request(ui_server.url + "/user.css")  # index.html links it: none is empty
    assert (status, headers["content-type"].split(";")[0], body) == (200, "text/css", b"")


def test_missing_asset_is_404_and_api_routes_win_over_the_static_mount(ui_server):
    websocket = pytest.importorskip("websocket")
    assert ui_request(ui_server.url + "/assets/no-such-file.js")[0] == 404
    assert ui_request(ui_server.url + "/no-such-path")[0] == 404
    assert ui_request(ui_server.url + "/sdapi/v1/txt2img")[0] == 405  # a POST route: GET is still a 405
    assert ui_request(ui_server.url + "/assets/x.js", "POST", b"")[0] == 405
    assert ui_request(ui_server.url + "/sdapi/v1/sd-models")[0] == 200
    assert ui_request(ui_server.url + "/health")[0] == 200
    ws_url = ui_server.url.replace("http:", "ws:")
    with pytest.raises(websocket.WebSocketBadStatusException):  # a websocket off /ws: refused at the handshake
        websocket.create_connection(ws_url + "/not-ws", timeout=10)
    ws = websocket.create_connection(ws_url + "/ws?clientId=ui-test", timeout=10)  # /ws is the protocol's
    assert json.loads(ws.recv())["type"] == "status"
    ws.close()
    assert ui_request(ui_server.url + "/health")[0] == 200
    assert "Traceback" not in ui_server.log


# -- the start-up endpoints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["/api", ""])
def test_startup_endpoints_answer(ui_server, prefix):
    base = ui_server.url + prefix
    assert ui_json(base + "/users") == (200, {"storage": "server", "migrated": True})
    assert ui_json(base + "/i18n") == (200, {})
    assert ui_json(base + "/workflow_templates") == (200, {})
    status, features = ui_json(base + "/features")
    assert status == 200 and features["supports_preview_metadata"] is False and features["max_upload_size"] >= 0
    assert ui_json(base + "/userdata?dir=workflows&recurse=true&split=false&full_info=true") == (200, [])
    assert ui_json(base + "/userdata?dir=subgraphs&recurse=true&split=false&full_info=true") == (200, [])
    assert ui_json(base + "/global_subgraphs") == (200, {})
    assert ui_json(base + "/experiment/models") == (
        200,
        [{"name": "checkpoints", "folders": []}, {"name": "loras", "folders": []}],
    )
    status, models = ui_json(base + "/experiment/models/checkpoints")
    assert status == 200 and [m["name"] for m in models] == ["tiny"]  # the manifest's model name
    assert ui_json(base + "/experiment/models/vae")[0] == 404


@pytest.mark.parametrize("prefix", ["/api", ""])
def test_jobs_endpoint_answers(ui_server, prefix):
    base = ui_server.url + prefix
    assert ui_json(base + "/jobs?status=in_progress,pending&limit=200&offset=0") == (
        200,
        {"jobs": [], "pagination": {"offset": 0, "limit": 200, "total": 0, "has_more": False}},
    )
    assert ui_json(base + "/jobs?status=done")[0] == 400
    assert ui_json(base + "/jobs/no-such-id")[0] == 404
    assert ui_json(base + "/jobs/no-such-id/cancel", "POST", {})[0] == 404
    assert ui_json(base + "/jobs/cancel", "POST", {"ids": []})[0] == 400


def ui_prompt(steps: int, size: int, prefix: str) -> dict:
    """ComfyUI's default workflow in the API format, on the tiny model."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red square", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }  # fmt: skip


def ui_wait_job(base: str, prompt_id: str, status: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        code, job = ui_json(f"{base}/api/jobs/{prompt_id}")
        if code == 200 and job["status"] == status:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {prompt_id} did not become {status}: {job}")


def test_jobs_follow_prompts_and_cancel_them(ui_server):
    base = ui_server.url
    slow = [ui_json(base + "/prompt", "POST", {"prompt": ui_prompt(60, 256, f"slow{i}")})[1] for i in range(2)]
    running, waiting = (answer["prompt_id"] for answer in slow)
    ui_wait_job(base, running, "in_progress")
    status, page = ui_json(base + "/api/jobs?status=in_progress,pending")
    assert [(j["id"], j["status"]) for j in page["jobs"]] == [(waiting, "pending"), (running, "in_progress")]
    assert all(isinstance(j["create_time"], int) for j in page["jobs"])
    assert ui_json(f"{base}/api/jobs/{waiting}/cancel", "POST", {}) == (
        200, {"id": waiting, "status": "pending", "cancelled": True}
    )  # fmt: skip
    assert ui_json(f"{base}/api/jobs/{waiting}")[0] == 404  # off the queue, never run
    status, answer = ui_json(base + "/api/jobs/cancel", "POST", {"job_ids": [running, "nope"]})
    assert answer["jobs"] == [
        {"id": running, "status": "in_progress", "cancelled": True}, {"id": "nope", "status": None, "cancelled": False}
    ]  # fmt: skip
    stopped = ui_wait_job(base, running, "cancelled")
    assert stopped["execution_end_time"] >= stopped["execution_start_time"] and stopped["outputs_count"] == 0
    done = ui_json(base + "/prompt", "POST", {"prompt": ui_prompt(2, 64, "fast")})[1]["prompt_id"]
    job = ui_wait_job(base, done, "completed")
    assert job["preview_output"]["filename"].startswith("fast") and job["outputs"]["9"]["images"][0]["type"] == "output"
    assert job["workflow"]["prompt"]["3"]["inputs"]["steps"] == 2
    assert ui_json(f"{base}/jobs/{done}/cancel", "POST", {}) == (
        200, {"id": done, "status": "completed", "cancelled": False}
    )  # fmt: skip
    status, page = ui_json(base + "/api/jobs?status=completed,cancelled&sort_order=desc")
    assert [j["id"] for j in page["jobs"]] == [done, running]


def test_templates_are_sdtrt_workflows_on_the_current_model(ui_server):
    status, headers, body = ui_request(ui_server.url + "/templates/index.json")
    assert (status, headers["content-type"]) == (200, "application/json")
    (module,) = json.loads(body)
    assert module["moduleName"] == "default"
    names = [t["name"] for t in module["templates"]]
    assert names == ["sdtrt-txt2img", "sdtrt-hires"]
    for name in names:
        status, workflow = ui_json(f"{ui_server.url}/templates/{name}.json")
        assert status == 200
        nodes = {n["type"]: n for n in workflow["nodes"]}
        assert nodes["CheckpointLoaderSimple"]["widgets_values"] == ["tiny"]
        assert nodes["EmptyLatentImage"]["widgets_values"] == [128, 128, 1]  # the tiny profile's optimum
        status, headers, svg = ui_request(f"{ui_server.url}/templates/{name}-1.svg")
        assert (status, headers["content-type"]) == (200, "image/svg+xml") and svg.startswith(b"<svg")
    assert ui_json(ui_server.url + "/templates/index_logo.json") == (200, {})
    assert ui_request(ui_server.url + "/templates/nope.json")[0] == 404
    assert ui_request(ui_server.url + "/templates/nope-1.svg")[0] == 404


@pytest.mark.parametrize("name", ["sdtrt-txt2img", "sdtrt-hires"])
def test_template_links_match_their_slots(name):
    workflow = template_workflow(name, "m", 64, 64)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    seen = set()
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id and out["type"] == inp["type"] == kind
        seen.add(link_id)
    declared = {i["link"] for n in nodes.values() for i in n["inputs"]}
    declared |= {link for n in nodes.values() for o in n["outputs"] for link in o["links"]}
    assert declared == seen and workflow["last_link_id"] == max(seen)
    assert template_workflow("nope", "m", 64, 64) is None


def test_settings_are_stored_per_server(ui_server):
    base = ui_server.url + "/api/settings"
    status, settings = ui_json(base)
    assert status == 200 and settings["Comfy.Notification.ShowVersionUpdates"] is False  # the server's default
    assert ui_json(base + "/Comfy.InstalledVersion", "POST", "1.58.1")[0] == 200
    assert ui_json(base, "POST", {"Comfy.Locale": "en", "Comfy.Notification.ShowVersionUpdates": True})[0] == 200
    assert ui_json(base + "/Comfy.InstalledVersion") == (200, "1.58.1")
    assert ui_json(base + "/Comfy.NoSuchSetting") == (200, None)
    status, settings = ui_json(ui_server.url + "/settings")
    assert settings["Comfy.Locale"] == "en" and settings["Comfy.Notification.ShowVersionUpdates"] is True
    stored = json.loads((ui_server.comfy_root / "user/default/comfy.settings.json").read_text())
    assert stored["Comfy.InstalledVersion"] == "1.58.1"
    assert ui_request(base, "POST", b"[1, 2]")[0] == 400
    assert ui_request(base + "/X", "POST", b"{not json")[0] == 400


def test_users_cannot_be_added(ui_server):
    status, body = ui_json(ui_server.url + "/api/users", "POST", {"username": "bob"})
    assert status == 400 and "one user" in body["detail"]


def test_userdata_store_list_read_move_delete(ui_server):
    base = ui_server.url + "/api/userdata"
    workflow = json.dumps({"nodes": [], "links": []}).encode()
    status, _, body = ui_request(base + "/workflows%2Fmine.json?overwrite=true&full_info=false", "POST", workflow)
    assert (status, json.loads(body)) == (200, "workflows/mine.json")
    assert (ui_server.comfy_root / "user/default/workflows/mine.json").read_bytes() == workflow
    status, _, _ = ui_request(base + "/workflows%2Fmine.json?overwrite=false", "POST", b"{}")
    assert status == 409
    status, listing = ui_json(base + "?dir=workflows&recurse=true&split=false&full_info=true")
    assert status == 200 and [(f["path"], f["size"]) for f in listing] == [("mine.json", len(workflow))]
    assert ui_json(base + "?dir=workflows&split=true") == (200, [["mine.json", "mine.json"]])
    status, headers, body = ui_request(base + "/workflows%2Fmine.json")
    assert (status, body, headers["content-disposition"]) == (200, workflow, "attachment")
    status, _, body = ui_request(
        base + "/workflows%2Fmine.json/move/workflows%2Fsub%2Frenamed.json?full_info=true", "POST"
    )
    assert status == 200 and json.loads(body)["path"] == "workflows/sub/renamed.json"
    assert ui_request(base + "/workflows%2Fmine.json")[0] == 404
    assert ui_json(base + "?dir=workflows&recurse=true") == (200, ["sub/renamed.json"])
    assert ui_json(base + "?dir=workflows") == (200, [])  # not recursive: only files directly in it
    assert ui_request(base + "/workflows%2Fsub%2Frenamed.json", "DELETE")[0] == 204
    assert ui_request(base + "/workflows%2Fsub%2Frenamed.json", "DELETE")[0] == 404
    assert ui_json(base + "?dir=nowhere")[0] == 404
    assert ui_json(base)[0] == 400


def test_user_css_is_a_stylesheet(ui_server):
    url = ui_server.url + "/api/userdata/user.css"
    status, headers, body = ui_request(url)
    assert (status, headers["content-type"].split(";")[0], body) == (200, "text/css", b"")
    assert ui_request(url, "POST", b"body { color: red }")[0] == 200
    status, headers, body = ui_request(url)
    assert (status, headers["content-type"].split(";")[0], body) == (200, "text/css", b"body { color: red }")
    assert "content-disposition" not in headers
    assert ui_request(url, "DELETE")[0] == 204


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "workflows%2F..%2F..%2F..%2Fsecret.txt",
        "C:%5Cx.txt",
        "a%00b",
        "%2E%2E",
    ],
)
def test_userdata_refuses_names_out_of_the_user_folder(ui_server, name):
    secret = ui_server.comfy_root / "user" / "secret.txt"
    secret.write_text("not yours")
    base = ui_server.url + "/api/userdata/"
    assert ui_request(base + name)[0] == 403
    assert ui_request(base + name, "POST", b"x")[0] == 403
    assert ui_request(base + name, "DELETE")[0] == 403
    assert ui_request(base + "ok.json/move/" + name, "POST")[0] == 403
    assert ui_json(ui_server.url + "/api/userdata?dir=" + name)[0] == 403
    assert secret.read_text() == "not yours"


def test_userdata_refuses_a_symlink_out(ui_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (ui_server.comfy_root / "user/default/linked").symlink_to(outside, target_is_directory=True)
    base = ui_server.url + "/api/userdata"
    assert ui_request(base + "/linked%2Fsecret.json")[0] == 403
    assert ui_request(base + "/linked%2Fnew.json", "POST", b"{}")[0] == 403
    assert ui_json(base + "?dir=linked")[0] == 403
    assert not (outside / "new.json").exists()


# -- the store and the jobs shapes, directly ------------------------------------------------------------------------
def test_userdata_names(tmp_path):
    users = UserData(tmp_path).create()
    assert users.path("workflows/a.json") == tmp_path / "user/default/workflows/a.json"
    assert users.path("workflows\\b.json") == tmp_path / "user/default/workflows/b.json"
    for bad in ["", "/", "../x", "a/../../x", "/abs", "\\abs", "C:x", "x\0y"]:
        with pytest.raises(UnsafeName):
            users.path(bad)
    assert users.write("a.json", b"1") and users.write("a.json", b"2", overwrite=False) is None
    assert (tmp_path / "user/default/a.json").read_bytes() == b"1"
    assert not list((tmp_path / "user/default").glob(".tmp-*"))  # the temporary file was renamed
    users.store_settings({"a": 1})
    users.store_settings({"b": 2})
    assert users.settings() == {"a": 1, "b": 2}
    (tmp_path / "user/default/comfy.settings.json").write_text("{damaged")
    assert users.settings() == {}


PROMPT = {"1": {"class_type": "SaveImage", "inputs": {}}}
EXTRA = {"create_time": 1000, "extra_pnginfo": {"workflow": {"id": "wf-1"}}}
IMAGE = {"filename": "sdtrt_00001_.png", "subfolder": "", "type": "output"}


def ui_history_entry(number: int, end: str, create_time: int) -> dict:
    extra = {**EXTRA, "create_time": create_time}
    messages = [["execution_start", {"prompt_id": "x", "timestamp": create_time + 5}]]
    messages.append(
        [
            end,
            {
                "prompt_id": "x",
                "timestamp": create_time + 50,
                "node_id": "1",
                "node_type": "SaveImage",
                "exception_message": "boom",
                "exception_type": "RuntimeError",
                "traceback": [],
            },
        ]
    )
    ok = end == "execution_success"
    status = {"status_str": "success" if ok else "error", "completed": ok, "messages": messages}
    outputs = {"1": {"images": [IMAGE]}} if ok else {}
    return {"prompt": [number, f"id-{number}", PROMPT, extra, ["1"]], "outputs": outputs, "status": status}


def test_jobs_from_comfyui_queue_and_history():
    running = [[5, "run", PROMPT, {**EXTRA, "create_time": 5000}, ["1"]]]
    pending = [[6, "wait", PROMPT, {**EXTRA, "create_time": 6000}, ["1"]]]
    history = {
        "id-1": ui_history_entry(1, "execution_success", 1000),
        "id-2": ui_history_entry(2, "execution_error", 2000),
        "id-3": ui_history_entry(3, "execution_interrupted", 3000),
    }
    snapshot = (running, pending, history)
    page = jobs_page(snapshot, {})
    assert [(j["id"], j["status"]) for j in page["jobs"]] == [
        ("wait", "pending"), ("run", "in_progress"), ("id-3", "cancelled"), ("id-2", "failed"), ("id-1", "completed")
    ]  # fmt: skip
    assert page["pagination"] == {"offset": 0, "limit": 5, "total": 5, "has_more": False}
    done = jobs_page(snapshot, {"status": "completed", "limit": "1"})["jobs"][0]
    assert done == {
        "id": "id-1", "status": "completed", "priority": 1, "create_time": 1000, "execution_start_time": 1005,
        "execution_end_time": 1050, "outputs_count": 1, "workflow_id": "wf-1",
        "preview_output": {**IMAGE, "nodeId": "1", "mediaType": "images"},
    }  # fmt: skip
    failed = jobs_page(snapshot, {"status": "failed"})["jobs"][0]
    assert failed["execution_error"]["exception_message"] == "boom" and "preview_output" not in failed
    paged = jobs_page(snapshot, {"limit": "2", "offset": "1", "sort_order": "asc"})
    assert [j["id"] for j in paged["jobs"]] == ["id-2", "id-3"] and paged["pagination"]["has_more"] is True
    assert job_detail(snapshot, "id-1")["outputs"] == {"1": {"images": [IMAGE]}}
    assert job_detail(snapshot, "id-1")["workflow"] == {"prompt": PROMPT, "extra_data": EXTRA}
    assert job_detail(snapshot, "wait")["status"] == "pending" and job_detail(snapshot, "nope") is None
    finished = ([[1, "id-1", PROMPT, EXTRA, ["1"]]], [], history)  # read as running, then found in the history
    assert [j["status"] for j in jobs_page(finished, {})["jobs"] if j["id"] == "id-1"] == ["completed"]
    for bad in ({"status": "done"}, {"sort_by": "name"}, {"limit": "0"}, {"limit": "x"}, {"sort_order": "up"}):
        with pytest.raises(JobsQueryError):
            jobs_page(snapshot, bad)


def test_without_the_frontend_package_root_says_how_to_get_it(tiny_fp32, tmp_path, monkeypatch):
    # a comfyui_frontend_package without its static files, first on the server's path: as if it were not installed
    shadow = tmp_path / "shadow" / "comfyui_frontend_package"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    server = Server(tiny_fp32, "--comfy-dir", str(tmp_path / "comfy"))
    try:
        status, body = ui_json(server.url + "/")
        assert status == 404 and 'pip install "sdtrt[ui]"' in body["detail"]
        assert ui_json(server.url + "/api/settings")[0] == 200  # the frontend's endpoints answer all the same
        assert ui_request(server.url + "/assets/index.js")[0] == 404
    finally:
        assert server.stop() == 0
    assert "web UI: not served" in server.log
    assert "web UI at" not in server.proc.stdout.read()


def test_the_ready_line_names_the_web_ui(ui_server):
    pytest.importorskip("comfyui_frontend_package")
    assert f"; web UI at {ui_server.url}/" in ui_server.proc.stdout.readline()
