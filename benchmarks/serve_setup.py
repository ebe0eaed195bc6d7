"""What the serving benchmarks share: ``sdtrt serve`` started and stopped as a real process, plain HTTP calls, a
process's RSS, and models built for them (seeded random weights, saved as diffusers folders, exported with
``sdtrt export``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1024 * 1024
MODEL_NAMES = ("mid-a", "mid-b")
MODEL_SEEDS = (1, 2)
# Between tiny and SD 1.5: three UNet levels of 128..512 channels with cross-attention, a 4-layer CLIP of width
# 256 (its 49408-token embedding alone is 50 MB), tiny's VAE. ~63 M parameters (254 MB of fp32 ONNX): plainly
# visible in RSS, and each exports in under half a minute on two cores.
MID_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 256,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MID_TEXT_CHANGES: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "projection_dim": 256,
}


@dataclass
class Server:
    """A ``sdtrt serve`` process a benchmark started: its URL, and its stderr lines as they come."""

    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.lines)


def txt2img(url: str, payload: dict[str, Any]) -> tuple[int, float]:
    """POST ``payload`` to ``url``'s txt2img; (HTTP status, seconds)."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def sdtrt_command() -> list[str]:
    """The ``sdtrt`` CLI of this Python environment."""
    return [shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"]


def start_server(artifacts: str, queue: int, extra: tuple[str, ...] = (), wait_s: float = 120) -> Server:
    """``sdtrt serve ARTIFACTS --queue QUEUE EXTRA...`` on a free loopback port, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [*sdtrt_command(), "serve", artifacts, "--port", str(port), "--queue", str(queue), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    server = Server(proc, url)
    # Read stderr as it comes (a full pipe would stall the server's per-request log lines).
    server.reader = threading.Thread(target=lambda: server.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    server.reader.start()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return server
        except OSError:
            if proc.poll() is not None:
                server.reader.join(timeout=10)
                raise SystemExit(f"sdtrt serve exited with {proc.returncode}:\n{server.log[-3000:]}") from None
            time.sleep(0.5)
    stop_server(server)
    raise SystemExit(f"sdtrt serve did not become healthy within {wait_s:.0f} s:\n{server.log[-3000:]}")


def stop_server(server: Server) -> int:
    """SIGTERM, then wait for the drain; the exit code."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=180)
    if server.reader is not None:
        server.reader.join(timeout=10)
    return code


def vm_rss(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if found is None:
        raise SystemExit(f"/proc/{pid}/status has no VmRSS line: is {pid} a live process on Linux?")
    return int(found.group(1)) * 1024


def call(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) ``url + path`` and return the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def save_diffusers_folder(folder: Path, seed: int, unet_config: dict[str, Any], text_changes: dict[str, Any]) -> None:
    """A diffusers SD 1.x folder with random weights drawn from ``seed`` (tiny's VAE, sdtrt's CLIP tokenizer)."""
    import diffusers
    import torch
    import transformers

    from sdtrt.runtime.models.presets import TINY_TEXT, TINY_VAE, preset_configs
    from sdtrt.runtime.models.tokenizer import clip_tokenizer, save_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TINY_TEXT, **text_changes}))
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(**TINY_VAE)
    for name, module in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        module.save_pretrained(folder / name, safe_serialization=True)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    save_tokenizer(clip_tokenizer(), folder / "tokenizer" / "tokenizer.json")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = preset_configs("tiny")[3]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_models(
    cache: Path,
    names: tuple[str, ...] = MODEL_NAMES,
    seeds: tuple[int, ...] = MODEL_SEEDS,
    unet_config: dict[str, Any] = MID_UNET,
    text_changes: dict[str, Any] = MID_TEXT_CHANGES,
) -> Path:
    """``cache/models`` with one exported fp32 artifact per name (``sdtrt export`` of a seeded diffusers folder);
    a model whose artifact is already there is not built again."""
    models = cache / "models"
    for name, seed in zip(names, seeds, strict=True):
        out = models / name
        if (out / "manifest.json").is_file():
            continue
        source = cache / "sources" / name
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        save_diffusers_folder(source, seed, unet_config, text_changes)
        components = "text_encoder,unet,vae_decoder"
        args = ["-q", "export", str(source), "--out", str(out), "--precision", "fp32", "--components", components]
        subprocess.run([*sdtrt_command(), *args, "--no-step-cache", "--max-batch", "2"], check=True)
        shutil.rmtree(source)  # the export is what is served; the folder can be made again from the seed
        print(f"{name}: built and exported in {time.perf_counter() - start:.0f} s -> {out}")
    return models


def two_tiny(root: Path) -> tuple[Path, Path]:
    """(a folder of two tiny models ``tiny-a``/``tiny-b`` with other weights each, a LoRA folder with
    ``style.safetensors`` on their attention projections)."""
    import diffusers

    from sdtrt.benchmarks.lora_switch import attention_lora
    from sdtrt.runtime.lora.write import save_lora
    from sdtrt.runtime.models.presets import TINY_UNET

    models = build_models(root, ("tiny-a", "tiny-b"), (1, 2), TINY_UNET, {})
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)  # the shapes the LoRA must fit; its weights do not matter
    save_lora(attention_lora(unet, 3), root / "loras" / "style.safetensors", "diffusers")
    return models, root / "loras"
