"""copy_in_context (longmem.eval.induction): what it compares is the same tokens, first seen and repeated."""

import math
from types import SimpleNamespace

import torch
from torch import nn

from longmem.eval.induction import copy_in_context
from longmem.loading import TINY_MODEL, load_tokenizer

from conftest import WORDS


class Bigram(nn.Module):
    """A model that sees only the current token: it cannot copy, so a repeat is exactly as hard as the first time."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table(input_ids))


def test_a_model_that_cannot_copy_finds_the_repeat_as_hard_and_short_texts_are_skipped():
    tok = load_tokenizer(TINY_MODEL / "backbone")
    text = " ".join(WORDS[(i * 7) % len(WORDS)] + str(i % 13) for i in range(600))
    out = copy_in_context(Bigram(len(tok)).eval(), tok, [text, "too short"], passages=3, passage=16, gap=8)
    assert out["passages"] == 3 and out["loss_first"] > 0
    assert out["loss_repeat"] == out["loss_first"]  # the same token pairs, scored by a model that sees one token
    none = copy_in_context(Bigram(len(tok)).eval(), tok, ["too short"])
    assert none["passages"] == 0 and math.isnan(none["loss_first"])
