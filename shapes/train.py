"""Train the ``shapes`` model from scratch on the CPU: VAE first, then text encoder + UNet on cached latents.

    python -m sdtrt.shapes.train --out runtime/models/data      # the shipped weights (about 45 min, 2 cores)

Everything is drawn from ``--seed``: the images, the initial weights, the crops, the noise and the timesteps.
The same command on the same torch version and thread count gives the same weights. The result is one
safetensors file (fp16, prefixed ``text_encoder.``, ``unet.``, ``vae.``) and a JSON record of the configs, the
settings, the time taken and the file's sha256; ``sdtrt.shapes.evaluate`` adds the measured quality to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdtrt.runtime.files import sha256_file
from sdtrt.runtime.models.presets import SHAPES_RECORD_NAME, SHAPES_WEIGHTS_NAME

from . import data
from .model import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, build_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of one training run; recorded next to the weights."""

    seed: int = 0
    threads: int = 2
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    latents: int = 16000
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    train_text_encoder: bool = True

    def __post_init__(self) -> None:
        for name in ("threads", "vae_steps", "vae_batch", "latents", "unet_steps", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 8 <= self.vae_crop <= data.IMAGE_SIZE or self.vae_crop % 8:
            raise ValueError(f"vae_crop must be a multiple of 8 in [8, {data.IMAGE_SIZE}], got {self.vae_crop}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up to ``base``, then a cosine decay to a tenth of it at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: Any, settings: TrainSettings, rng: np.random.Generator) -> dict[str, float]:
    """Reconstruction (L1 + MSE) plus a small KL term, on random crops of freshly drawn images."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    crop, recent = settings.vae_crop, []
    start = time.perf_counter()
    for step in range(settings.vae_steps):
        images, _ = data.batch(int(rng.integers(2**31)), settings.vae_batch)
        y, x = (int(v) for v in rng.integers(0, data.IMAGE_SIZE - crop + 1, size=2))
        pixels = to_pixels(images[:, y : y + crop, x : x + crop])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        loss = rec + settings.vae_kl_weight * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, settings.vae_steps, settings.vae_lr, settings.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent = (recent + [float(rec.detach())])[-100:]
        if (step + 1) % 100 == 0:
            log.info(
                "vae step %d/%d  recon %.4f  %.0f s",
                step + 1,
                settings.vae_steps,
                np.mean(recent),
                time.perf_counter() - start,
            )
    vae.eval()
    return {"vae_recon_loss": float(np.mean(recent)), "vae_seconds": time.perf_counter() - start}


@torch.no_grad()
def encode_dataset(vae: Any, settings: TrainSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(mean, std, captions) of the posterior of ``settings.latents`` training images."""
    means, stds, captions = [], [], []
    drawn = list(data.scenes(seed, settings.latents))
    for first in range(0, len(drawn), 64):
        chunk = drawn[first : first + 64]
        pixels = to_pixels(np.stack([data.to_array(data.draw(s)) for s in chunk]))
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += [s.caption for s in chunk]
    return torch.cat(means), torch.cat(stds), captions


def alphas_cumprod() -> torch.Tensor:
    """The training schedule's cumulative alphas (float32, as the shipped weights were trained with)."""
    # float32 betas, as diffusers' training schedulers compute them; the shipped weights were trained with exactly
    # these values, so keep this rather than the runtime's float64 SchedulerConfig.betas (differs in the last bits).
    cfg = SCHEDULER_CONFIG
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    return torch.cumprod(1.0 - betas.double(), 0).float()


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def train_unet(
    unet: Any,
    text_encoder: Any,
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    settings: TrainSettings,
    rng: np.random.Generator,
) -> tuple[Any, Any, dict[str, float]]:
    """Epsilon prediction with min-SNR weighting and caption dropout (for classifier-free guidance).

    Returns EMA copies of the UNet and text encoder, which sample better than the live weights.
    """
    mean, std = latents
    ac = alphas_cumprod()
    text_encoder.requires_grad_(settings.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if settings.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=settings.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(settings.unet_steps):
        idx = torch.from_numpy(rng.integers(0, mean.shape[0], size=settings.unet_batch))
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        tokens = ids[idx].clone()
        drop = torch.from_numpy(rng.random(settings.unet_batch) < settings.caption_dropout)
        tokens[drop] = empty_ids
        t = torch.randint(0, ac.shape[0], (settings.unet_batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        hidden = text_encoder(tokens.long(), return_dict=False)[0]
        pred = unet(noisy, t, hidden, return_dict=False)[0]
        snr = ac[t] / (1 - ac[t])
        weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, settings.unet_steps, settings.unet_lr, settings.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        recent = (recent + [float(loss.detach())])[-100:]
        if (step + 1) % 100 == 0:
            log.info(
                "unet step %d/%d  loss %.4f  %.0f s",
                step + 1,
                settings.unet_steps,
                np.mean(recent),
                time.perf_counter() - start,
            )
    return ema_unet, ema_text, {"unet_loss": float(np.mean(recent)), "unet_seconds": time.perf_counter() - start}


def caption_token_ids(tokenizer: Any) -> set[int]:
    """Every token id any caption of any combination (held-out ones included) can use, plus the specials."""
    words = (
        set(data.SHAPES)
        | set(data.COLOURS)
        | {w.strip() for w in data.SIZE_WORDS.values() if w}
        | {"a", "on", "background"}
    )
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    for word in words:
        ids.update(int(i) for i in tokenizer.encode([word])[0].tolist())
    return ids


def save(folder: Path, modules: dict[str, Any], keep_ids: set[int], record: dict[str, Any]) -> dict[str, Any]:
    """Write the fp16 weights and the record, each to a temporary name first; returns the record as written."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous()
    # Rows of tokens no caption uses never got a gradient; zeros make that explicit (and compress well).
    table = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("token_embedding.weight"))
    mask = torch.zeros(tensors[table].shape[0], dtype=torch.bool)
    mask[sorted(keep_ids)] = True
    tensors[table][~mask] = 0
    folder.mkdir(parents=True, exist_ok=True)
    weights, tmp = folder / SHAPES_WEIGHTS_NAME, folder / (SHAPES_WEIGHTS_NAME + ".tmp")
    # One metadata entry: safetensors writes its metadata map in no fixed order, so two keys would make the bytes
    # (and the sha256 a reproducible run must repeat) differ from run to run.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    record = {**record, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    record_tmp = folder / (SHAPES_RECORD_NAME + ".tmp")
    record_tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, weights)
    os.replace(record_tmp, folder / SHAPES_RECORD_NAME)
    return record


def train(folder: Path, settings: TrainSettings) -> dict[str, Any]:
    """The whole run: VAE, latent cache, scaling factor, text encoder + UNet, save. Returns the record."""
    from sdtrt.runtime.models.tokenizer import clip_tokenizer
    from sdtrt.runtime.prompts import PromptTokenizer

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    began = time.perf_counter()
    text_encoder, unet, vae = build_modules(TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG)
    stats = train_vae(vae, settings, rng)

    t0 = time.perf_counter()
    mean, std, captions = encode_dataset(vae, settings, seed=settings.seed + 1)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(settings.seed))
    scaling = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling)
    stats["encode_seconds"] = time.perf_counter() - t0
    log.info("encoded %d latents in %.0f s; scaling factor %.5f", len(captions), stats["encode_seconds"], scaling)

    tokenizer = PromptTokenizer(clip_tokenizer())
    ids = tokenizer.encode(captions)
    empty = tokenizer.encode([""])[0]
    ema_unet, ema_text, unet_stats = train_unet(
        unet, text_encoder, (mean * scaling, std * scaling), ids, empty, settings, rng
    )
    stats.update(unet_stats)
    stats["total_seconds"] = time.perf_counter() - began
    vae_config = {**VAE_CONFIG, "scaling_factor": scaling}
    record = {
        "model": "shapes",
        "text_encoder": TEXT_CONFIG,
        "unet": UNET_CONFIG,
        "vae": vae_config,
        "scheduler": SCHEDULER_CONFIG,
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("text_encoder", ema_text), ("unet", ema_unet), ("vae", vae))
        },
        "training": {
            "settings": asdict(settings),
            "data": {
                "image_size": data.IMAGE_SIZE,
                "shapes": list(data.SHAPES),
                "colours": data.PALETTE,
                "held_out": sorted(list(c) for c in data.HELD_OUT),
                "latent_seed": settings.seed + 1,
            },
            "stats": stats,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "command": "python -m sdtrt.shapes.train --out runtime/models/data",
        },
    }
    return save(folder, {"text_encoder": ema_text, "unet": ema_unet, "vae": vae}, caption_token_ids(tokenizer), record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtrt.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for shapes.safetensors and shapes.json")
    defaults = TrainSettings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        settings = TrainSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    except ValueError as exc:
        parser.error(str(exc))
    record = train(args.out, settings)
    print(json.dumps(record["training"]["stats"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
