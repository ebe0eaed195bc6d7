"""The offline CLIP tokenizer: vocabulary, ids against transformers, folders, saving, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from sdtrt.runtime.errors import SourceError
from sdtrt.runtime.models.tokenizer import (
    build_clip_tokenizer,
    clip_tokenizer,
    clip_vocab_and_merges,
    save_tokenizer,
    tokenizer_from_folder,
)

BOS, EOS = 49406, 49407
CAT_IDS = [BOS, 320, 1125, 539, 320, 2368, EOS]
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

TRICKY_PROMPTS = [
    "a photo of a cat",
    "A  Photo\tof  a CAT!!",
    "1girl, don't",
    "café ☕ 😀 naïve",
    "<|endoftext|> hi <|ENDOFTEXT|>",
    "a<|startoftext|>b",
    "x\u0301y",
    "e\u0301cole",
    "  leading and trailing  ",
    "",
    "it's they're we've I'm you'll he'd",
    "ÉCOLE Straße İstanbul",
    "2024-01-01 3.14159",
    "(masterpiece:1.2), best quality, [[blue]] {red}",
    "日本語のテキスト",
    "tab\tnew\nline\r\n",
    "hello...world!!!???",
    "a_b-c/d\\e",
    "ＦＵＬＬ width ﬁne",
    "DON'T STOP, o'neill's",
    " ".join(f"word{i}" for i in range(60)),
]


def _reference_vocab(lines: list[str]) -> dict[str, int]:
    """CLIP's vocabulary built here from scratch, to check the module's construction."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    merged = ["".join(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return clip_tokenizer()


@pytest.fixture(scope="module")
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return clip_vocab_and_merges()


@pytest.fixture(scope="module")
def hf_reference(vocab_and_merges):
    transformers = pytest.importorskip("transformers")
    vocab, merges = vocab_and_merges
    return transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges))


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory, vocab_and_merges) -> Path:
    """A diffusers-style model folder whose tokenizer/ holds vocab.json and merges.txt."""
    vocab, merges = vocab_and_merges
    folder = tmp_path_factory.mktemp("model") / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    return folder


def test_shipped_vocabulary_is_the_open_clip_file():
    data = resources.files("sdtrt.runtime.models").joinpath("data")
    blob = data.joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == VOCAB_SHA256
    license_text = data.joinpath("LICENSE-open_clip.txt").read_text(encoding="utf-8")
    assert "bpe_simple_vocab_16e6.txt.gz" in license_text.splitlines()[0]
    assert "Permission is hereby granted, free of charge" in license_text


def test_vocabulary_matches_clip_construction(vocab_and_merges, tokenizer):
    vocab, merges = vocab_and_merges
    blob = resources.files("sdtrt.runtime.models").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    expected = _reference_vocab(gzip.decompress(blob).decode("utf-8").split("\n"))
    assert len(vocab) == 49408
    assert vocab == expected
    assert len(merges) == 48894
    assert merges[0] == ("i", "n")
    assert tokenizer.get_vocab_size() == 49408
    assert tokenizer.token_to_id("<|startoftext|>") == BOS
    assert tokenizer.token_to_id("<|endoftext|>") == EOS


def test_cat_prompt_ids_and_padding(tokenizer):
    encoding = tokenizer.encode("a photo of a cat")
    assert encoding.ids == CAT_IDS + [EOS] * 70
    assert len(encoding.ids) == 77
    assert encoding.attention_mask == [1] * 7 + [0] * 70


def test_normalizes_case_and_whitespace(tokenizer):
    assert tokenizer.encode("  A   PHOTO\tof\n a Cat ").ids[:7] == CAT_IDS


def test_truncates_to_77_keeping_end_token(tokenizer):
    ids = tokenizer.encode(" ".join(["cat"] * 100)).ids
    assert len(ids) == 77
    assert ids[0] == BOS
    assert ids[1:76] == [2368] * 75
    assert ids[76] == EOS


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_ids_agree_with_transformers(tokenizer, hf_reference, prompt):
    expected = hf_reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer.encode(prompt).ids == expected


