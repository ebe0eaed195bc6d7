"""Train the ``shapes`` outline ControlNet on the CPU, over the frozen shipped ``shapes`` model.

    python -m sdtrt.shapes.train_control --out runtime/models/data    # the shipped weights (about 8 min, 2 cores)

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` of the trained shapes UNet (its encoder copied,
its zero convolutions at zero, as real ControlNet training starts); the UNet, VAE and text encoder stay frozen.
The loss is the UNet's noise-prediction error on VAE latents of the drawn images, with the ControlNet's residuals
added; the hints are the shapes' outlines (``control_data``). Everything is drawn from ``--seed`` and the thread
count is fixed, so the same command on the same torch version gives the same weights. The result is a diffusers
ControlNet folder in fp16 (``shapes-outline/``) and a JSON record of the configs, the data seed, the settings, the
time taken and the weights' sha256; ``sdtrt.shapes.evaluate_control --record`` adds the measured quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.models.presets import CONTROLNET_WEIGHTS_NAME, DATA_DIR, SHIPPED_CONTROLNETS

from . import control_data, data
from .train import alphas_cumprod, learning_rate, to_pixels

log = logging.getLogger(__name__)

NAME = "shapes-outline"
COMMAND = "python -m sdtrt.shapes.train_control --out runtime/models/data"


@dataclass(frozen=True)
class ControlTrainSettings:
    """Every knob of one ControlNet training run; recorded next to the weights."""

    seed: int = 0
    threads: int = 2
    examples: int = 4000
    steps: int = 800
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    high_noise_share: float = 0.5  # this share of the timesteps is drawn from t >= HIGH_NOISE, where layout forms
    min_snr_gamma: float = 5.0
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        for name in ("threads", "examples", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.high_noise_share <= 1:
            raise ValueError(f"high_noise_share must be in [0, 1], got {self.high_noise_share}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


HIGH_NOISE = 600


@dataclass(frozen=True)
class ControlTrainingSet:
    """The cached training set: latent posteriors (scaled), one-channel hints, and each example's text state."""

    mean: torch.Tensor
    std: torch.Tensor
    hints: torch.Tensor  # uint8 [N, 128, 128]
    text: torch.Tensor  # [N_captions, 77, D]
    caption_index: torch.Tensor  # [N] -> row of ``text``


@torch.no_grad()
def prepare(bundle: Any, settings: ControlTrainSettings) -> ControlTrainingSet:
    """Draw the training examples from ``settings.seed + 1`` and encode their images and captions once."""
    from sdtrt.runtime.models.tokenizer import clip_tokenizer
    from sdtrt.runtime.prompts import PromptTokenizer

    images, hints, captions = control_data.training_arrays(settings.seed + 1, settings.examples)
    scaling = float(bundle.vae.config.scaling_factor)
    means, stds = [], []
    for first in range(0, len(images), 64):
        posterior = bundle.vae.encode(to_pixels(images[first : first + 64])).latent_dist
        means.append(posterior.mean * scaling)
        stds.append(posterior.std * scaling)
    unique = sorted(set(captions))
    ids = PromptTokenizer(clip_tokenizer()).encode(unique)
    text = torch.cat(
        [bundle.text_encoder(ids[i : i + 64].long(), return_dict=False)[0] for i in range(0, len(unique), 64)]
    )
    row = {caption: i for i, caption in enumerate(unique)}
    index = torch.tensor([row[c] for c in captions])
    return ControlTrainingSet(torch.cat(means), torch.cat(stds), torch.from_numpy(hints), text, index)


