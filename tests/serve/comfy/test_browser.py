"""ComfyUI's official web frontend, served by `sdtrt serve`, in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): it loads with no failed request to the server and no severe console error,
its node library holds every node of /object_info, and the classic default workflow (checkpoint -> two prompts ->
empty latent -> KSampler -> VAE decode -> save) on the served model queues, runs and shows its image, which is the
PNG the server wrote. The workflow is opened the way a user does: from the templates browser a first visit opens,
which lists sdtrt's templates. SDTRT_SCREENSHOT=PATH saves a screenshot (1280x800) of the UI with that image."""

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
from .test_frontend import ui_request

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
def ui_run(request) -> dict:
    """The model served and what the workflow changes of its template: the tiny model, 64x64, 3 steps; or, for the
    README's screenshot, SDTRT_UI_MODEL (e.g. `sdtrt export shapes`) at its template's size, 20 steps, cfg 2 and
    SDTRT_UI_PROMPT."""
    folder = os.environ.get("SDTRT_UI_MODEL")
    if folder:
        prompt = os.environ.get("SDTRT_UI_PROMPT", "a red circle on a blue background")
        return {"folder": Path(folder), "ckpt": None, "size": None, "widgets": {
            "KSampler": {"seed": 1, "control_after_generate": "fixed", "steps": 20, "cfg": 2.0},
            "prompt": prompt}}  # fmt: skip
    return {"folder": request.getfixturevalue("tiny_fp32"), "ckpt": CKPT, "size": 64, "widgets": {
        "KSampler": {"seed": 42, "control_after_generate": "fixed", "steps": 3},
        "EmptyLatentImage": {"width": 64, "height": 64}}}  # fmt: skip


@pytest.fixture(scope="module")
def ui_browser_server(ui_run, tmp_path_factory):
    """`sdtrt serve` on ``ui_run``'s model, its ComfyUI folders in a fresh folder (``comfy_root``)."""
    reason = ui_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ui-browser") / "comfy"
    server = Server(ui_run["folder"], "--comfy-dir", str(root))
    server.comfy_root = root
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


def test_node_library_lists_sdtrt_nodes(ui_page, ui_browser_server, ui_run):
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
    ckpt_names = ui_page.execute_script(CKPT_NAMES)
    assert ckpt_names == served["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert ckpt_names and (ui_run["ckpt"] is None or ui_run["ckpt"] in ckpt_names)


# The output image as the page shows it: an <img> (Vue nodes, the queue panel) or the SaveImage node's image that
# the canvas draws, loaded from /api/view; ["dom" | "node", its URL].
SHOWN = """
const dom = [...document.querySelectorAll('img')].find(i => i.src.includes('/api/view?') && i.complete
                                                        && i.naturalWidth > 0);
if (dom) return ['dom', dom.src];
const node = app.graph._nodes.find(n => n.type === 'SaveImage');
const img = node && node.imgs && node.imgs[0];
return img && img.complete && img.naturalWidth > 0 && img.src.includes('/api/view?') ? ['node', img.src] : null;
"""
SIZE = """
const [where, src] = arguments;
const img = where === 'dom' ? [...document.querySelectorAll('img')].find(i => i.src === src)
                            : app.graph._nodes.find(n => n.type === 'SaveImage').imgs[0];
return [img.naturalWidth, img.naturalHeight];
"""
SET_WIDGETS = (
    "for (const n of app.graph._nodes) for (const [name, value] of Object.entries(arguments[0][n.type] || {}))"
    " n.widgets.find(w => w.name === name).value = value"
)
CKPT_NAMES = (
    "return LiteGraph.createNode('CheckpointLoaderSimple').widgets.find(w => w.name === 'ckpt_name').options.values"
)
WIDGETS = "return Object.fromEntries(app.graph._nodes.map(n => [n.type, Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))]))"  # noqa: E501


def test_default_workflow_from_the_templates_runs_and_shows_its_image(ui_page, ui_browser_server, ui_run):
    driver = ui_page
    # a first visit opens the templates browser, which lists sdtrt's workflows: open "Text to image" there
    card = ui_wait(
        driver,
        "return [...document.querySelectorAll('[role=dialog] *')].find(e => e.children.length === 0"
        " && e.textContent.trim() === 'Text to image') || null",
        20,
        "sdtrt's templates in the templates browser",
    )
    card.click()
    ui_wait(driver, "return app.graph._nodes.some(n => n.type === 'KSampler')", 20, "the template's workflow")
    widgets = driver.execute_script(WIDGETS)
    ckpt = ui_run["ckpt"] or ui_page.execute_script(CKPT_NAMES)[0]  # the tiny model, or the one served first
    assert widgets["CheckpointLoaderSimple"]["ckpt_name"] == ckpt
    assert {k: widgets["KSampler"][k] for k in ("sampler_name", "scheduler", "denoise")} == {
        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0
    }  # fmt: skip
    changes = {k: v for k, v in ui_run["widgets"].items() if k != "prompt"}
    driver.execute_script(SET_WIDGETS, changes)
    if "prompt" in ui_run["widgets"]:  # the positive prompt: the first CLIPTextEncode
        driver.execute_script(
            "app.graph._nodes.find(n => n.type === 'CLIPTextEncode').widgets[0].value = arguments[0]",
            ui_run["widgets"]["prompt"],
        )
    widgets = driver.execute_script(WIDGETS)
    for node, values in changes.items():
        assert {k: widgets[node][k] for k in values} == values
    size = ui_run["size"] or widgets["EmptyLatentImage"]["width"]
    begin = time.monotonic()
    driver.execute_script("app.queuePrompt(0, 1)")
    where, src = ui_wait(driver, SHOWN, 45, "the output image shown")
    seconds = time.monotonic() - begin
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(src).query))
    assert query["type"] == "output" and query["filename"].startswith("sdtrt")
    written = ui_browser_server.comfy_root / "output" / query.get("subfolder", "") / query["filename"]
    status, headers, png = ui_request(f"{ui_browser_server.url}/view?" + urllib.parse.urlencode(
        {"filename": query["filename"], "subfolder": query.get("subfolder", ""), "type": "output"}
    ))  # fmt: skip
    assert (status, headers["content-type"]) == (200, "image/png")
    assert png == written.read_bytes()
    assert driver.execute_script(SIZE, where, src) == [size, size]
    status, _, body = ui_request(ui_browser_server.url + "/api/jobs?status=completed")  # the queue panel's source
    (job,) = json.loads(body)["jobs"]
    assert job["preview_output"]["filename"] == query["filename"] and job["outputs_count"] == 1
    target = os.environ.get("SDTRT_SCREENSHOT")
    if target:  # the whole workflow and its image in view at 80 %, the minimap away
        driver.execute_script(
            "app.extensionManager.setting.set('Comfy.Minimap.Visible', false);"
            "app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [70, 100]; app.graph.setDirtyCanvas(true, true)"
        )
        time.sleep(1.0)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(base64.b64decode(driver.get_screenshot_as_base64()))
    print(f"queued -> image shown ({where}) in {seconds:.1f} s")
