"""``sdtrt serve MODELS --ray`` from the command line: the CLI's Ray path (its options into ``RayConfig``, a local
Ray started by the server process itself) over a folder of two models, driven with webuiapi, stopped by SIGTERM.
The deployment's behaviour in depth is tested through ``build_app`` (``test_ray.py``, ``test_ray_models.py``)."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest

from sdtrt.serve.models import scan

from .test_models import expected, txt2img  # noqa: F401 (expected: the fixture, `sdtrt generate` per model)
from .test_server import Server, get

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("ray.serve")


def test_sdtrt_serve_ray_serves_both_models_and_stops_on_sigterm(models_dir, expected):  # noqa: F811
    srv = Server(models_dir, "--ray", "--max-loaded", "1", "--cpus-per-replica", "1", "--queue", "8")
    try:
        api = webuiapi.WebUIApi(port=srv.port)
        alpha, beta = scan(models_dir)
        assert api.get_sd_models() == [alpha.sd_model(), beta.sd_model()]
        assert api.get_options()["sd_checkpoints_limit"] == 1  # --max-loaded reached the replicas
        image, info = txt2img(api)
        np.testing.assert_array_equal(image, expected["alpha"])
        image, info = txt2img(api, override_settings={"sd_model_checkpoint": "beta"})
        np.testing.assert_array_equal(image, expected["beta"])
        assert info["sd_model_name"] == "beta" and api.util_get_current_model().startswith("alpha [")
        api.util_set_model("beta")
        image, info = txt2img(api)
        np.testing.assert_array_equal(image, expected["beta"])
        health = json.loads(get(srv.url + "/health")[1])
        assert health["model"] == "beta" and health["models"] == 2
        with pytest.raises(urllib.error.HTTPError) as refused:  # ComfyUI's API is the plain server's only
            get(srv.url + "/prompt")
        assert refused.value.code == 404
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log
