"""Evaluation modes: memory off is the SideNet without retrieval; backbone mode is the HF model's own loss."""

import math

import numpy as np
import torch
from torch.testing import assert_close

from longmem import LongMem, LongMemConfig
from longmem import staleness, stream_loss
from longmem.eval import perplexity, scoring
from longmem.eval import staleness as eval_staleness
from longmem.stream_loss import stream_nll

from conftest import VOCAB, make_llama


def test_modes_are_exactly_what_they_claim():
    hf = make_llama()
    model = LongMem.from_backbone(hf, LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4, segment_length=8)).eval()
    rng = np.random.default_rng(0)
    doc = rng.integers(0, VOCAB, 33).astype(np.int32)  # 4 segments of 8
    ids = torch.from_numpy(doc.astype(np.int64))
    # backbone: the HF model's own loss on each window, summed over the same predicted tokens
    ref_bb, ref_side, n = 0.0, 0.0, 0
    for s in range(4):
        x = ids[s * 8: s * 8 + 9].view(1, -1)
        inp, lab = x[:, :8], x[:, 1:9]
        ref_bb += torch.nn.functional.cross_entropy(hf(inp).logits[0], lab[0], reduction="sum").item()
        ref_side += torch.nn.functional.cross_entropy(model(inp).logits[0], lab[0], reduction="sum").item()
        n += 8
    bb = stream_nll(model, [doc], "backbone")
    nm = stream_nll(model, [doc], "no_memory")
    assert bb.tokens == nm.tokens == n == 32
    assert math.isclose(bb.total, ref_bb, rel_tol=1e-5)
    assert math.isclose(nm.total, ref_side, rel_tol=1e-5)
    lm = stream_nll(model, [doc], "longmem")
    assert lm.tokens == 32 and lm.total != nm.total
    s = lm.summary()
    assert s["tokens_beyond_window"] == 32 - 7  # positions 8.. are beyond the first window
    assert set(s["ppl_by_position"]) == {"0-1", "1-4", "4-16", "16+"}
    # first window: memory is empty, so longmem equals no_memory exactly there
    a = stream_nll(model, [doc], "longmem", keep_tokens=True).token_table()
    b = stream_nll(model, [doc], "no_memory", keep_tokens=True).token_table()
    for p in range(1, 8):
        assert a[(0, p)] == b[(0, p)]
    # more rows than documents: the idle rows are not made (an enormous --batch-size neither hangs nor changes a number)
    assert stream_nll(model, [doc], "longmem", batch_size=10**12).total == lm.total


def test_names_moved_below_training_stay_importable_from_the_evaluations():
    assert perplexity.stream_nll is stream_nll and perplexity.NLL is stream_loss.NLL and scoring.MODES is stream_loss.MODES
    assert (eval_staleness.staleness, eval_staleness.staleness_curve, eval_staleness.plot_staleness) == \
        (staleness.staleness, staleness.staleness_curve, staleness.plot_staleness)
