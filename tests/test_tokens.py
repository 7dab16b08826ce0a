"""The one tokenize function: the ids are the tokenizer's own (HF's ``tokenizer(text)`` without special tokens)."""

import numpy as np

from longmem.eval import scoring
from longmem.loading import TINY_MODEL, load_tokenizer
from longmem.tokens import encode, token_ids, token_ids_and_offsets, token_ids_batch

TEXTS = ["", "Hello, world.", "  two  spaces\nand a newline\n", "def f(x):\n    return x + 1\n", "café naïve ünïcode"]


def tokenizer():
    return load_tokenizer(TINY_MODEL / "backbone")


def test_token_ids_are_the_tokenizers_without_special_tokens():
    tok = tokenizer()
    for text in TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert token_ids(tok, text) == want
        got = encode(tok, text)
        assert got.dtype == np.int64 and got.tolist() == want
        assert encode(tok, text, dtype=np.int32).dtype == np.int32


def test_offsets_batch_and_the_old_name_agree():
    tok = tokenizer()
    for text in TEXTS:
        ids, offsets = token_ids_and_offsets(tok, text)
        assert ids == token_ids(tok, text) and len(offsets) == len(ids)
        assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert token_ids_batch(tok, TEXTS) == [token_ids(tok, t) for t in TEXTS]
    assert scoring.encode is encode  # the evaluations' name, kept