@pytest.mark.parametrize(
    ("prompt", "text"),
    [("a photo of a cat", "a photo of a cat"), ("Café  ☕ naïve", "café ☕ naïve"), ("don't", "don 't")],
)
def test_decode_gives_back_text(tokenizer, prompt, text):
    assert tokenizer.decode(tokenizer.encode(prompt).ids) == text


def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    loaded = Tokenizer.from_file(str(path))
    for prompt in TRICKY_PROMPTS:
        assert loaded.encode(prompt).ids == tokenizer.encode(prompt).ids
    assert loaded.padding["pad_id"] == EOS
    assert loaded.padding["length"] == 77
    assert loaded.truncation["max_length"] == 77


def test_from_folder_with_vocab_and_merges(tokenizer, vocab_folder):
    for path in (vocab_folder.parent, vocab_folder):
        built = tokenizer_from_folder(path)
        for prompt in TRICKY_PROMPTS:
            assert built.encode(prompt).ids == tokenizer.encode(prompt).ids


def test_from_folder_prefers_tokenizer_json(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    (folder / "vocab.json").write_text("not json")
    assert tokenizer_from_folder(tmp_path).encode("a photo of a cat").ids == CAT_IDS + [EOS] * 70


def test_from_folder_adds_length_settings_to_plain_tokenizer_json(tokenizer, tmp_path):
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    save_tokenizer(plain, tmp_path / "tokenizer.json")
    ids = tokenizer_from_folder(tmp_path).encode("a photo of a cat").ids
    assert ids == CAT_IDS + [EOS] * 70


def test_from_folder_pads_with_configured_token(vocab_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    ids = tokenizer_from_folder(tmp_path).encode("a photo of a cat").ids
    assert ids == CAT_IDS + [0] * 70


def test_missing_folder_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="expected a tokenizer folder at .*nowhere"):
        tokenizer_from_folder(tmp_path / "nowhere")


def test_missing_merges_is_a_source_error(vocab_folder, tmp_path):
    (tmp_path / "vocab.json").write_bytes((vocab_folder / "vocab.json").read_bytes())
    with pytest.raises(SourceError, match="no tokenizer.json and lacks merges.txt.*vocab.json and merges.txt"):
        tokenizer_from_folder(tmp_path)


def test_invalid_vocab_is_a_source_error(tmp_path):
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\n")
    with pytest.raises(SourceError, match="vocab.json must hold a JSON object.*found list"):
        tokenizer_from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(SourceError, match="vocab.json is not valid JSON"):
        tokenizer_from_folder(tmp_path)


def test_malformed_merge_line_is_a_source_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"i": 0, "n": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\ni n x\n")
    with pytest.raises(SourceError, match="line 3 of merges.txt is 'i n x'; expected two tokens"):
        tokenizer_from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("i\n")
    with pytest.raises(SourceError, match="line 1 of merges.txt is 'i'; expected two tokens"):
        tokenizer_from_folder(tmp_path)


def test_merge_of_unknown_tokens_is_a_source_error(tmp_path):
    vocab = {"i": 0, "n": 1, "in": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("i n\nq z\n")
    with pytest.raises(SourceError, match="vocabulary and merges do not fit together"):
        tokenizer_from_folder(tmp_path)


def test_vocab_without_special_tokens_is_a_source_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"i": 0, "n": 1}))
    (tmp_path / "merges.txt").write_text("i n\n")
    with pytest.raises(SourceError, match="no token '<\\|startoftext\\|>'"):
        tokenizer_from_folder(tmp_path)


def test_unknown_pad_token_is_a_source_error():
    vocab = {"i": 0, "n": 1, "in": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}
    with pytest.raises(SourceError, match="no token '<pad>'"):
        build_clip_tokenizer(vocab, [("i", "n")], pad_token="<pad>")


def test_corrupt_tokenizer_json_is_a_source_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(SourceError, match="is not a valid tokenizer.json"):
        tokenizer_from_folder(tmp_path)
