"""comfy-api-simplified (a ComfyUI client on PyPI: /prompt, /ws, /history, /view, /upload/image, /object_info)
against a real ``sdtrt serve``: ComfyUI's default workflow, img2img from an uploaded image, and a two-KSampler
hires workflow, each image downloaded through /view."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ..test_server import Server
from .proto_util import default_workflow, hires_workflow, img2img_workflow

pytest.importorskip("fastapi")
simplified = pytest.importorskip("comfy_api_simplified")


@pytest.fixture(scope="module")
def proto_client(tiny_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-client")
    srv = Server(tiny_fp32, "--comfy-dir", str(root))
    srv.root = root
    api = simplified.ComfyApiWrapper(srv.url)
    spec = api.get_object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    srv.ckpt = (spec[1]["options"] if spec[0] == "COMBO" else spec[0])[0]
    yield srv, api
    assert srv.stop() == 0
    assert "Traceback" not in srv.log, srv.log


def _images(results: dict[str, bytes]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in results.values()]


def test_default_workflow(proto_client):
    srv, api = proto_client
    workflow = simplified.ComfyWorkflowWrapper(default_workflow(srv.ckpt))
    workflow.set_node_param("KSampler", "seed", 1234)
    workflow.set_node_param("Empty Latent Image", "batch_size", 2)
    results = api.queue_and_wait_images(workflow, "Save Image")
    assert sorted(results) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    first, second = _images(results)
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)  # a batch: two different images
    on_disk = (srv.root / "output" / "ComfyUI_00001_.png").read_bytes()
    assert results["ComfyUI_00001_.png"] == on_disk


def test_img2img_from_upload(proto_client, tmp_path):
    srv, api = proto_client
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    uploaded = api.upload_image(source)  # into the client's default subfolder
    assert uploaded == {"name": "source.png", "subfolder": "default_upload_folder", "type": "input"}
    assert (srv.root / "input" / "default_upload_folder" / "source.png").read_bytes() == source.read_bytes()
    graph = img2img_workflow(srv.ckpt, f"{uploaded['subfolder']}/{uploaded['name']}", denoise=0.6)
    results = api.queue_and_wait_images(simplified.ComfyWorkflowWrapper(graph), "Save Image")
    (image,) = _images(results)
    assert image.shape == (64, 64, 3)
    assert not np.array_equal(image, np.asarray(Image.open(source)))


def test_hires_two_ksamplers(proto_client):
    srv, api = proto_client
    results = api.queue_and_wait_images(simplified.ComfyWorkflowWrapper(hires_workflow(srv.ckpt)), "Save Image")
    (image,) = _images(results)
    assert image.shape == (128, 128, 3)  # the first pass's 64x64 latents upscaled 2x, then sampled at denoise 0.5
