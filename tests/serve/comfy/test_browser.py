"""ComfyUI's official web frontend, served by `sdtrt serve`, in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): it loads with no failed request to the server and no severe console error,
its node library holds every node of /object_info, and the classic default workflow (checkpoint -> two prompts ->
empty latent -> KSampler -> VAE decode -> save) on the served model queues, runs and shows its image, which is the
PNG the server wrote. SDTRT_SCREENSHOT=PATH saves a screenshot (1280x800) of the UI with that image."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import time
import urllib.parse
from pathlib import Path

import pytest

from ..test_server import Server
from .test_frontend import ui_cwd, ui_request

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CKPT = "tiny"  # the served model's name (its manifest's), which the workflow's ckpt_name names
# Requests the frontend makes that the server answers 404 as ComfyUI does on a fresh install, and that the
# frontend reads as "none yet": the user's saved node templates.
EXPECTED_404 = ("/api/userdata/comfy.templates.json",)


def ui_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path, what in ((CHROMIUM, "Debian's chromium"), (CHROMEDRIVER, "Debian's chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: install {what} (apt-get install chromium chromium-driver)"
    for module, what in (("selenium", "selenium"), ("comfyui_frontend_package", "comfyui-frontend-package")):
        if importlib.util.find_spec(module) is None:
            return f"the Python package {what} is missing (pip install 'sdtrt[test]')"
    return None


@pytest.fixture(scope="module")
def ui_browser_server(tiny_fp32, tmp_path_factory):
    """`sdtrt serve` on the tiny model, its ComfyUI folders in a fresh folder (``comfy_root``)."""
    reason = ui_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ui-browser")
    with ui_cwd(root):  # the server's ComfyUI folder defaults to ./sdtrt-comfy
        server = Server(tiny_fp32)
    server.comfy_root = root / "sdtrt-comfy"
    if ui_request(server.url + "/object_info")[0] != 200:
        server.stop()
        pytest.skip("this server has no ComfyUI protocol routes (/object_info) yet")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def ui_page(ui_browser_server):
    """Chromium on the server's /, the frontend loaded (its app and node library ready); yields the driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.get(ui_browser_server.url + "/")
        ready = "return !!(window.app && app.graph && window.LiteGraph && LiteGraph.registered_node_types"
        ready += " && Object.keys(LiteGraph.registered_node_types).length > 5)"
        ui_wait(driver, ready, 60, "the app to load")
        time.sleep(2)  # the start-up requests that follow the first render (queue, templates, settings)
        driver.ui_events = ui_network(driver)
        yield driver
    finally:
        driver.quit()