def _hint_batch(hints: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, 3, H, W] in [0, 1], as the pipelines give a ControlNet its hint."""
    return (hints.float() / 255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def _timesteps(rng: np.random.Generator, count: int, share: float) -> torch.Tensor:
    uniform = rng.integers(0, 1000, size=count)
    high = rng.integers(HIGH_NOISE, 1000, size=count)
    return torch.from_numpy(np.where(rng.random(count) < share, high, uniform))


def train_controlnet(
    controlnet: Any, unet: Any, cached: ControlTrainingSet, settings: ControlTrainSettings, rng: np.random.Generator
) -> dict[str, float]:
    """Noise prediction through the frozen UNet with the ControlNet's residuals, min-SNR weighted."""
    ac = alphas_cumprod()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    controlnet.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        idx = torch.from_numpy(rng.integers(0, cached.mean.shape[0], size=settings.batch))
        z = cached.mean[idx] + cached.std[idx] * torch.randn(cached.mean[idx].shape, generator=gen)
        t = _timesteps(rng, settings.batch, settings.high_noise_share)
        noise = torch.randn(z.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        hidden = cached.text[cached.caption_index[idx]]
        down, mid = controlnet(noisy, t, hidden, _hint_batch(cached.hints[idx]), return_dict=False)
        pred = unet(noisy, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        snr = ac[t] / (1 - ac[t])
        weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, settings.steps, settings.lr, settings.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [float(loss.detach())])[-100:]
        if (step + 1) % 50 == 0:
            log.info(
                "step %d/%d  loss %.4f  %.0f s", step + 1, settings.steps, np.mean(recent), time.perf_counter() - start
            )
    controlnet.eval()
    return {"loss": float(np.mean(recent)), "train_seconds": time.perf_counter() - start}


def save(folder: Path, controlnet: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Write the fp16 ControlNet folder and its record (each file to a temporary name first); returns the record."""
    from safetensors.torch import save_file

    out = folder / SHIPPED_CONTROLNETS[NAME].name
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in controlnet.state_dict().items()}
    weights, tmp = out / CONTROLNET_WEIGHTS_NAME, out / (CONTROLNET_WEIGHTS_NAME + ".tmp")
    # One metadata entry: safetensors writes its metadata in no fixed order, and the sha256 must repeat.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"_class_name": "ControlNetModel", **{k: v for k, v in controlnet.config.items() if not k.startswith("_")}}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    record = {**record, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    record_path = folder / f"{SHIPPED_CONTROLNETS[NAME].name}.json"
    record_tmp = record_path.with_name(record_path.name + ".tmp")
    record_tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights)
    os.replace(record_tmp, record_path)
    return record


def train(folder: Path, settings: ControlTrainSettings, shapes_folder: Path = DATA_DIR) -> dict[str, Any]:
    """The whole run: load the shapes model, cache the data, train, save. Returns the record."""
    import diffusers

    from sdtrt.runtime.models.presets import load_shapes

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    began = time.perf_counter()
    bundle = load_shapes(shapes_folder)
    cached = prepare(bundle, settings)
    stats = {"prepare_seconds": time.perf_counter() - began}
    log.info("cached %d examples in %.0f s", cached.mean.shape[0], stats["prepare_seconds"])
    controlnet = diffusers.ControlNetModel.from_unet(
        bundle.unet, conditioning_embedding_out_channels=settings.hint_channels
    ).float()
    stats.update(train_controlnet(controlnet, bundle.unet, cached, settings, rng))
    stats["total_seconds"] = time.perf_counter() - began
    shapes_record = json.loads((shapes_folder / "shapes.json").read_text())
    record = {
        "model": NAME,
        "base_model": {"name": "shapes", "sha256": shapes_record["sha256"]},
        "controlnet": dict(controlnet.config),
        "parameters": sum(p.numel() for p in controlnet.parameters()),
        "training": {
            "settings": asdict(settings),
            "data": {
                "image_size": data.IMAGE_SIZE,
                "data_seed": settings.seed + 1,
                "hint": f"canny edges (thresholds {control_data.HINT_LOW}/{control_data.HINT_HIGH}) of the shape "
                "drawn white on black",
                "contradicting_captions": control_data.CONTRADICTING,
                "caption_dropout": control_data.CAPTION_DROPOUT,
                "held_out_radii": list(control_data.HELD_OUT_RADII),
                "held_out_centres": f"cells of {control_data.CELL} px with (x // {control_data.CELL} + 2 * (y // "
                f"{control_data.CELL})) % 4 == 0",
            },
            "stats": stats,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "command": COMMAND,
        },
    }
    return save(folder, controlnet, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtrt.shapes.train_control", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for shapes-outline/ and shapes-outline.json")
    defaults = ControlTrainSettings()
    for name, value in asdict(defaults).items():
        if isinstance(value, tuple):
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        settings = ControlTrainSettings(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    except ValueError as exc:
        parser.error(str(exc))
    record = train(args.out, settings)
    print(json.dumps(record["training"]["stats"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
