"""PromptTokenizer: 77-id rows, 75-token windows for long prompts, truncation warning, errors."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import sdtrt.runtime.prompts as runtime_tokenizer
from sdtrt.runtime.errors import ArtifactError, SdtrtError
from sdtrt.runtime.models.tokenizer import (
    build_clip_tokenizer,
    clip_tokenizer,
    clip_vocab_and_merges,
    save_tokenizer,
)
from sdtrt.runtime.prompts import PromptTokenizer

BOS, EOS, CAT = 49406, 49407, 2368
CAT_IDS = [BOS, 320, 1125, 539, 320, 2368, EOS]
EMPTY_WINDOW = [BOS] + [EOS] * 76


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "tokenizer.json"
    save_tokenizer(clip_tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def prompts(tokenizer_json) -> PromptTokenizer:
    return PromptTokenizer.from_file(tokenizer_json)


def _cats(count: int) -> str:
    return " ".join(["cat"] * count)


def test_short_prompt_is_one_row_of_77(prompts):
    ids = prompts.encode(["a photo of a cat"])
    assert ids.dtype == torch.int32
    assert ids.tolist() == [CAT_IDS + [EOS] * 70]


def test_lowercase_and_whitespace_come_from_the_tokenizer(prompts):
    assert prompts.encode(["  A  PHOTO of\ta Cat "]).tolist() == [CAT_IDS + [EOS] * 70]


def test_batch_matches_export_tokenizer(prompts):
    reference = clip_tokenizer()
    batch = ["a photo of a cat", "", "1girl, don't", "Café ☕ 😀"]
    expected = [encoding.ids for encoding in reference.encode_batch(batch)]
    assert prompts.encode(batch).tolist() == expected


def test_count_tokens(prompts):
    assert prompts.count_tokens("a photo of a cat") == 5
    assert prompts.count_tokens("") == 0
    assert prompts.count_tokens(_cats(100)) == 100
    assert prompts.windows_needed(_cats(75)) == 1
    assert prompts.windows_needed(_cats(76)) == 2


def test_exactly_75_tokens_fill_one_window(prompts):
    assert prompts.encode([_cats(75)], max_windows=4).tolist() == [[BOS] + [CAT] * 75 + [EOS]]


def test_long_prompt_is_split_into_windows(prompts, caplog):
    with caplog.at_level(logging.WARNING):
        ids = prompts.encode([_cats(100)], max_windows=3)
    assert ids.shape == (2, 77)
    assert ids[:, 0].tolist() == [BOS, BOS]
    assert all(EOS in row for row in ids.tolist())
    assert ids[0].tolist() == [BOS] + [CAT] * 75 + [EOS]
    assert ids[1].tolist() == [BOS] + [CAT] * 25 + [EOS] * 51
    assert caplog.records == []


def test_shorter_prompts_get_empty_windows_prompt_major(prompts):
    ids = prompts.encode(["a photo of a cat", _cats(160)], max_windows=5)
    assert ids.shape == (6, 77)
    rows = ids.tolist()
    assert rows[0] == CAT_IDS + [EOS] * 70
    assert rows[1] == EMPTY_WINDOW
    assert rows[2] == EMPTY_WINDOW
    assert rows[3] == [BOS] + [CAT] * 75 + [EOS]
    assert rows[4] == [BOS] + [CAT] * 75 + [EOS]
    assert rows[5] == [BOS] + [CAT] * 10 + [EOS] * 66


def test_windows_past_the_cap_are_dropped_with_a_warning(prompts, caplog):
    with caplog.at_level(logging.WARNING, logger="sdtrt.runtime.prompts"):
        ids = prompts.encode(["a photo of a cat", _cats(200)], max_windows=2)
    assert ids.shape == (4, 77)
    assert ids[3].tolist() == [BOS] + [CAT] * 75 + [EOS]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "prompt 1 has 200 tokens" in messages[0]
    assert "dropped the last 50 tokens" in messages[0]


def test_default_is_one_window(prompts, caplog):
    with caplog.at_level(logging.WARNING):
        ids = prompts.encode([_cats(80)])
    assert ids.tolist() == [[BOS] + [CAT] * 75 + [EOS]]
    assert "dropped the last 5 tokens" in caplog.text


def test_pad_id_comes_from_the_tokenizer(tmp_path):
    vocab, merges = clip_vocab_and_merges()
    path = tmp_path / "tokenizer.json"
    save_tokenizer(build_clip_tokenizer(vocab, merges, pad_token="!"), path)
    ids = PromptTokenizer.from_file(path).encode(["a photo of a cat", _cats(80)], max_windows=2)
    assert ids[0].tolist() == CAT_IDS + [0] * 70
    assert ids[1].tolist() == [BOS, EOS] + [0] * 75
    assert ids[3].tolist() == [BOS] + [CAT] * 5 + [EOS] + [0] * 70


def test_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="expected the tokenizer at .*tokenizer.json.*re-export"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json")


def test_corrupt_file_is_an_artifact_error(tokenizer_json, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(tokenizer_json.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="not a valid tokenizer.json.*re-export"):
        PromptTokenizer.from_file(path)


def test_tokenizer_without_clip_tokens_is_an_artifact_error(tmp_path):
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    path.write_text(Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str())
    with pytest.raises(ArtifactError, match="no <\\|startoftext\\|> or <\\|endoftext\\|> token.*re-export"):
        PromptTokenizer.from_file(path)


@pytest.mark.parametrize("bad", [[], "a photo of a cat", ["ok", None]])
def test_bad_prompt_list_is_an_error(prompts, bad):
    with pytest.raises(SdtrtError, match="expected a non-empty list of prompt strings"):
        prompts.encode(bad)


def test_max_windows_below_one_is_an_error(prompts):
    with pytest.raises(SdtrtError, match="max_windows must be at least 1, found 0"):
        prompts.encode(["a cat"], max_windows=0)


def test_runtime_module_imports_only_runtime_dependencies():
    tree = ast.parse(Path(runtime_tokenizer.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            roots.add("sdtrt.runtime" if module.startswith("sdtrt.runtime.") else module.split(".")[0])
    stdlib = {"__future__", "dataclasses", "logging", "math", "os", "pathlib", "re"}
    assert roots <= stdlib | {"numpy", "torch", "tokenizers", "sdtrt.runtime"}


def _random_prompt(rng, words: int) -> str:
    pieces = ["cat", "a", "Photo", "1girl", "don't", "Café", "☕", "😀", ",", "((masterpiece))", "x's", "Σ", "e\u0301"]
    seps = [" ", "  ", ",", ", ", "\n", "", "\t", "'", "("]
    return "".join(str(rng.choice(pieces)) + str(rng.choice(seps)) for _ in range(words))


@pytest.mark.parametrize("limit", [1, 75, 150])
def test_bounded_ids_equal_the_first_ids_of_the_whole_prompt(prompts, limit):
    import numpy as np

    rng = np.random.default_rng(limit)
    for words in (3, 40, 200, 2000, 20000):
        prompt = _random_prompt(rng, words)
        whole = prompts._tokenizer.encode(prompt, add_special_tokens=False).ids
        bounded = prompts.bounded_ids(prompt, limit)
        assert bounded.ids == whole[:limit], words
        assert bounded.truncated == (len(whole) > limit)
        if bounded.total is not None:
            assert bounded.total == len(whole)


def test_a_huge_prompt_is_tokenized_only_as_far_as_the_windows_reach(prompts, caplog):
    import time

    huge = _cats(2_000_000)  # 8 MB of text
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="sdtrt.runtime.prompts"):
        ids = prompts.encode([huge], max_windows=2)
    seconds = time.perf_counter() - start
    assert ids.tolist() == [[BOS] + [CAT] * 75 + [EOS]] * 2
    bounded = prompts.bounded_ids(huge, 150)
    assert bounded.total is None and bounded.chars < 20_000
    assert "has more than 150 tokens" in caplog.text and "dropped every token after the first 150" in caplog.text
    assert seconds < 1.0, seconds