def ui_wait(driver, script: str, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    logs = [e["message"][:300] for e in driver.get_log("browser")]
    raise AssertionError(f"timed out after {seconds} s waiting for {what}; console: {logs}")


def ui_network(driver) -> list[dict]:
    """The page's requests so far: {url, status, error} from Chromium's performance (DevTools) log."""
    requests: dict[str, dict] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        method = message.get("method")
        if method == "Network.requestWillBeSent":
            requests.setdefault(params["requestId"], {})["url"] = params["request"]["url"]
        elif method == "Network.responseReceived":
            requests.setdefault(params["requestId"], {}).update(
                url=params["response"]["url"], status=params["response"]["status"]
            )
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            requests.setdefault(params["requestId"], {})["error"] = params.get("errorText")
    return [r for r in requests.values() if "url" in r]


def test_frontend_loads_without_failed_requests(ui_page, ui_browser_server):
    origin = ui_browser_server.url
    mine = [r for r in ui_page.ui_events if r["url"].startswith(origin)]
    assert len(mine) > 20  # index, scripts, styles, fonts, the start-up endpoints
    paths = {urllib.parse.urlsplit(r["url"]).path for r in mine}
    for endpoint in ("/api/users", "/api/settings", "/api/object_info", "/api/system_stats", "/api/extensions",
                     "/api/features", "/api/i18n", "/api/userdata"):  # fmt: skip
        assert endpoint in paths, endpoint
    failed = [
        r for r in mine
        if (r.get("error") or r.get("status", 200) >= 400) and urllib.parse.urlsplit(r["url"]).path not in EXPECTED_404
    ]  # fmt: skip
    assert failed == []
    outside = [r["url"] for r in ui_page.ui_events if not r["url"].startswith((origin, "data:", "blob:", "ws:"))]
    assert outside == []  # nothing fetched from elsewhere (release notes, telemetry) on a server's default settings
    severe = [
        e["message"] for e in ui_page.get_log("browser")
        if e["level"] == "SEVERE" and not any(path in e["message"] for path in EXPECTED_404)
    ]  # fmt: skip
    assert severe == []


def test_node_library_lists_sdtrt_nodes(ui_page, ui_browser_server):
    status, _, body = ui_request(ui_browser_server.url + "/object_info")
    served = json.loads(body)
    assert {"CheckpointLoaderSimple", "KSampler", "VAEDecode", "SaveImage"} <= set(served)
    registered = set(ui_page.execute_script("return Object.keys(LiteGraph.registered_node_types)"))
    assert set(served) <= registered
    categories = ui_page.execute_script(
        "return Object.fromEntries(Object.entries(LiteGraph.registered_node_types).map(([k, v]) => [k, v.category]))"
    )
    for name, info in served.items():
        assert categories[name] == info["category"], name
    ckpt_names = ui_page.execute_script(
        "const n = LiteGraph.createNode('CheckpointLoaderSimple');"
        "return n.widgets.find(w => w.name === 'ckpt_name').options.values"
    )
    assert CKPT in ckpt_names


def ui_default_workflow(ckpt: str) -> dict:
    """ComfyUI's classic default workflow in its UI format (nodes, slots, links), 64x64 and 3 steps."""

    def node(id_, type_, pos, inputs, outputs, widgets):
        ins = [{"name": n, "type": t, "link": link} for n, t, link in inputs]
        outs = [{"name": n, "type": t, "links": links, "slot_index": i} for i, (n, t, links) in enumerate(outputs)]
        return {"id": id_, "type": type_, "pos": pos, "size": [300, 120], "flags": {}, "order": id_, "mode": 0,
                "inputs": ins, "outputs": outs, "properties": {}, "widgets_values": widgets}  # fmt: skip

    nodes = [
        node(4, "CheckpointLoaderSimple", [20, 200], [],
             [("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])], [ckpt]),
        node(6, "CLIPTextEncode", [400, 80], [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [4])],
             ["a red square on a blue background"]),
        node(7, "CLIPTextEncode", [400, 300], [("clip", "CLIP", 5)], [("CONDITIONING", "CONDITIONING", [6])],
             ["blurry"]),
        node(5, "EmptyLatentImage", [400, 500], [], [("LATENT", "LATENT", [2])], [64, 64, 1]),
        node(3, "KSampler", [800, 150],
             [("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
              ("latent_image", "LATENT", 2)],
             [("LATENT", "LATENT", [7])], [42, "fixed", 3, 7.5, "euler", "normal", 1.0]),
        node(8, "VAEDecode", [1150, 150], [("samples", "LATENT", 7), ("vae", "VAE", 8)], [("IMAGE", "IMAGE", [9])],
             []),
        node(9, "SaveImage", [1150, 300], [("images", "IMAGE", 9)], [], ["sdtrt-ui"]),
    ]  # fmt: skip
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
             [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]  # fmt: skip
    return {"last_node_id": 9, "last_link_id": 9, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}  # fmt: skip


WIDGETS = "return Object.fromEntries(app.graph._nodes.map(n => [n.type, Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))]))"  # noqa: E501


def test_default_workflow_queues_and_shows_its_image(ui_page, ui_browser_server):
    driver = ui_page
    driver.find_element("tag name", "body").send_keys("\ue00c")  # Escape: close the first-run templates dialog
    driver.execute_script("return app.loadGraphData(arguments[0])", ui_default_workflow(CKPT))
    widgets = driver.execute_script(WIDGETS)
    assert widgets["CheckpointLoaderSimple"]["ckpt_name"] == CKPT
    assert {k: widgets["KSampler"][k] for k in ("seed", "steps", "sampler_name", "scheduler")} == {
        "seed": 42, "steps": 3, "sampler_name": "euler", "scheduler": "normal"
    }  # fmt: skip
    assert widgets["EmptyLatentImage"] == {"width": 64, "height": 64, "batch_size": 1}
    begin = time.monotonic()
    driver.execute_script("app.queuePrompt(0, 1)")
    src = ui_wait(
        driver,
        "const img = [...document.querySelectorAll('img')].find(i => i.src.includes('/api/view?') && i.complete"
        " && i.naturalWidth > 0); if (img) return img.src;"
        "const out = app.nodeOutputs && Object.values(app.nodeOutputs).find(o => o.images && o.images.length);"
        "return out ? 'nodeOutputs:' + JSON.stringify(out.images[0]) : null",
        45,
        "the output image",
    )
    seconds = time.monotonic() - begin
    if src.startswith("nodeOutputs:"):
        pytest.fail(f"the image is in app.nodeOutputs but no <img> shows it: {src}")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(src).query))
    assert query["type"] == "output" and query["filename"].startswith("sdtrt-ui")
    written = ui_browser_server.comfy_root / "output" / query.get("subfolder", "") / query["filename"]
    status, headers, png = ui_request(f"{ui_browser_server.url}/view?" + urllib.parse.urlencode(
        {"filename": query["filename"], "subfolder": query.get("subfolder", ""), "type": "output"}
    ))  # fmt: skip
    assert (status, headers["content-type"]) == (200, "image/png")
    assert png == written.read_bytes()
    shown = driver.execute_script(
        "const c = document.createElement('canvas'); const i = [...document.querySelectorAll('img')]"
        ".find(i => i.src === arguments[0]); c.width = i.naturalWidth; c.height = i.naturalHeight;"
        "c.getContext('2d').drawImage(i, 0, 0); return [c.width, c.height]",
        src,
    )
    assert shown == [64, 64]
    time.sleep(0.5)  # let the canvas draw the image before the screenshot
    target = os.environ.get("SDTRT_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(base64.b64decode(driver.get_screenshot_as_base64()))
    print(f"queued -> image shown in {seconds:.1f} s")
