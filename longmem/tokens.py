"""Text to token ids: the one place that runs a tokenizer on text.

Every caller (training, the evaluations, the memory store, the server, the CLI) tokenizes through these, with
the tokenizer's fast backend and no special tokens: a memory and a local window read running text, and a task
that wants a bos or eos token adds it itself. The ids are the backend's, unchanged.
"""

from __future__ import annotations

import numpy as np


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens)."""
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def encode(tokenizer, text: str, dtype=np.int64) -> np.ndarray:
    """Token ids of ``text`` (no special tokens) as an array, int64 unless ``dtype`` says otherwise."""
    return np.asarray(token_ids(tokenizer, text), dtype=dtype)


def token_ids_and_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's (start, end) character span in it."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


def token_ids_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``token_ids`` of each text, in one call (the tokenizer's threads share the work); the same ids as one by one."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
