"""The text stage: prompts -> the UNet's text vectors (and SDXL's pooled embeddings), window by window."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdtrt.runtime.clip_skip import text_feeds
from sdtrt.runtime.engine import Engine
from sdtrt.runtime.manifest import Manifest
from sdtrt.runtime.prompts import PromptTokenizer


def encode_prompts(
    engines: Mapping[str, Engine],
    tokenizers: tuple[PromptTokenizer, PromptTokenizer | None],
    manifest: Manifest,
    prompts: list[str],
    clip_skip: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text vectors [len(prompts), 77 * windows, D], and SDXL's pooled embeddings [len(prompts), P] (else None).

    Long prompts are split into 75-token windows, each encoded on its own and concatenated along the sequence
    (A1111's convention); SDXL's pooled embedding is that of a prompt's first window, as A1111 does. ``tokenizers``:
    the first text encoder's, and SDXL's second (None for other families).
    """
    tokenizer, tokenizer_2 = tokenizers
    model = manifest.model
    windows_allowed = manifest.profile.max_prompt_windows
    ids = tokenizer.encode(prompts, max_windows=windows_allowed)
    windows = ids.shape[0] // len(prompts)
    feeds = text_feeds(ids.to(device), model, clip_skip)
    hidden = engines["text_encoder"].infer(feeds)[model.text_output]
    pooled = None
    if tokenizer_2 is not None:
        ids_2 = tokenizer_2.encode(prompts, max_windows=windows_allowed, warn=False)
        out = engines["text_encoder_2"].infer({"input_ids": ids_2.to(device)})
        hidden = torch.cat([hidden, out[model.text_output].to(hidden.dtype)], dim=-1)
        pooled = out["text_embeds"].reshape(len(prompts), windows, -1)[:, 0].clone()
    return hidden.reshape(len(prompts), windows * hidden.shape[1], hidden.shape[2]).clone(), pooled


__all__ = ["encode_prompts"]
