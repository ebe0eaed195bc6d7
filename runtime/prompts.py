"""Prompts to CLIP token ids, with prompts longer than 75 tokens split into windows.

The artifact's ``tokenizer.json`` does the text work (lowercasing, whitespace cleanup, byte-level BPE). A
prompt's ids are cut into windows of 75; each window becomes one row of 77 ids:
``<|startoftext|>``, up to 75 ids, ``<|endoftext|>``, then padding. The caller runs the text encoder on every
row and concatenates each prompt's window embeddings along the sequence axis (the A1111 convention).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from sdtrt.runtime.errors import ArtifactError, SdtrtError
from sdtrt.runtime.request import check_clip_skip
from sdtrt.runtime.specs import CLIP_SKIP, ModelInfo

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ROW_LENGTH = 77
WINDOW = ROW_LENGTH - 2


class PromptTokenizer:
    """Turns prompts into int32 token-id rows of 77 for a CLIP text encoder.

    The constructor takes over ``tokenizer``: it reads its pad id, then turns off its padding and truncation.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>") -> None:
        padding = tokenizer.padding
        bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
        if bos is None or eos is None:
            raise ArtifactError(
                f"the tokenizer from {source} has no {BOS_TOKEN} or {EOS_TOKEN} token; expected a CLIP "
                "tokenizer; re-export the artifact"
            )
        self.bos_id: int = bos
        self.eos_id: int = eos
        # SD 2.x tokenizers pad with "!" (id 0); the saved padding settings say which id to use.
        self.pad_id: int = int(padding["pad_id"]) if padding is not None else eos
        # Windows are cut here, so the tokenizer itself must neither truncate nor pad nor add specials.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptTokenizer:
        """Load an artifact's ``tokenizer.json``."""
        file = Path(path)
        if not file.is_file():
            raise ArtifactError(f"expected the tokenizer at {file}, found no file there; re-export the artifact")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or unknown fields
            raise ArtifactError(
                f"{file} is not a valid tokenizer.json ({exc}); the file is corrupt, re-export the artifact"
            ) from exc
        return cls(tokenizer, source=str(file))

    def count_tokens(self, prompt: str) -> int:
        """Number of token ids in ``prompt``, without ``<|startoftext|>`` / ``<|endoftext|>``."""
        return len(self._ids([prompt])[0])

    def windows_needed(self, prompt: str) -> int:
        """How many 75-token windows ``prompt`` fills (at least one)."""
        return max(1, math.ceil(self.count_tokens(prompt) / WINDOW))

    def encode(self, prompts: list[str], max_windows: int = 1, warn: bool = True) -> torch.Tensor:
        """Token ids, int32 of shape ``[len(prompts) * w, 77]``, prompt-major (prompt 0's windows first).

        ``w`` is the largest number of windows any prompt needs, capped at ``max_windows``; shorter prompts
        get empty windows (``<|startoftext|>``, ``<|endoftext|>``, padding). Ids past ``max_windows`` windows
        are dropped with a warning (unless ``warn`` is false: SDXL's second tokenizer cuts the same ids).
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise SdtrtError(
                f"expected a non-empty list of prompt strings, found {prompts!r}; pass e.g. ['a photo of a cat']"
            )
        if max_windows < 1:
            raise SdtrtError(f"max_windows must be at least 1, found {max_windows}")
        ids = self._ids(prompts)
        windows = min(max_windows, max(max(1, math.ceil(len(row) / WINDOW)) for row in ids))
        rows = np.full((len(prompts), windows, ROW_LENGTH), self.pad_id, dtype=np.int32)
        for index, row in enumerate(ids):
            kept = row[: windows * WINDOW]
            if len(kept) < len(row) and warn:
                logger.warning(
                    "prompt %d has %d tokens but this artifact takes %d window(s) of %d tokens: dropped the last "
                    "%d tokens. To keep them, re-export with --max-prompt-windows %d (and rebuild engines)",
                    index,
                    len(row),
                    windows,
                    WINDOW,
                    len(row) - len(kept),
                    math.ceil(len(row) / WINDOW),
                )
            for window in range(windows):
                chunk = kept[window * WINDOW : (window + 1) * WINDOW]
                rows[index, window, 0] = self.bos_id
                rows[index, window, 1 : 1 + len(chunk)] = chunk
                rows[index, window, 1 + len(chunk)] = self.eos_id
        return torch.from_numpy(rows.reshape(len(prompts) * windows, ROW_LENGTH))

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]


def text_feeds(ids: torch.Tensor, model: ModelInfo, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """The first text encoder's feeds: token ``ids`` and, when it takes one (``model.clip_skip_ready``), the
    ``clip_skip`` input on ``ids``' device; ``ConfigError`` for a clip skip the model cannot run."""
    check_clip_skip(model, clip_skip)
    if not model.clip_skip_ready:
        return {"input_ids": ids}
    return {"input_ids": ids, CLIP_SKIP: torch.tensor([clip_skip], dtype=torch.int32, device=ids.device)}
