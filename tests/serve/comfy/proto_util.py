"""Helpers of the ComfyUI protocol tests: ComfyUI's workflows in API format, a raw websocket recorder, HTTP calls."""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

# ComfyUI's default workflow in API format (its "Save (API)" export), sized for the tiny test model
DEFAULT_WORKFLOW: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 3,
            "cfg": 8.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "MODEL"},
        "_meta": {"title": "Load Checkpoint"},
    },
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
        "_meta": {"title": "Empty Latent Image"},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
            "clip": ["4", 1],
        },
        "_meta": {"title": "CLIP Text Encode (Positive)"},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "text, watermark", "clip": ["4", 1]},
        "_meta": {"title": "CLIP Text Encode (Negative)"},
    },
    "8": {
        "class_type": "VAEDecode",
        "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
        "_meta": {"title": "VAE Decode"},
    },
    "9": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        "_meta": {"title": "Save Image"},
    },
}


def default_workflow(ckpt_name: str, **sampler: Any) -> dict[str, Any]:
    """The default workflow on ``ckpt_name``, with KSampler inputs replaced by ``sampler``."""
    graph = copy.deepcopy(DEFAULT_WORKFLOW)
    graph["4"]["inputs"]["ckpt_name"] = ckpt_name
    graph["3"]["inputs"].update(sampler)
    return graph


def img2img_workflow(ckpt_name: str, image: str, denoise: float = 0.6) -> dict[str, Any]:
    """LoadImage -> VAEEncode -> KSampler (denoise) -> VAEDecode -> SaveImage."""
    graph = default_workflow(ckpt_name, denoise=denoise, latent_image=["11", 0])
    del graph["5"]
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": "Load Image"}}
    graph["11"] = {
        "class_type": "VAEEncode",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2]},
        "_meta": {"title": "VAE Encode"},
    }
    graph["9"]["inputs"]["filename_prefix"] = "img2img"
    return graph


def hires_workflow(ckpt_name: str) -> dict[str, Any]:
    """Two KSamplers: the default workflow's latents upscaled 2x (LatentUpscaleBy), then sampled at denoise 0.5."""
    graph = default_workflow(ckpt_name)
    graph["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"upscale_method": "nearest-exact", "scale_by": 2.0, "samples": ["3", 0]},
        "_meta": {"title": "Upscale Latent By"},
    }
    graph["11"] = {
        "class_type": "KSampler",
        "inputs": {**graph["3"]["inputs"], "seed": 7, "denoise": 0.5, "latent_image": ["10", 0]},
        "_meta": {"title": "KSampler (hires)"},
    }
    graph["8"]["inputs"]["samples"] = ["11", 0]
    graph["9"]["inputs"]["filename_prefix"] = "hires"
    return graph


def request(
    url: str, method: str = "GET", body: Any = None, raw: bytes | None = None, headers: dict | None = None
) -> tuple[int, Any, Any]:
    """(status, parsed JSON or raw bytes, headers) of one HTTP call; errors are answers too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, content, got = r.status, r.read(), r.headers
    except urllib.error.HTTPError as exc:
        status, content, got = exc.code, exc.read(), exc.headers
    if "json" in (got.get("Content-Type") or ""):
        return status, json.loads(content), got
    return status, content, got


def view_url(base: str, image: dict[str, str]) -> str:
    return f"{base}/view?" + urllib.parse.urlencode(
        {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
    )


class Recorder:
    """A raw websocket client of ``/ws?clientId=`` (websocket-client) that keeps every message it receives."""

    def __init__(self, base: str, client_id: str | None = None, path: str = "/ws") -> None:
        import websocket

        self.client_id = client_id or str(uuid.uuid4())
        url = base.replace("http://", "ws://") + f"{path}?clientId={self.client_id}"
        self.ws = websocket.create_connection(url, timeout=60)
        self.messages: list[Any] = []  # dicts for text messages, bytes for binary frames

    def next(self, timeout: float = 60) -> Any:
        self.ws.settimeout(timeout)
        frame = self.ws.recv()
        message = json.loads(frame) if isinstance(frame, str) else frame
        self.messages.append(message)
        return message

    def until_done(self, prompt_id: str, timeout: float = 120) -> list[Any]:
        """Receive until ``executing`` with ``node: null`` for ``prompt_id``; the messages since the last call."""
        start, deadline = len(self.messages), time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if (
                isinstance(message, dict)
                and message["type"] == "executing"
                and message["data"]["node"] is None
                and message["data"].get("prompt_id") == prompt_id
            ):
                return self.messages[start:]
        raise AssertionError(f"no end of {prompt_id} in {self.messages[start:]}")

    def until(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if isinstance(message, dict) and message["type"] == kind:
                return message
        raise AssertionError(f"no {kind} message in {self.messages}")

    def close(self) -> None:
        self.ws.close()


def queue_prompt(base: str, prompt: dict[str, Any], client_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {"prompt": prompt, **fields}
    if client_id is not None:
        body["client_id"] = client_id
    status, answer, _ = request(base + "/prompt", "POST", body)
    assert status == 200, answer
    return answer


def wait_history(base: str, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body, _ = request(f"{base}/history/{prompt_id}")
        if status == 200 and prompt_id in body:
            return body[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} never reached the history")


def types(messages: list[Any]) -> list[str]:
    return [m["type"] if isinstance(m, dict) else "<binary>" for m in messages]
