"""The ControlNet API on the Ray Serve deployment: the same routes, units and images as the plain server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_controlnet_api import HINT, hint_image, txt2img_with, unit
from .test_server import get, local_ray, pixels, post


@pytest.fixture(scope="module")
def ray_control_server(tiny_control_fp32):
    from sdtrt.serve.ray_app import RayConfig

    with local_ray(RayConfig(str(tiny_control_fp32), cpus_per_replica=0.5)) as (url, _):
        yield url


def test_ray_serves_the_controlnet_api(ray_control_server, tiny_control_fp32):
    from sdtrt.runtime.control.inputs import ControlInput
    from sdtrt.runtime.pipeline import Pipeline

    assert json.loads(get(ray_control_server + "/controlnet/model_list")[1]) == {"model_list": ["depth", "edges"]}
    status, body, _ = post(ray_control_server + "/sdapi/v1/txt2img", txt2img_with(unit(model="canny")))
    assert status == 422 and "this model has depth, edges" in body["detail"], body
    status, body, _ = post(ray_control_server + "/sdapi/v1/txt2img", txt2img_with(unit(weight=0.7)))
    assert status == 200, body
    assert json.loads(body["info"])["served_by"]
    with Pipeline.from_artifacts(tiny_control_fp32, device="cpu") as pipe:
        result = pipe(
            "a red square",
            steps=3,
            guidance_scale=7.5,
            seed=1,
            height=64,
            width=64,
            scheduler="euler",
            controls=[ControlInput("edges", hint_image(HINT), 0.7)],
        )
    assert np.array_equal(pixels(body["images"][0]), np.asarray(result.images[0].convert("RGB")))
