"""Generation: incremental decoding equals a full recompute, across window slides into memory."""

import pytest
import torch
from torch.testing import assert_close

from conftest import VOCAB
from longmem import LongMem, LongMemConfig, LongMemError
from longmem.generation import Decoder, SamplingConfig, sample_next

CFG = LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4, segment_length=12)


@pytest.fixture(params=[("query", False), ("key", False), ("key", True)], ids=["query", "key", "key+next"])
def model(backbone_hf, request):
    """Each family, with the paper's query-based retrieval, key-based retrieval, and key-based retrieval that also
    returns the chunk after each retrieved one (the copy-trained candidates of RESULTS.md)."""
    query, nxt = request.param
    m = LongMem.from_backbone(backbone_hf, CFG.replace(retrieval_query=query, retrieval_next=nxt)).eval()
    with torch.no_grad():
        m.sidenet.gate.fill_(1.0)  # lean on the memory so that a wrong memory shows
    return m


def reference_logits(model, stream, W, keep, with_memory):
    """Full recompute: for every position, the current window from scratch (positions from 0) and a
    memory that received each slid-out part, computed by a from-scratch backbone pass of its window."""
    mem = model.new_memory(stream.shape[0]) if with_memory else None
    start, out = 0, []
    for p in range(1, stream.shape[1] + 1):
        if p - start > W:  # the window [start, p-1) is full: slide
            move = W - keep
            if mem is not None:
                kv = model.backbone(stream[:, start:start + W], model.memory_layer)
                mem.add(kv.keys[:, :, :move], kv.values[:, :, :move])
            start += move
        out.append(model(stream[:, start:p], memory=mem, update_memory=False).logits[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("with_memory", [True, False])
def test_incremental_decoding_equals_full_recompute_across_slides(model, with_memory):
    torch.manual_seed(0)
    stream = torch.randint(0, VOCAB, (2, 40))  # 40 tokens through a 12-token window: several slides
    W, keep = 12, 5
    mem = model.new_memory(2) if with_memory else None
    dec = Decoder(model, 2, mem, window=W, keep=keep)
    got = torch.stack([dec.feed(stream[:, i:i + 1]) for i in range(40)], dim=1)
    ref = reference_logits(model, stream, W, keep, with_memory)
    assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)
    if with_memory:
        assert mem.num_tokens(0) + mem.num_pending(0) == dec.moved > 0


def test_memory_delta_decoding_equals_full_recompute(backbone_hf):
    """sidenet_init="memory-delta": block j runs twice per step (with and without memory) over one KV cache."""
    model = LongMem.from_backbone(backbone_hf, CFG.replace(sidenet_init="memory-delta")).eval()
    j = model.sidenet.memory_index
    torch.manual_seed(1)
    with torch.no_grad():
        model.sidenet.gate.fill_(1.0)
        model.sidenet.scales[j].fill_(2.0)
        for p in model.sidenet.blocks[j].parameters():
            p.add_(0.05 * torch.randn_like(p))
    stream = torch.randint(0, VOCAB, (2, 40))
    mem = model.new_memory(2)
    dec = Decoder(model, 2, mem, window=12, keep=5)
    got = torch.stack([dec.feed(stream[:, i:i + 1]) for i in range(40)], dim=1)
    assert_close(got, reference_logits(model, stream, 12, 5, True).float(), rtol=1e-4, atol=1e-4)
    assert dec.moved > 0


def test_prompt_prefill_in_blocks_equals_token_by_token(model):
    torch.manual_seed(1)
    stream = torch.randint(0, VOCAB, (2, 30))
    a = Decoder(model, 2, model.new_memory(2), window=12, keep=4)
    b = Decoder(model, 2, model.new_memory(2), window=12, keep=4)
    last = a.feed(stream)
    for i in range(30):
        ref = b.feed(stream[:, i:i + 1])
    assert_close(last, ref, rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_argmax_of_full_recompute(model):
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, 20))
    out = model.generate(prompt, memory=model.new_memory(1), max_new_tokens=10, window=12, keep=6)
    assert out.shape == (1, 30) and torch.equal(out[:, :20], prompt)
    ref = reference_logits(model, out[:, :-1], 12, 6, with_memory=True)
    assert torch.equal(ref[:, 19:].argmax(-1), out[:, 20:])


def test_batch_rows_generate_independently(model):
    torch.manual_seed(3)
    prompts = torch.randint(0, VOCAB, (2, 25))
    both = model.generate(prompts, memory=model.new_memory(2), max_new_tokens=8)
    alone = model.generate(prompts[1:], memory=model.new_memory(1), max_new_tokens=8)
    assert torch.equal(both[1:], alone)


def test_stop_ids_and_sampling_controls(model):
    torch.manual_seed(4)
    prompt = torch.randint(0, VOCAB, (1, 5))
    greedy = model.generate(prompt, max_new_tokens=6)
    first = int(greedy[0, 5])
    stopped = model.generate(prompt, max_new_tokens=6, stop_token_ids=[first])
    assert stopped.shape[1] == 6  # stopped right after the stop token
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, generator=g1)
    s2 = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2)  # deterministic for a seed
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    cfg = SamplingConfig(do_sample=True, top_k=1)
    assert all(int(sample_next(logits, cfg)) == 1 for _ in range(5))
    cfg = SamplingConfig(do_sample=True, top_p=0.5)
    assert all(int(sample_next(logits, cfg)) == 1 for _ in range(5))


def test_streamer_sees_every_token(model):
    seen = []
    out = model.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=5, streamer=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 4:].tolist()


def test_bad_generation_arguments(model):
    with pytest.raises(LongMemError):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(LongMemError, match="temperature"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), do_sample=True, temperature=0)
    with pytest.raises(LongMemError, match="rows"):
        model.generate(torch.zeros(2, 3, dtype=torch.long), memory=model.new_memory(1))


@pytest.mark.parametrize("capacity", [None, 8])
def test_kv_cache_appends_like_concatenation_and_reuses_its_buffers(capacity):
    from longmem.cache import KVCache

    cache, ref_k, ref_raw = KVCache(2, capacity=capacity), [], []
    for t in (3, 1, 1, 2, 1):  # 8 tokens: fills the capacity exactly; without one the buffer doubles
        k, v, raw = torch.randn(2, 2, t, 4), torch.randn(2, 2, t, 4), torch.randn(2, 2, t, 4)
        ref_k.append(k), ref_raw.append(raw)
        got_k, got_v = cache.update(1, k, v, raw)
        assert torch.equal(got_k, torch.cat(ref_k, dim=2)) and torch.equal(cache.raw_keys[1], torch.cat(ref_raw, dim=2))
        assert got_v[:, :, -t:].equal(v) and len(cache) == got_k.shape[2]
    buffer = cache.keys[1].data_ptr()
    cache.reset()
    assert len(cache) == 0 and cache.keys[1] is None
    k = torch.randn(2, 2, 5, 4)
    assert torch.equal(cache.update(1, k, k)[0], k) and cache.keys[1].data_ptr() == buffer  # no new allocation
