"""The CLIP BPE tokenizer, built offline with the ``tokenizers`` library.

``clip_tokenizer()`` builds the standard CLIP ViT-L/14 tokenizer (SD 1.x) from the vocabulary shipped in
``sdtrt/runtime/models/data`` (MIT, from open_clip). ``tokenizer_from_folder()`` reads the ``tokenizer/`` folder of
a diffusers model. Both return a ``tokenizers.Tokenizer`` that pads and truncates to 77 tokens and adds
``<|startoftext|>`` / ``<|endoftext|>``; ``save_tokenizer()`` writes it into an artifact as
``tokenizer.json``.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.files import write_text_atomic

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
END_OF_WORD = "</w>"
VOCAB_GZ = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file: 256 byte tokens + 2 specials fill 49152 + 256.
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408

# CLIP's word splitter: the special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace. Whitespace between matches is dropped.
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"

Merge = tuple[str, str]


def byte_alphabet() -> list[str]:
    """The 256 printable characters that stand for bytes 0..255, in GPT-2/CLIP vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes are mapped, in byte order,
    onto the characters from U+0100 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    remapped = [byte for byte in range(256) if byte not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(remapped))]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[Merge]]:
    """Vocabulary (49408 entries) and merges of CLIP ViT-L/14, read from the shipped open_clip file."""
    source = resources.files("sdtrt.runtime.models").joinpath("data", VOCAB_GZ)
    try:
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"the CLIP vocabulary {VOCAB_GZ} shipped with sdtrt could not be read ({exc}); "
            "reinstall sdtrt to restore sdtrt/runtime/models/data"
        ) from exc
    # Line 0 is a header; the merges follow, one "left right" pair per line.
    merges = [_parse_merge(line, VOCAB_GZ, number) for number, line in enumerate(lines[1 : CLIP_MERGES + 1], 2)]
    if len(merges) != CLIP_MERGES:
        raise SourceError(
            f"the CLIP vocabulary {VOCAB_GZ} shipped with sdtrt has {len(merges)} merges, expected "
            f"{CLIP_MERGES}; reinstall sdtrt to restore sdtrt/runtime/models/data"
        )
    alphabet = byte_alphabet()
    tokens = alphabet + [char + END_OF_WORD for char in alphabet] + [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> Tokenizer:
    """The standard CLIP ViT-L/14 tokenizer, padded and truncated to 77 with ``pad_token``.

    SD 1.x and SDXL's first tokenizer pad with ``<|endoftext|>``; SD 2.x and SDXL's second (OpenCLIP) with ``!``.
    """
    vocab, merges = clip_vocab_and_merges()
    return build_clip_tokenizer(vocab, merges, pad_token)


def build_clip_tokenizer(vocab: dict[str, int], merges: list[Merge], pad_token: str = EOS_TOKEN) -> Tokenizer:
    """A CLIP tokenizer from a byte-level BPE vocabulary and merges (the pipeline of HF's CLIP tokenizer).

    NFC, whitespace runs to one space, strip, lowercase; CLIP's word split; byte-level BPE with ``</w>`` at
    word ends; ``<|startoftext|>`` ... ``<|endoftext|>`` around the ids; padding/truncation to 77.
    """
    for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
        if token not in vocab:
            raise SourceError(
                f"the CLIP vocabulary has no token {token!r} (it has {len(vocab)} entries); expected a CLIP "
                "tokenizer's vocab.json, holding <|startoftext|>, <|endoftext|> and the pad token"
            )
    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            unk_token=EOS_TOKEN,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
        )
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise SourceError(
            f"the BPE vocabulary and merges do not fit together ({exc}); expected vocab.json and "
            "merges.txt from the same tokenizer; copy the model's tokenizer/ folder again"
        ) from exc
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # ByteLevel joins all tokens into one string; each "</w>" then becomes a space and the last one is cut.
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " "), decoders.Strip(" ", 0, 1)]
    )
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    bos, eos = (BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[bos, eos],
    )
    _fix_length(tokenizer, pad_token)
    return tokenizer


def tokenizer_from_folder(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a diffusers model: ``path`` is the model folder or its ``tokenizer/`` subfolder.

    Uses ``tokenizer.json`` when present, else builds from ``vocab.json`` + ``merges.txt``. The pad token
    comes from ``tokenizer_config.json`` when it names one (SD 2.x pads with ``!``), else ``<|endoftext|>``.
    """
    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise SourceError(
            f"expected a tokenizer folder at {folder}, found nothing there; pass a diffusers model folder "
            "(with a tokenizer/ subfolder) or the tokenizer folder itself"
        )
    pad_token = _pad_token(folder)
    if (folder / "tokenizer.json").is_file():
        return _load_tokenizer_json(folder / "tokenizer.json", pad_token)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    if missing:
        raise SourceError(
            f"the tokenizer folder {folder} has no tokenizer.json and lacks {' and '.join(missing)}; "
            "expected tokenizer.json, or vocab.json and merges.txt; "
            "copy the model's complete tokenizer/ folder"
        )
    return build_clip_tokenizer(_read_vocab(vocab_path), _read_merges(merges_path), pad_token)


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Write ``tokenizer`` as ``tokenizer.json`` at ``path``, atomically."""
    write_text_atomic(path, tokenizer.to_str())


def _fix_length(tokenizer: Tokenizer, pad_token: str) -> None:
    """Pad and truncate every encoding to CLIP's 77 positions."""
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise SourceError(
            f"the pad token {pad_token!r} is not in the tokenizer's vocabulary; "
            "fix pad_token in tokenizer_config.json or remove it to pad with <|endoftext|>"
        )
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=MAX_LENGTH)


def _load_tokenizer_json(path: Path, pad_token: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or unknown fields
        raise SourceError(
            f"{path} is not a valid tokenizer.json ({exc}); expected the file written by the "
            "tokenizers library; delete it to build from vocab.json and merges.txt, or copy it again"
        ) from exc
    for token in (BOS_TOKEN, EOS_TOKEN):
        if tokenizer.token_to_id(token) is None:
            raise SourceError(f"{path} has no token {token!r}; expected a CLIP tokenizer")
    if tokenizer.padding is None or tokenizer.truncation is None:
        _fix_length(tokenizer, pad_token)
    return tokenizer


def _pad_token(folder: Path) -> str:
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return EOS_TOKEN
    config = _read_json(config_path)
    pad: Any = config.get("pad_token") if isinstance(config, dict) else None
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad if isinstance(pad, str) and pad else EOS_TOKEN


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); copy the model's tokenizer/ folder again") from exc


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    valid = isinstance(vocab, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    )
    if not valid or not vocab:
        raise SourceError(
            f"{path} must hold a JSON object mapping each token to its integer id, found "
            f"{type(vocab).__name__}; copy the model's vocab.json again"
        )
    return vocab


def _read_merges(path: Path) -> list[Merge]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} could not be read as UTF-8 text ({exc}); copy it again") from exc
    first = 1 if lines and lines[0].startswith("#version") else 0
    numbered = enumerate(lines[first:], first + 1)
    return [_parse_merge(line, path.name, number) for number, line in numbered if line.strip()]


def _parse_merge(line: str, source: str, number: int) -> Merge:
    parts = line.split()
    if len(parts) != 2:
        raise SourceError(
            f"line {number} of {source} is {line!r}; expected two tokens separated by a space "
            "(a BPE merge); the file is damaged, copy it again"
        )
    return parts[0], parts[1]
