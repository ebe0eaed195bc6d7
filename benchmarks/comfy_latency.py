"""The cost of ComfyUI's protocol: the default workflow through ``sdtrt serve``'s ComfyUI route, against the same
work through the A1111 route and in-process, interleaved.

    python -m sdtrt.benchmarks.comfy_latency ARTIFACTS --rounds 8 --steps 20 --size 128 \
        --json benchmarks/results/comfy_latency.json

Starts ``sdtrt serve ARTIFACTS`` (a real process on a free loopback port) and opens the same artifact in this
process. Each round runs, in turn:

- ``comfy``: POST /prompt with ComfyUI's default workflow (CheckpointLoaderSimple, two CLIPTextEncode,
  EmptyLatentImage, KSampler euler/normal, VAEDecode, SaveImage) over a websocket client, waits for the final
  ``executing`` with ``node: null``, then reads /history/{id} and downloads the PNG from /view: what a ComfyUI
  client sees, end to end.
- ``a1111``: POST /sdapi/v1/txt2img with the same prompt, size, steps, CFG and seed (sampler Euler): the A1111
  route's end to end time (base64 PNG in JSON), for scale.
- ``inproc``: the same stages in this process (``Pipeline.encode_conditioning`` twice, ``ksampler_sigmas``,
  ``sample_latents``, ``decode_images``, PNG encoding): what ``sdtrt generate --sigma-schedule normal`` runs once
  its model is open, without process start-up or model loading.

Every round uses a new seed and a new prompt, so ComfyUI's cache re-runs every node but the checkpoint loader
(whose pipeline stays open, as the A1111 route's does). ``comfy - inproc`` is the protocol's overhead: HTTP,
validation, the queue, websocket messages, writing the PNG and /view. Timings are only compared within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from sdtrt.benchmarks.records import write_record
from sdtrt.benchmarks.serve_setup import Server, call, start_server, stop_server, txt2img

NEGATIVE = "blurry"


def default_workflow(
    ckpt: str,
    prompt: str,
    negative: str = NEGATIVE,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 7.0,
    width: int = 512,
    height: int = 512,
    sampler: str = "euler",
    scheduler: str = "normal",
    prefix: str = "ComfyUI",
) -> dict[str, Any]:
    """ComfyUI's default workflow in API format, with its node ids (4 loader, 6/7 prompts, 5 latent, 3 sampler,
    8 decode, 9 save)."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def run_comfy(server: Server, graph: dict[str, Any]) -> tuple[float, bytes]:
    """POST ``graph`` as a websocket client, wait for its end, fetch its first image; (seconds, PNG bytes)."""
    from websockets.sync.client import connect

    client = uuid.uuid4().hex
    host = server.url.removeprefix("http://")
    with connect(f"ws://{host}/ws?clientId={client}", open_timeout=30, max_size=None) as ws:
        start = time.perf_counter()
        answer = call(server.url, "/prompt", {"prompt": graph, "client_id": client})
        prompt_id = answer["prompt_id"]
        while True:
            message = ws.recv(timeout=600)
            if isinstance(message, bytes):
                continue  # a preview frame
            event = json.loads(message)
            data = event.get("data", {})
            if event["type"] == "execution_error" and data.get("prompt_id") == prompt_id:
                raise SystemExit(f"the workflow failed: {data.get('exception_message')}")
            if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    outputs = call(server.url, f"/history/{prompt_id}")[prompt_id]["outputs"]
    image = next(item for output in outputs.values() for item in output.get("images", []))
    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
        png = r.read()
    return time.perf_counter() - start, png


def run_inproc(pipe: Any, prompt: str, seed: int, steps: int, cfg: float, size: int) -> float:
    """The default workflow's stages in this process, PNG encoding included; seconds."""
    import numpy as np
    import torch
    from PIL import Image

    start = time.perf_counter()
    positive, negative = pipe.encode_conditioning(prompt), pipe.encode_conditioning(NEGATIVE)
    channels = int(pipe.manifest.model.latent_channels)
    latents = torch.zeros((1, channels, size // 8, size // 8))
    sigmas = pipe.ksampler_sigmas("normal", steps, 1.0)
    samples = pipe.sample_latents(latents, positive, negative, sampler="euler", sigmas=sigmas, cfg=cfg, seed=seed)
    image = pipe.decode_images(samples)[0]
    pixels = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(io.BytesIO(), format="PNG", compress_level=4)  # SaveImage's compression
    return time.perf_counter() - start


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and min seconds per route, and the median of the per-round differences to ``inproc``."""
    summary: dict[str, dict[str, float]] = {}
    for route in ("comfy", "a1111", "inproc"):
        values = [row[route] for row in rows]
        summary[route] = {"median_s": statistics.median(values), "min_s": min(values)}
    for route in ("comfy", "a1111"):
        summary[route]["median_overhead_s"] = statistics.median(row[route] - row["inproc"] for row in rows)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", help="an artifact (or engine) folder")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not recorded")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--size", type=int, default=128, help="width = height, a multiple of 8")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size % 8:
        raise SystemExit("--rounds must be >= 1 and --size a multiple of 8")

    from sdtrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(args.artifacts)
    with tempfile.TemporaryDirectory() as comfy_dir:
        server = start_server(args.artifacts, queue=4, extra=("--comfy-dir", comfy_dir))
        try:
            ckpt = call(server.url, "/sdapi/v1/sd-models")[0]["model_name"]
            rows = run_rounds(server, pipe, ckpt, args)
        finally:
            stop_server(server)
    summary = summarize(rows)
    for route, figures in summary.items():
        print(f"{route:<7} " + "  ".join(f"{key} {value:.3f}" for key, value in figures.items()))
    if args.json is not None:
        settings = {key: getattr(args, key) for key in ("artifacts", "rounds", "warmup", "steps", "cfg", "size")}
        write_record(args.json, "comfy_latency", settings, rows, summary)


def run_rounds(server: Server, pipe: Any, ckpt: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.warmup`` + ``args.rounds`` rounds of comfy, a1111, inproc in turn; the recorded rows."""
    rows: list[dict[str, Any]] = []
    print("round  comfy s  a1111 s  inproc s", flush=True)
    for r in range(args.warmup + args.rounds):
        prompt, seed = f"a red circle on a blue background, take {r}", 1000 + r
        graph = default_workflow(
            ckpt, prompt, seed=seed, steps=args.steps, cfg=args.cfg, width=args.size, height=args.size
        )
        comfy_s, _ = run_comfy(server, graph)
        payload = {
            "prompt": prompt,
            "negative_prompt": NEGATIVE,
            "steps": args.steps,
            "cfg_scale": args.cfg,
            "seed": seed,
            "width": args.size,
            "height": args.size,
            "sampler_name": "Euler",
        }
        status, a1111_s = txt2img(server.url, payload)
        if status != 200:
            raise SystemExit(f"txt2img answered {status}:\n{server.log[-2000:]}")
        inproc_s = run_inproc(pipe, prompt, seed, args.steps, args.cfg, args.size)
        print(f"{r:>5} {comfy_s:>8.3f} {a1111_s:>8.3f} {inproc_s:>9.3f}", flush=True)
        if r >= args.warmup:
            rows.append({"round": r, "comfy": comfy_s, "a1111": a1111_s, "inproc": inproc_s})
    return rows


if __name__ == "__main__":
    main()
