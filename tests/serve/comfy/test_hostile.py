"""Hostile requests to ComfyUI's routes on a real ``sdtrt serve``: paths that leave their folder (``..``, absolute,
symlinks out), oversize and malformed bodies and uploads, non-images, too many pixels, and bad graphs (cycle,
missing input, missing node or output index, wrong type, too many nodes). Each is a 400 (404 for a file that is
not there) with ComfyUI's error object, never a 500."""

from __future__ import annotations

import io
import json
import struct
import uuid
import zlib

import pytest
from PIL import Image

from ..test_server import Server
from .proto_util import default_workflow, request

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def proto_server(tiny_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-hostile")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(_png(4, 4))
    (outside / "secret.txt").write_text("secret")
    srv = Server(tiny_fp32, "--comfy-dir", str(root / "comfy"))
    (root / "comfy" / "input" / "out").symlink_to(outside, target_is_directory=True)
    (root / "comfy" / "output" / "link.png").symlink_to(outside / "secret.png")
    srv.root = root / "comfy"
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log, srv.log


def _png(width: int, height: int, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _multipart(fields: dict[str, str], filename: str | None, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if filename is not None:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(server: Server, filename: str | None, data: bytes, **fields: str) -> tuple[int, dict]:
    body, headers = _multipart(fields, filename, data)
    status, answer, _ = request(server.url + "/upload/image", "POST", raw=body, headers=headers)
    return status, answer


def _error(answer: dict, kind: str | None = None) -> str:
    assert set(answer["error"]) == {"type", "message", "details", "extra_info"}, answer
    if kind is not None:
        assert answer["error"]["type"] == kind, answer
    return answer["error"]["message"]


@pytest.mark.parametrize(
    "query, status, words",
    [
        ({"filename": "../input/x.png"}, 400, "'..'"),
        ({"filename": "x.png", "subfolder": "../../.."}, 400, "'..'"),
        ({"filename": "/etc/passwd"}, 400, "absolute"),
        ({"filename": "x.png", "subfolder": "/etc"}, 400, "absolute"),
        ({"filename": "secret.txt", "subfolder": "out", "type": "input"}, 400, "outside"),
        ({"filename": "link.png"}, 400, "outside"),
        ({"filename": "x.png", "type": "models"}, 400, "type must be one of"),
        ({"filename": "nothing.png"}, 404, "no file"),
        ({}, 400, "filename is missing"),
        ({"filename": "a.png", "channel": "rgbx"}, 400, "channel must be one of"),
    ],
)
def test_view_refuses(proto_server, query, status, words):
    import urllib.parse

    got, answer, _ = request(proto_server.url + "/view?" + urllib.parse.urlencode(query))
    assert got == status, answer
    assert words in _error(answer)


def test_upload_then_view(proto_server):
    first, second = _png(16, 16, "red"), _png(16, 16, "blue")
    assert upload(proto_server, "pic.png", first) == (200, {"name": "pic.png", "subfolder": "", "type": "input"})
    assert upload(proto_server, "pic.png", first)[1]["name"] == "pic.png"  # the same bytes: the same file
    assert upload(proto_server, "pic.png", second)[1]["name"] == "pic (1).png"  # other bytes: ComfyUI's rename
    assert upload(proto_server, "pic.png", second, overwrite="true")[1]["name"] == "pic.png"
    assert (proto_server.root / "input" / "pic.png").read_bytes() == second
    assert upload(proto_server, "sub.png", first, subfolder="a/b", type="temp")[1] == {
        "name": "sub.png", "subfolder": "a/b", "type": "temp"
    }  # fmt: skip
    status, data, headers = request(proto_server.url + "/api/view?filename=sub.png&subfolder=a/b&type=temp")
    assert status == 200 and data == first and headers["Content-Type"] == "image/png"
    status, data, headers = request(proto_server.url + "/view?filename=pic.png&type=input&preview=webp;50")
    assert status == 200 and headers["Content-Type"] == "image/webp" and Image.open(io.BytesIO(data)).size == (16, 16)
    status, data, _ = request(proto_server.url + "/view?filename=pic.png%20[input]&channel=a")
    assert status == 200 and Image.open(io.BytesIO(data)).mode == "RGBA"
    assert not list((proto_server.root / "input").glob(".upload-*"))  # no temporary file left behind


@pytest.mark.parametrize(
    "filename, data, fields, kind, words",
    [
        ("../evil.png", None, {}, "invalid_upload", "plain name"),
        ("evil.png", None, {"subfolder": "../.."}, "invalid_upload", "'..'"),
        ("evil.png", None, {"subfolder": "/tmp"}, "invalid_upload", "absolute"),
        ("evil.png", None, {"subfolder": "out"}, "invalid_upload", "outside"),
        ("evil.png", None, {"type": "models"}, "invalid_upload", "type must be one of"),
        ("notes.txt", None, {}, "invalid_upload", "image suffix"),
        ("fake.png", b"hello, not an image", {}, "invalid_upload", "not an image"),
        ("huge.png", _huge_png_header(100_000, 100_000), {}, "invalid_upload", "pixels"),
        (None, None, {"subfolder": "x"}, "invalid_upload", "no file field 'image'"),
        ("evil.png", None, {"color": "red"}, "invalid_upload", "unknown form field"),
        ("evil.png", None, {"overwrite": "maybe"}, "invalid_upload", "overwrite must be"),
    ],
)
def test_upload_refuses(proto_server, filename, data, fields, kind, words):
    status, answer = upload(proto_server, filename, _png(8, 8) if data is None else data, **fields)
    assert status == 400, answer
    assert words in _error(answer, kind)
    outside = proto_server.root / "input" / "out"
    assert not (outside / "evil.png").exists()


def test_oversize_upload_and_bodies(proto_server):
    status, answer = upload(proto_server, "big.png", b"\0" * (21 * 1000 * 1000))
    assert status == 400 and "larger than 20 MB" in _error(answer, "body_too_large")
    status, answer, _ = request(
        proto_server.url + "/upload/image", "POST", raw=b"x", headers={"Content-Type": "text/plain"}
    )
    assert status == 400 and "multipart/form-data" in _error(answer, "invalid_upload")
    big = {"prompt": {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x" * (9 * 1000 * 1000)}}}}
    status, answer, _ = request(proto_server.url + "/prompt", "POST", big)
    assert status == 400 and "larger than 8 MB" in _error(answer, "body_too_large") and answer["node_errors"] == {}
    status, answer, _ = request(
        proto_server.url + "/prompt", "POST", raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "not valid JSON" in _error(answer, "invalid_json")
    for path in ("/queue", "/history", "/interrupt"):
        status, answer, _ = request(proto_server.url + path, "POST", raw=b"[1,", headers={})
        assert status == 400, (path, answer)


def _ckpt(server: Server) -> str:
    info = request(server.url + "/object_info/CheckpointLoaderSimple")[1]
    spec = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    return (spec[1]["options"] if spec[0] == "COMBO" else spec[0])[0]


def _bad_graphs(ckpt: str) -> dict[str, tuple[dict, str | None]]:
    """name -> (graph, the node its node_errors must name)."""
    cycle = default_workflow(ckpt)
    cycle["3"]["inputs"]["latent_image"] = ["3", 0]
    missing_input = default_workflow(ckpt)
    del missing_input["3"]["inputs"]["seed"]
    missing_node = default_workflow(ckpt)
    missing_node["8"]["inputs"]["samples"] = ["42", 0]
    bad_index = default_workflow(ckpt)
    bad_index["8"]["inputs"]["samples"] = ["3", 5]
    wrong_type = default_workflow(ckpt)
    wrong_type["8"]["inputs"]["samples"] = ["6", 0]  # CONDITIONING where LATENT is expected
    wrong_literal = default_workflow(ckpt, steps="many")
    bad_sampler = default_workflow(ckpt, sampler_name="no_such_sampler")
    unknown_class = default_workflow(ckpt)
    unknown_class["5"]["class_type"] = "NoSuchNode"
    too_large = default_workflow(ckpt)
    for k in range(600):
        too_large[str(100 + k)] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        }
    return {
        "cycle": (cycle, "3"),
        "missing input": (missing_input, "3"),
        "missing node": (missing_node, "8"),
        "bad output index": (bad_index, "8"),
        "wrong type": (wrong_type, "8"),
        "wrong literal": (wrong_literal, "3"),
        "bad sampler": (bad_sampler, "3"),
        "unknown class": (unknown_class, None),
        "too large": (too_large, None),
        "not a graph": ([1, 2], None),
    }


@pytest.mark.parametrize(
    "name",
    ["cycle", "missing input", "missing node", "bad output index", "wrong type", "wrong literal", "bad sampler",
     "unknown class", "too large", "not a graph"],
)  # fmt: skip
def test_bad_graphs_are_400(proto_server, name):
    graph, node = _bad_graphs(_ckpt(proto_server))[name]
    status, answer, _ = request(proto_server.url + "/prompt", "POST", {"prompt": graph})
    assert status == 400, answer
    assert set(answer) == {"error", "node_errors"}, answer
    assert {"type", "message", "details", "extra_info"} <= set(answer["error"]), answer
    if node is not None:
        assert node in answer["node_errors"], json.dumps(answer)[:2000]
        for error in answer["node_errors"][node]["errors"]:
            assert {"type", "message", "details", "extra_info"} <= set(error)
    assert request(proto_server.url + "/queue")[1]["queue_pending"] == []


def test_bad_prompt_fields(proto_server):
    graph = default_workflow(_ckpt(proto_server))
    for body, kind in [
        ({"prompt": graph, "prompt_id": "1234"}, "invalid_prompt_id"),
        ({"prompt": graph, "prompt_id": 5}, "invalid_prompt_id"),
        ({"client_id": "x"}, "no_prompt"),
        ({"prompt": graph, "client_id": 7}, "invalid_request"),
        ({"prompt": graph, "priority": 1}, "invalid_request"),
        ({"prompt": graph, "partial_execution_targets": ["3"]}, "invalid_request"),
    ]:
        status, answer, _ = request(proto_server.url + "/prompt", "POST", body)
        assert status == 400 and answer["node_errors"] == {}, answer
        _error(answer, kind)
