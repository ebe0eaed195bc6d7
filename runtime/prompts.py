"""Prompts to CLIP token ids, with prompts longer than 75 tokens split into windows.

The artifact's ``tokenizer.json`` does the text work (lowercasing, whitespace cleanup, byte-level BPE). A
prompt's ids are cut into windows of 75; each window becomes one row of 77 ids:
``<|startoftext|>``, up to 75 ids, ``<|endoftext|>``, then padding. The caller runs the text encoder on every
row and concatenates each prompt's window embeddings along the sequence axis (the A1111 convention).

Only as much text is tokenized as the windows can hold (``bounded_ids``): a prompt is cut at a word boundary
once its start already gives more ids than the windows take, so a huge prompt costs bounded time and memory
while every prompt that fits is tokenized whole (the same ids as before).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from sdtrt.runtime.errors import ArtifactError, SdtrtError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ROW_LENGTH = 77
WINDOW = ROW_LENGTH - 2
# Where a prompt can be cut without changing the ids before the cut: just before ASCII whitespace (CLIP never
# joins across it), or between ASCII punctuation (not an apostrophe, which starts "'s") and an ASCII letter or
# digit; neither side changes under the tokenizer's normalization (NFC, lowercase, whitespace collapsing).
_CUT = re.compile(r"(?=[ \t\n\r\f\v])|(?<=[!-&(-/:-@\[-`{-~])(?=[A-Za-z0-9])")
_FIRST_CUT_CHARS = 32  # characters tried per id wanted before the first cut (CLIP averages ~4 per id)


@dataclass(frozen=True)
class BoundedIds:
    """The first ids of a prompt: ``ids`` (at most the ``limit`` asked for), ``total`` (the prompt's whole id
    count, or None when it was cut before tokenizing: more than ``limit``), ``chars`` (characters tokenized)."""

    ids: list[int]
    total: int | None
    chars: int

    @property
    def truncated(self) -> bool:
        """True when the prompt has more ids than were kept."""
        return self.total is None or self.total > len(self.ids)


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

    def bounded_ids(self, prompt: str, limit: int) -> BoundedIds:
        """The first ``limit`` ids of ``prompt``, tokenizing only as far as needed to know whether there are more.

        The text is cut at a word boundary (``_CUT``) after ``_FIRST_CUT_CHARS * limit`` characters, four times
        further each time the part before the cut still gives ``limit`` ids or fewer; a prompt that fits is
        tokenized whole. The ids before a cut equal the whole prompt's first ids.
        """
        chars = max(1024, _FIRST_CUT_CHARS * (limit + 1))
        while chars < len(prompt):
            cut = _CUT.search(prompt, chars)
            if cut is None:
                break
            ids = self._ids([prompt[: cut.start()]])[0]
            if len(ids) > limit:
                return BoundedIds(ids[:limit], None, cut.start())
            chars *= 4
        ids = self._ids([prompt])[0]
        return BoundedIds(ids[:limit], len(ids), len(prompt))

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
        bounded = [self.bounded_ids(prompt, max_windows * WINDOW) for prompt in prompts]
        windows = min(max_windows, max(max(1, math.ceil(len(b.ids) / WINDOW)) for b in bounded))
        rows = np.full((len(prompts), windows, ROW_LENGTH), self.pad_id, dtype=np.int32)
        for index, b in enumerate(bounded):
            kept = b.ids[: windows * WINDOW]
            if warn and (b.truncated or len(kept) < len(b.ids)):
                logger.warning("prompt %d %s", index, truncation_message(b, windows))
            for window in range(windows):
                chunk = kept[window * WINDOW : (window + 1) * WINDOW]
                rows[index, window, 0] = self.bos_id
                rows[index, window, 1 : 1 + len(chunk)] = chunk
                rows[index, window, 1 + len(chunk)] = self.eos_id
        return torch.from_numpy(rows.reshape(len(prompts) * windows, ROW_LENGTH))

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]


def truncation_message(bounded: BoundedIds, windows: int) -> str:
    """What was dropped of a prompt cut to ``windows`` windows, and how to keep it (for a log line or a reply)."""
    kept = windows * WINDOW
    if bounded.total is not None:
        return (
            f"has {bounded.total} tokens but this artifact takes {windows} window(s) of {WINDOW} tokens: dropped "
            f"the last {bounded.total - kept} tokens. To keep them, re-export with --max-prompt-windows "
            f"{math.ceil(bounded.total / WINDOW)} (and rebuild engines)"
        )
    return (
        f"has more than {kept} tokens (only its first {bounded.chars} characters were read) but this artifact takes "
        f"{windows} window(s) of {WINDOW} tokens: dropped every token after the first {kept}. To keep more, "
        "shorten the prompt or re-export with a larger --max-prompt-windows (and rebuild engines)"
    )
