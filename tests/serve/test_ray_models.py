"""Several models on the Ray Serve deployment (Ray Serve's model multiplexing): a local Ray on loopback over a
folder of two models, driven with webuiapi as the plain server is in ``test_models``; and the replica without Ray:
each batch on one model, a model closed only once no call runs on it, one model open at a time."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from sdtrt.runtime.errors import ArtifactError
from sdtrt.serve.a1111 import parse_request
from sdtrt.serve.errors import GenerationFailed
from sdtrt.serve.models import Checkpoints, scan
from sdtrt.serve.ray_app import RayConfig, ReplicaCore

from .test_models import FAST, expected, txt2img  # noqa: F401 (expected: the fixture, `sdtrt generate` per model)
from .test_server import get, pixels, post

webuiapi = pytest.importorskip("webuiapi")


def png_bytes_pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def opened_at_most(events: list, limit: int) -> int:
    """The most models open at once over ``events`` (each close after its open); fails on a close without open."""
    open_now: set[str] = set()
    most = 0
    for kind, name in events:
        if kind == "open":
            assert name not in open_now, events
            open_now.add(name)
        else:
            assert name in open_now, events
            open_now.remove(name)
        most = max(most, len(open_now))
    assert most <= limit, events
    return most


# -- the replica without Ray ------------------------------------------------------------------------------------
def test_replica_runs_each_model_on_its_own_pipeline(models_dir, expected):  # noqa: F811
    alpha, beta = Checkpoints(models_dir).items
    core = ReplicaCore(RayConfig(str(models_dir)), name="r0")
    first = parse_request({**FAST, "seed": 21}).with_checkpoint(alpha)
    second = parse_request({**FAST, "seed": 21}).with_checkpoint(beta)
    try:
        out = core.run([first, second, parse_request({**FAST, "seed": 21})])  # the last: the current model, alpha
    finally:
        core.close()
    assert [o.model_name for o in out] == ["alpha", "beta", "alpha"]
    np.testing.assert_array_equal(png_bytes_pixels(out[0].images[0]), expected["alpha"])
    np.testing.assert_array_equal(png_bytes_pixels(out[1].images[0]), expected["beta"])
    np.testing.assert_array_equal(png_bytes_pixels(out[2].images[0]), expected["alpha"])
    # one open at a time: alpha (both of its requests), then beta
    assert core.status()["events"] == [("open", "alpha"), ("close", "alpha"), ("open", "beta"), ("close", "beta")]


def test_a_call_on_one_model_refuses_a_request_for_another(models_dir):
    alpha, beta = Checkpoints(models_dir).items
    core = ReplicaCore(RayConfig(str(models_dir)), name="r0")
    model = core.executor.submit(core.open, alpha.folder).result()
    try:
        requests = [parse_request({**FAST, "seed": s}).with_checkpoint(c) for s, c in ((1, alpha), (2, beta))]
        assert model.acquire()
        out = core.executor.submit(core.run, requests, model).result()
        model.release()
    finally:
        model.close()
    assert out[0].model_name == "alpha" and out[0].seeds == [1]
    assert isinstance(out[1], GenerationFailed) and "a request for model beta [" in str(out[1])


def test_a_model_is_closed_only_once_the_call_on_it_has_ended(models_dir):
    """What Ray's eviction does (``__del__`` from another thread) while a call runs on the pipeline thread: the
    close waits for the call, the call gives its image, then the pipeline closes."""
    alpha = Checkpoints(models_dir).items[0]
    core = ReplicaCore(RayConfig(str(models_dir)), name="r0")
    model = core.executor.submit(core.open, alpha.folder).result()
    assert model.acquire()  # as the replica does before it hands the call to the pipeline thread
    call = core.executor.submit(
        core.run, [parse_request({**FAST, "seed": 3, "steps": 12, "width": 128, "height": 128})], model
    )
    evict = threading.Thread(target=model.__del__)
    evict.start()
    time.sleep(0.5)
    assert evict.is_alive() and not model.closed and core.status()["open"] == ["alpha"]
    (result,) = call.result(timeout=120)
    assert evict.is_alive() and not model.closed  # still held: the replica releases after the call returns
    model.release()
    evict.join(timeout=30)
    assert not evict.is_alive() and model.closed and result.model_name == "alpha"
    assert core.status() == {"replica": "r0", "open": [], "events": [("open", "alpha"), ("close", "alpha")]}
    assert not model.acquire()  # a closed model is never held again: the replica asks Ray for it anew
    model.close()  # closing again (Python's own __del__ later) does nothing
    assert core.status()["events"] == [("open", "alpha"), ("close", "alpha")]


def test_every_model_is_checked_against_the_defaults_before_ray_starts(tmp_path, tiny_fp32, no_shallow):
    (tmp_path / "alpha").symlink_to(tiny_fp32, target_is_directory=True)
    (tmp_path / "plain").symlink_to(no_shallow, target_is_directory=True)
    RayConfig(str(tmp_path)).check_artifact()
    with pytest.raises(ArtifactError, match=rf"--cache-interval 2 needs the shallow UNet, which the artifact "
                                            rf"{no_shallow.resolve()}"):  # fmt: skip
        RayConfig(str(tmp_path), cache_interval=2).check_artifact()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no model"):
        RayConfig(str(tmp_path / "empty")).check_artifact()


def test_a_model_added_later_is_checked_when_a_replica_opens_it(tmp_path, tiny_fp32, no_shallow):
    from sdtrt.serve.errors import RequestError

    (tmp_path / "alpha").symlink_to(tiny_fp32, target_is_directory=True)
    core = ReplicaCore(RayConfig(str(tmp_path), cache_interval=2), name="r0")
    with pytest.raises(RequestError, match=f"{no_shallow.resolve()} is not a model of this server"):
        core.open(str(no_shallow.resolve()))
    (tmp_path / "plain").symlink_to(no_shallow, target_is_directory=True)  # added: the replica rescans
    with pytest.raises(RequestError, match="--cache-interval 2 needs the shallow UNet"):
        core.open(str(no_shallow.resolve()))
    assert core.status()["events"] == []


# -- a local Ray over two models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_models(models_dir):
    """One replica that keeps one model open (``--max-loaded 1``), over ``alpha`` and ``beta``."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from sdtrt.serve.ray_app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayConfig(str(models_dir), cpus_per_replica=0.5, max_loaded=1, app_name="sdtrt-models")
        serve.run(build_app(config), route_prefix="/", name=config.app_name)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while get(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield url, port, serve.get_deployment_handle("Replica", app_name=config.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def api(ray_models):
    return webuiapi.WebUIApi(port=ray_models[1])


def test_ray_lists_both_models_and_its_limit(api, models_dir):
    alpha, beta = scan(models_dir)
    assert api.get_sd_models() == [alpha.sd_model(), beta.sd_model()]
    options = api.get_options()
    assert (options["sd_model_checkpoint"], options["sd_checkpoint_hash"]) == (alpha.title, alpha.sha256)
    assert options["sd_checkpoints_limit"] == 1


def test_ray_switch_serves_the_other_models_image(ray_models, api, expected):  # noqa: F811
    url = ray_models[0]
    api.util_set_model("alpha")
    image, info = txt2img(api)
    np.testing.assert_array_equal(image, expected["alpha"])
    api.util_set_model("beta")  # selects only: the replica opens beta for the next request
    assert api.util_get_current_model().startswith("beta [")
    image, info = txt2img(api)
    np.testing.assert_array_equal(image, expected["beta"])
    assert info["sd_model_name"] == "beta" and "Model: beta" in info["infotexts"][0]
    health = json.loads(get(url + "/health")[1])
    assert health["model"] == "beta" and health["models"] == 2 and health["backend"] == "onnxruntime"
    status, memory = get(url + "/sdapi/v1/memory")  # the replica's process, not the ingress's
    assert status == 200 and json.loads(memory)["ram"]["used"] > 0
    api.util_set_model("alpha")


def test_ray_request_chooses_its_model_and_the_server_keeps_its_own(ray_models, api, expected):  # noqa: F811
    api.util_set_model("alpha")
    image, info = txt2img(api, override_settings={"sd_model_checkpoint": "beta"})
    np.testing.assert_array_equal(image, expected["beta"])
    assert info["sd_model_name"] == "beta" and api.util_get_current_model().startswith("alpha [")
    image, info = txt2img(api)
    np.testing.assert_array_equal(image, expected["alpha"])
    wrong = {**FAST, "override_settings": {"sd_model_checkpoint": "gamma"}}
    status, body, _ = post(ray_models[0] + "/sdapi/v1/txt2img", wrong)
    assert status == 422 and "'gamma' is not a model of this server" in body["detail"]


def test_ray_replica_holds_one_model_at_a_time(ray_models, api):
    """``--max-loaded 1``: Ray's multiplexing closed each model before it opened the other (the replica's own
    record of its opens and closes, read through the deployment handle)."""
    url, _, handle = ray_models
    for name in ("alpha", "beta", "alpha"):
        payload = {**FAST, "override_settings": {"sd_model_checkpoint": name}}
        status, body, _ = post(url + "/sdapi/v1/txt2img", payload)
        assert status == 200 and json.loads(body["info"])["sd_model_name"] == name
    record = handle.models.remote().result()
    events = [tuple(event) for event in record["events"]]
    assert opened_at_most(events, 1) == 1 and record["open"] == ["alpha"]
    assert events[-4:] == [("close", "alpha"), ("open", "beta"), ("close", "beta"), ("open", "alpha")]


def test_ray_requests_for_both_models_at_once_each_get_their_models_image(ray_models, expected):  # noqa: F811
    """Sent together, so that Ray batches them: each batch runs on one model, and an evicted model is closed
    only after the call on it (``--max-loaded 1``: the replica switches back and forth)."""
    from concurrent.futures import ThreadPoolExecutor

    names = ["alpha", "beta"] * 3

    def one(name: str):
        payload = {**FAST, "seed": 21, "override_settings": {"sd_model_checkpoint": name}}
        return post(ray_models[0] + "/sdapi/v1/txt2img", payload)

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        answers = list(pool.map(one, names))
    assert [status for status, _, _ in answers] == [200] * len(names), answers
    for name, (_, body, _) in zip(names, answers, strict=True):
        assert json.loads(body["info"])["sd_model_name"] == name
        np.testing.assert_array_equal(pixels(body["images"][0]), expected[name])
    record = ray_models[2].models.remote().result()
    opened_at_most([tuple(event) for event in record["events"]], 1)


def test_ray_refresh_checkpoints_adds_a_model_the_replica_opens(ray_models, api, models_dir, tiny_fp32, expected):  # noqa: F811
    shutil.copytree(tiny_fp32, models_dir / "gamma")  # a folder of its own: its own model id
    try:
        api.refresh_checkpoints()
        assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta", "gamma"]
        image, info = txt2img(api, override_settings={"sd_model_checkpoint": "gamma"})
        np.testing.assert_array_equal(image, expected["alpha"])  # gamma is a copy of alpha
        assert info["sd_model_name"] == "gamma"
    finally:
        shutil.rmtree(models_dir / "gamma")
    api.refresh_checkpoints()
    assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta"]


def test_ray_a_model_that_cannot_open_is_a_500_and_the_others_still_serve(ray_models, api, models_dir, tiny_fp32):
    broken = models_dir / "broken"
    shutil.copytree(tiny_fp32, broken)
    (broken / "unet.onnx").write_bytes(b"not onnx")
    try:
        api.refresh_checkpoints()
        payload = {**FAST, "seed": 1, "override_settings": {"sd_model_checkpoint": "broken"}}
        status, body, _ = post(ray_models[0] + "/sdapi/v1/txt2img", payload)
        assert status == 500 and f"the model in {broken.resolve()} could not be opened" in body["detail"], body
        assert "unet" in body["detail"]
    finally:
        shutil.rmtree(broken)
    api.refresh_checkpoints()
    status, body, _ = post(ray_models[0] + "/sdapi/v1/txt2img", {**FAST, "seed": 1})
    assert status == 200 and json.loads(body["info"])["sd_model_name"] == "alpha"


# -- the ingress without Ray ------------------------------------------------------------------------------------
def test_the_ingress_reports_the_limit_and_a_switch_only_selects(models_dir):
    """``HandleService`` has no ``load``: a switch selects the model (the next request's replica opens it), so it
    reaches no replica; ``sd_checkpoints_limit`` is the replicas' ``max_loaded``."""
    import asyncio

    from sdtrt.serve.a1111_info import switch_model
    from sdtrt.serve.app import create_app
    from sdtrt.serve.ray_app import HandleService

    checkpoints = Checkpoints(models_dir)
    service = HandleService("sdtrt", 4, checkpoints=checkpoints, max_loaded=3)
    app = create_app(service, checkpoints)
    assert not hasattr(service, "load") and app.state.a1111_options.current()["sd_checkpoints_limit"] == 3
    asyncio.run(switch_model(service, checkpoints, checkpoints.items[1]))
    assert app.state.a1111_options.current()["sd_model_checkpoint"] == checkpoints.items[1].title
    assert service.checkpoints.current == checkpoints.items[1] and service._handle is None  # no Ray call made
