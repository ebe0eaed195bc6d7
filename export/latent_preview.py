"""The latent-to-RGB preview map of a model, fitted from its own VAE at export.

Step previews (``sdtrt generate --preview-dir``) turn latents into colours with one linear map per pixel,
without running the VAE. The fixed factors image apps use were fitted to SD's VAE; another VAE (a trained demo
model, say) lays colours out differently, and its previews come out in the wrong colours. Here the VAE encodes a
set of flat-colour block images, and a least-squares fit maps each latent pixel (as the UNet sees it: scaled by
the VAE's scaling factor) to the mean colour of the pixels it covers. The manifest records the result under the
VAE decoder's ``extra["latent_rgb"]``; the runtime uses it when present (``runtime.images.latent_rgb_map``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# 32 images of 2x2 flat-colour blocks (128 colours), 8x8 latent pixels each (64x64 pixels for an 8x VAE): cheap
# even for SD's VAE. Blocks of 4x4 latent pixels fit the shapes model's previews better than 2x2 ones (mean
# colour error 34 against 40 of 255), as most latent pixels then see one colour only.
FIT_IMAGES = 32
FIT_LATENT_SIDE = 8
BLOCK_LATENTS = 4
FIT_SEED = 0


def colour_blocks(count: int, side: int, block: int, seed: int = FIT_SEED) -> torch.Tensor:
    """``count`` RGB images [count, 3, side, side] in [-1, 1] made of flat ``block``-pixel squares of random colour."""
    generator = torch.Generator().manual_seed(seed)
    cells = side // block
    colours = torch.rand(count, 3, cells, cells, generator=generator) * 2 - 1
    return colours.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)


@torch.no_grad()
def fit_latent_rgb(vae: Any, scaling_factor: float, vae_scale_factor: int) -> list[list[float]]:
    """The [C + 1, 3] map (C rows of channel weights, then the bias row) from scaled latents to RGB in [-1, 1].

    ``vae`` is a diffusers ``AutoencoderKL``, run in its own dtype on its device (export fits before any fp16
    conversion).
    """
    side = FIT_LATENT_SIDE * vae_scale_factor
    images = colour_blocks(FIT_IMAGES, side, BLOCK_LATENTS * vae_scale_factor)
    parameter = next(vae.parameters())
    latents = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean.float().cpu()
    latents = latents * scaling_factor
    targets = torch.nn.functional.avg_pool2d(images, vae_scale_factor)  # each latent pixel's mean colour
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution
    residual = float((design @ solution - y.double()).abs().mean())
    log.debug("latent preview map fitted from the VAE: mean colour error %.3f (of 2)", residual)
    return [[round(float(v), 6) for v in row] for row in solution]
