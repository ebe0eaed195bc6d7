"""Several models on one server: ``sdtrt serve FOLDER`` over a folder of artifact folders, listed, switched and
chosen per request as A1111 does, driven with webuiapi's own methods; the pool of open pipelines."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdtrt.runtime.errors import ArtifactError
from sdtrt.serve.errors import RequestError
from sdtrt.serve.models import Checkpoints, PipelinePool, scan

from .test_server import SLOW, Server, generate_cli, get, pixels

webuiapi = pytest.importorskip("webuiapi")

FAST = {"prompt": "a red square", "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.5, "sampler_name": "Euler"}
CLI_ARGS = ["a red square", "--steps", "3", "--size", "64x64", "--cfg", "7.5", "--scheduler", "euler"]


# -- the catalogue ----------------------------------------------------------------------------------------------
def test_a_folder_of_artifacts_lists_each_model_by_its_folder_name(models_dir, tiny_fp32, other_fp32):
    alpha, beta = scan(models_dir)  # "notes" has no manifest: not a model
    assert (alpha.name, beta.name) == ("alpha", "beta")
    assert alpha.folder == str(tiny_fp32.resolve()) and beta.folder == str(other_fp32.resolve())
    assert alpha.sha256 != beta.sha256 and len(alpha.sha256) == 64
    assert alpha.title == f"alpha [{alpha.sha256[:10]}]"
    entry = beta.sd_model()
    assert entry == {"title": beta.title, "model_name": "beta", "hash": beta.sha256[:10], "sha256": beta.sha256,
                     "filename": beta.folder, "config": None}  # fmt: skip
    (single,) = scan(tiny_fp32)  # one artifact folder: one model, named after its source
    assert single.name == "tiny" and single.sha256 == alpha.sha256


def test_a_model_is_found_by_title_name_folder_or_hash(models_dir):
    models = Checkpoints(models_dir)
    alpha, beta = models.items
    assert models.current == alpha
    for name in (beta.title, "beta", beta.sha256[:10], beta.sha256):
        assert models.find(name) == beta, name
    for wrong in ("gamma", "", None, 3, "beta [0000000000]"):
        assert models.find(wrong) is None
    with pytest.raises(RequestError, match=r"'gamma' is not a model of this server; its models: 'alpha \[.*'beta \["):
        models.resolve("gamma")


def test_a_folder_without_models_is_refused_in_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="holds no model: expected manifest.json in it .* or in its subfolders"):
        scan(tmp_path)
    with pytest.raises(ArtifactError, match="is not a folder"):
        scan(tmp_path / "missing")


def test_refresh_adds_and_removes_models_and_keeps_the_current_one(tmp_path, tiny_fp32, other_fp32):
    (tmp_path / "alpha").symlink_to(tiny_fp32, target_is_directory=True)
    models = Checkpoints(tmp_path)
    (tmp_path / "beta").symlink_to(other_fp32, target_is_directory=True)
    assert [c.name for c in models.items] == ["alpha"]
    models.refresh()
    assert [c.name for c in models.items] == ["alpha", "beta"]
    models.select(models.items[1])
    (tmp_path / "alpha").unlink()
    models.refresh()
    assert [c.name for c in models.items] == ["beta"] and models.current.name == "beta"
    (tmp_path / "beta").unlink()
    with pytest.raises(ArtifactError):
        models.refresh()
    assert [c.name for c in models.items] == ["beta"]  # a failed scan leaves the list as it was


# -- the pool ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("max_loaded", "opens"), [(1, ["alpha", "beta", "alpha"]), (2, ["alpha", "beta"])])
def test_the_pool_keeps_at_most_max_loaded_pipelines_open(models_dir, max_loaded, opens):
    from sdtrt.runtime.pipeline import Pipeline

    opened: list[str] = []
    closed: list[str] = []

    def open_pipeline(checkpoint):
        pipe = Pipeline.from_artifacts(checkpoint.folder, device="cpu")
        real_close = pipe.close
        pipe.close = lambda: (closed.append(checkpoint.name), real_close())
        opened.append(checkpoint.name)
        return pipe

    alpha, beta = Checkpoints(models_dir).items
    pool = PipelinePool(open_pipeline, max_loaded)
    first = pool.get(alpha)
    pool.get(beta)
    again = pool.get(alpha)
    assert opened == opens
    assert (again is first) == (max_loaded == 2)
    assert len(pool.loaded()) == max_loaded and pool.loaded()[-1] == alpha  # most recently used last
    assert closed == (["alpha", "beta"] if max_loaded == 1 else [])  # each closed before the next one opened
    pool.close_all()
    assert pool.loaded() == [] and closed == (["alpha", "beta", "alpha"] if max_loaded == 1 else ["beta", "alpha"])


# -- a server over two models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(models_dir):
    srv = Server(models_dir, "--max-loaded", "1", "--queue", "6")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port)


@pytest.fixture(scope="module")
def expected(tiny_fp32, other_fp32, tmp_path_factory):
    """What `sdtrt generate` makes of FAST with seed 21 on each model."""
    out = tmp_path_factory.mktemp("expected")
    return {
        name: generate_cli(folder, out / f"{name}.png", *CLI_ARGS, "--seed", "21")
        for name, folder in (("alpha", tiny_fp32), ("beta", other_fp32))
    }


def txt2img(api, **extra) -> tuple[np.ndarray, dict]:
    result = api.txt2img(**{**FAST, "seed": 21, **extra})
    return np.asarray(result.image.convert("RGB")), result.info


def test_sd_models_and_options_describe_both_models(api, models_dir):
    alpha, beta = scan(models_dir)
    assert api.get_sd_models() == [alpha.sd_model(), beta.sd_model()]
    assert api.util_get_model_names() == sorted([alpha.title, beta.title])
    options = api.get_options()
    assert (options["sd_model_checkpoint"], options["sd_checkpoint_hash"]) == (alpha.title, alpha.sha256)
    assert options["sd_checkpoints_limit"] == 1


def test_switching_serves_the_other_models_image(server, api, expected):
    api.util_set_model("alpha")
    image, info = txt2img(api)
    np.testing.assert_array_equal(image, expected["alpha"])
    assert info["sd_model_name"] == "alpha"
    api.util_set_model("beta")  # webuiapi: closest title, then POST /options; answered once beta is open
    assert api.util_get_current_model().startswith("beta [")
    options = api.get_options()
    assert options["sd_checkpoint_hash"] == next(m["sha256"] for m in api.get_sd_models() if m["model_name"] == "beta")
    image, info = txt2img(api)
    np.testing.assert_array_equal(image, expected["beta"])
    assert info["sd_model_name"] == "beta" and "Model: beta" in info["infotexts"][0]
    assert not np.array_equal(expected["alpha"], expected["beta"])  # the two models really differ
    api.util_set_model("alpha")
    assert re.search(r"model alpha \[\w+\] closed", server.log) and re.search(r"model beta \[\w+\] closed", server.log)


def test_a_request_chooses_its_model_and_the_server_keeps_its_own(api, expected):
    api.util_set_model("alpha")
    image, info = txt2img(api, override_settings={"sd_model_checkpoint": "beta"})
    np.testing.assert_array_equal(image, expected["beta"])
    assert api.util_get_current_model().startswith("alpha [")  # restored afterwards, as A1111 by default
    image, _ = txt2img(api)
    np.testing.assert_array_equal(image, expected["alpha"])
    # restore_afterwards false keeps it, as A1111 does
    image, _ = txt2img(
        api, override_settings={"sd_model_checkpoint": "beta"}, override_settings_restore_afterwards=False
    )
    np.testing.assert_array_equal(image, expected["beta"])
    assert api.util_get_current_model().startswith("beta [")
    api.util_set_model("alpha")


def test_an_unknown_model_is_422_and_nothing_changes(server, api):
    before = api.get_options()["sd_model_checkpoint"]
    status, body, _ = server.post("/sdapi/v1/txt2img", {**FAST, "override_settings": {"sd_model_checkpoint": "gamma"}})
    assert status == 422 and "override_settings.sd_model_checkpoint 'gamma' is not a model" in body["detail"]
    assert "'alpha [" in body["detail"] and "'beta [" in body["detail"]
    status, body, _ = server.post("/sdapi/v1/options", {"sd_model_checkpoint": "gamma"})
    assert status == 422 and "'gamma' is not a model of this server" in body["detail"]
    assert api.get_options()["sd_model_checkpoint"] == before


def test_a_queued_request_runs_on_the_model_it_was_queued_for(server, api, expected):
    """A slow request on alpha runs; meanwhile the server switches to beta: a request queued before the switch
    still runs on alpha, one sent after it runs on beta."""
    api.util_set_model("alpha")
    results: dict[str, dict] = {}

    def send(key: str, payload: dict) -> None:
        results[key] = server.post("/sdapi/v1/txt2img", payload)[1]

    slow = threading.Thread(target=send, args=("slow", SLOW))
    slow.start()
    wait_until(lambda: json.loads(get(server.url + "/health")[1])["running"] == 1)
    queued = threading.Thread(target=send, args=("queued", {**FAST, "seed": 21}))
    queued.start()
    wait_until(lambda: json.loads(get(server.url + "/health")[1])["queued"] == 1)
    switch = threading.Thread(
        target=lambda: results.update(switch=server.post("/sdapi/v1/options", {"sd_model_checkpoint": "beta"}))
    )
    switch.start()
    wait_until(lambda: api.get_options()["sd_model_checkpoint"].startswith("beta ["))
    after, _ = txt2img(api)  # sent after the switch: beta, though the switch waits behind the queue
    for thread in (slow, queued, switch):
        thread.join(timeout=120)
    assert results["switch"][:2] == (200, None)
    assert json.loads(results["slow"]["info"])["sd_model_name"] == "alpha"
    np.testing.assert_array_equal(pixels(results["queued"]["images"][0]), expected["alpha"])
    np.testing.assert_array_equal(after, expected["beta"])
    api.util_set_model("alpha")


def test_refresh_checkpoints_rescans_the_folder(server, api, models_dir, tiny_fp32):
    assert api.refresh_checkpoints() is None and len(api.get_sd_models()) == 2
    (models_dir / "gamma").symlink_to(tiny_fp32, target_is_directory=True)
    try:
        assert api.refresh_checkpoints() is None
        assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta", "gamma"]
    finally:
        (models_dir / "gamma").unlink()
    api.refresh_checkpoints()
    assert [m["model_name"] for m in api.get_sd_models()] == ["alpha", "beta"]


def test_health_names_the_current_model(server, api):
    api.util_set_model("beta")
    health = json.loads(get(server.url + "/health")[1])
    assert health["model"] == "beta" and health["models"] == 2
    api.util_set_model("alpha")


def test_a_model_that_cannot_open_is_a_500_and_the_switch_is_undone(tmp_path, tiny_fp32):
    (tmp_path / "alpha").symlink_to(tiny_fp32, target_is_directory=True)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp32, broken)
    (broken / "unet.onnx").write_bytes(b"not onnx")
    srv = Server(tmp_path)
    try:
        status, body, _ = srv.post("/sdapi/v1/options", {"sd_model_checkpoint": "broken"})
        assert status == 500 and "unet" in body["detail"], body
        status, options, _ = srv.post("/sdapi/v1/txt2img", {**FAST, "seed": 1})
        assert status == 200 and json.loads(options["info"])["sd_model_name"] == "alpha"
    finally:
        assert srv.stop() == 0


def test_the_server_opens_models_whose_threads_sleep_between_runs(tiny_fp32):
    # ONNX Runtime's spinning threads took the cores from the server's own threads (RESULTS.md, "spinning")
    from sdtrt.serve.server import ServeConfig, open_models

    from ..runtime.test_backends import spinning

    checkpoints, pool = open_models(ServeConfig(tiny_fp32))
    try:
        engines = pool.peek(checkpoints.current).engines
        assert "unet" in engines and not any(spinning(engine) for engine in engines.values())
    finally:
        pool.close_all()


def test_a_ray_replica_opens_models_whose_threads_sleep_between_runs(tiny_fp32):
    from sdtrt.serve.ray_replica import RayConfig, ReplicaCore

    from ..runtime.test_backends import spinning

    core = ReplicaCore(RayConfig(str(tiny_fp32)), name="r0")
    try:
        engines = core.pipe.engines
        assert "unet" in engines and not any(spinning(engine) for engine in engines.values())
    finally:
        core.close()


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_a_folder_without_models_is_one_line_and_exit_1(tmp_path):
    import subprocess

    from .test_server import SDTRT

    done = subprocess.run([SDTRT, "serve", str(tmp_path), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "holds no model" in done.stderr
    assert not Path(tmp_path).joinpath("manifest.json").exists()
